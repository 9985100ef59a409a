r"""Normalizing-flow autoguides for Pyro, with ArviZ export and posterior diagnostics."""

__version__ = "0.1.0"

from .arviz import to_inference_data
from .fit import FitResult, fit
from .flows import FLOWS
from .guard import NonFiniteLossError
from .guides import AutoFlowGuide
from .initialization import init_to_median_or_feasible

__all__ = [
    "FLOWS",
    "AutoFlowGuide",
    "FitResult",
    "NonFiniteLossError",
    "__version__",
    "fit",
    "init_to_median_or_feasible",
    "to_inference_data",
]
