"""Benchmark targets: Pyro ports of posteriordb posteriors and synthetic densities."""

from .base import Target, init_to_uniform_unconstrained
from .refdata import MissingReferenceData, load_reference, load_summary, refdata_dir
from .registry import POSTERIORDB, SYNTHETIC, TARGETS, load_target

__all__ = [
    "POSTERIORDB",
    "SYNTHETIC",
    "TARGETS",
    "MissingReferenceData",
    "Target",
    "init_to_uniform_unconstrained",
    "load_reference",
    "load_summary",
    "load_target",
    "refdata_dir",
]
