r"""Normalizing-flow autoguides for Pyro, with ArviZ export and posterior diagnostics."""

from ._version import __version__
from ._zuko import zuko  # noqa: F401  (before zuko is imported elsewhere: keeps validation)
from .arviz import to_inference_data
from .diagnostics import Diagnosis, diagnose
from .elbo import VmapTrace_ELBO
from .errors import DataError, NonFiniteLossError, StartWarning
from .fitting import FitResult, fit, load_checkpoint
from .flows import FLOWS
from .guides import AutoFlowGuide
from .importance import ImportanceWeights, log_importance_weights
from .initialization import init_to_feasible, init_to_median_or_feasible
from .laplace import LaplaceStart, laplace_start

__all__ = [
    "FLOWS",
    "AutoFlowGuide",
    "DataError",
    "Diagnosis",
    "FitResult",
    "ImportanceWeights",
    "LaplaceStart",
    "NonFiniteLossError",
    "StartWarning",
    "VmapTrace_ELBO",
    "__version__",
    "diagnose",
    "fit",
    "init_to_feasible",
    "init_to_median_or_feasible",
    "laplace_start",
    "load_checkpoint",
    "log_importance_weights",
    "to_inference_data",
]
