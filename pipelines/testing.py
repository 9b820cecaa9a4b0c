"""Former home of the CI stand-in stage, now ``pipelines.stand_in.StandInCompute``; this name is kept for
callers that still import ``FakeCompute`` from here."""
from pipelines.stand_in import StandInCompute as FakeCompute  # noqa: F401
