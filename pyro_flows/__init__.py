r"""Normalizing-flow autoguides for Pyro, with ArviZ export and posterior diagnostics."""

__version__ = "0.1.0"

from ._zuko import zuko  # noqa: F401  (first: keeps the user's distribution validation)
from .arviz import to_inference_data
from .diagnostics import Diagnosis, diagnose
from .fit import FitResult, fit
from .flows import FLOWS
from .guard import NonFiniteLossError
from .guides import AutoFlowGuide
from .importance import ImportanceWeights, log_importance_weights
from .initialization import init_to_median_or_feasible
from .laplace import LaplaceStart, laplace_start

__all__ = [
    "FLOWS",
    "AutoFlowGuide",
    "Diagnosis",
    "FitResult",
    "ImportanceWeights",
    "LaplaceStart",
    "NonFiniteLossError",
    "__version__",
    "diagnose",
    "fit",
    "init_to_median_or_feasible",
    "laplace_start",
    "log_importance_weights",
    "to_inference_data",
]
