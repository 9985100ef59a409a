r"""Normalizing-flow autoguides for Pyro, with ArviZ export and posterior diagnostics."""

__version__ = "0.1.0"

__all__ = ["__version__"]
