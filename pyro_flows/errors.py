r"""The exceptions that pyro-flows raises for a user to catch.

Everything else that goes wrong is a :py:`ValueError`, :py:`TypeError` or
:py:`NotImplementedError` whose message names the site or argument and says what to do.
"""

from __future__ import annotations

__all__ = ["DataError", "NonFiniteLossError", "StartWarning"]

from typing import Any


class DataError(ValueError):
    r"""Raised when a model's data hold NaN or infinite values where they cannot work.

    A :py:`ValueError`, raised when a guide is set up (at its first call) or by
    :func:`pyro_flows.fit`, which does not retry it as a non-finite step: the data must be
    mended first. The message names the observed site or the model's argument.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_flows import AutoFlowGuide
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> try:
        ...     AutoFlowGuide(model)(torch.tensor(float("nan")))
        ... except DataError as error:
        ...     print(str(error)[:29])
        Observed site 'y' holds 1 NaN
    """


class NonFiniteLossError(FloatingPointError):
    r"""Raised by :func:`pyro_flows.fit` when the loss stays non-finite after repeated retries.

    The parameters are left at the last state whose loss and gradients were finite.

    Arguments:
        message: What went wrong and what to do.
        site: The name of the first site whose log-density (or value) is not finite, if one
            was found by tracing the model and guide.
        result: The :class:`pyro_flows.FitResult` of the steps done before the failure.

    Example:
        >>> error = NonFiniteLossError("the loss is nan", site="y")
        >>> error.site
        'y'
    """

    def __init__(self, message: str, site: str | None = None, result: Any = None) -> None:
        super().__init__(message)
        self.site = site
        self.result = result


class StartWarning(UserWarning):
    r"""Warned when :class:`~pyro_flows.AutoFlowGuide` cannot use the start it was asked
    for (``init="pathfinder"`` or ``"laplace"``) and starts at ``init_loc_fn``'s point with
    ``init_scale`` instead (``init="prior"``); the message says why.

    Example:
        >>> import warnings
        >>> warnings.simplefilter("ignore", StartWarning)  # to silence it
    """
