"""mdt: TRELLIS networks on any device, flow-matching maths and MDT-dist distillation."""
__version__ = "0.1.0"
