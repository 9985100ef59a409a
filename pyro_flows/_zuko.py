r"""Imports zuko without its side effect on torch's distribution validation.

zuko's import sets ``torch.distributions.Distribution._validate_args = False`` for the whole
process, which would switch off the argument and support checks that Pyro users rely on
(``pyro.enable_validation``) as soon as they import pyro_flows. The setting is put back.
"""

from torch.distributions import Distribution

_validate_args = Distribution._validate_args
import zuko  # noqa: E402

Distribution._validate_args = _validate_args

__all__ = ["zuko"]
