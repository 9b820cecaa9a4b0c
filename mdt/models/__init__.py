"""The TRELLIS networks (exact key names, shapes and computations) and TRELLIS-format checkpoint I/O."""
from .base import TrellisModule
from .io import (MODEL_CLASSES, CheckpointError, build_model, from_pretrained, load_state_dict_strict,
                 model_class, save_pretrained)
from .representations import Gaussians, Strivec
from .slat_flow import ElasticSLatFlowModel, SLatFlowModel, SparseResBlock3d
from .slat_vae import (ElasticSLatEncoder, ElasticSLatGaussianDecoder, ElasticSLatMeshDecoder,
                       ElasticSLatRadianceFieldDecoder, SLatEncoder, SLatGaussianDecoder, SLatMeshDecoder,
                       SLatRadianceFieldDecoder)
from .ss_flow import SparseStructureFlowModel
from .ss_vae import SparseStructureDecoder, SparseStructureEncoder
from .trellis2_flow import (TRELLIS2_CLASSES, Trellis2ElasticSLatFlowModel, Trellis2SLatFlowModel,
                            Trellis2SparseStructureFlowModel, is_trellis2_args)

__all__ = [
    "TrellisModule", "MODEL_CLASSES", "CheckpointError", "build_model", "from_pretrained", "save_pretrained",
    "load_state_dict_strict", "Gaussians", "Strivec", "SparseStructureFlowModel", "SLatFlowModel",
    "ElasticSLatFlowModel", "SparseResBlock3d", "SparseStructureEncoder", "SparseStructureDecoder", "SLatEncoder",
    "ElasticSLatEncoder", "SLatGaussianDecoder", "ElasticSLatGaussianDecoder", "SLatRadianceFieldDecoder",
    "ElasticSLatRadianceFieldDecoder", "SLatMeshDecoder", "ElasticSLatMeshDecoder", "model_class",
    "TRELLIS2_CLASSES", "Trellis2SparseStructureFlowModel", "Trellis2SLatFlowModel", "Trellis2ElasticSLatFlowModel",
    "is_trellis2_args",
]
