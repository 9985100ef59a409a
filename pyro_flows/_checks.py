r"""Checks of what a user passes in: integer options, and a model's data (non-finite
observations and arguments), with errors that name the culprit and say what to do."""

from __future__ import annotations

__all__ = ["MASK_ADVICE", "check_data", "check_int", "nonfinite_arguments"]

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from .errors import DataError

MASK_ADVICE = (
    "Drop those entries, or replace them with any finite value (e.g. torch.nan_to_num) and "
    "mask them out with poutine.mask(mask=...) (obs_mask=... imputes them as latent sites). "
    "A masked NaN still makes the gradients NaN."
)


def check_int(name: str, value: Any, low: int) -> None:
    r"""Raises a :py:`TypeError` unless ``value`` is an int, a :py:`ValueError` if below ``low``.

    Example:
        >>> check_int("num_samples", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: num_samples must be at least 1, got 0.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}.")


def _count(value: Tensor) -> str:
    nan = int(torch.isnan(value).sum())
    inf = int(torch.isinf(value).sum())
    return f"{nan} NaN and {inf} infinite value(s) of {value.numel()}"


def _named_arguments(
    model: Callable[..., object], args: tuple, kwargs: dict
) -> Iterator[tuple[str, object]]:
    try:
        bound = inspect.signature(model).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {f"#{i}": value for i, value in enumerate(args)} | dict(kwargs)
    yield from bound.items()


def _nonfinite(value: object) -> bool:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return False
    return not bool(torch.isfinite(value).all())


def nonfinite_arguments(model: Callable[..., object], args: tuple, kwargs: dict) -> list[str]:
    r"""Describes the model's tensor arguments that hold NaN or infinite values.

    Arguments:
        model: The model, whose signature names its arguments.
        args: The model's positional arguments.
        kwargs: The model's keyword arguments.

    Returns:
        One description per such argument, e.g. ``"argument 'x' holds 1 NaN and 0
        infinite value(s) of 3"``.

    Example:
        >>> def model(x, y=None):
        ...     pass
        >>> nonfinite_arguments(model, (torch.tensor([0.0, float("nan")]),), {})
        ["argument 'x' holds 1 NaN and 0 infinite value(s) of 2"]
    """

    return [
        f"argument {name!r} holds {_count(value)}"
        for name, value in _named_arguments(model, args, kwargs)
        if _nonfinite(value)
    ]


def _observed_nonfinite(
    trace: Trace, model: Callable[..., object], args: tuple, kwargs: dict
) -> None:
    arguments = dict(_named_arguments(model, args, kwargs))
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or not _nonfinite(site["value"]):
            continue
        value = site["value"]
        first = tuple(int(i) for i in (~torch.isfinite(value)).nonzero()[0])
        holders = [key for key, arg in arguments.items() if arg is value]
        source = f" (the model's argument {holders[0]!r})" if holders else ""
        raise DataError(
            f"Observed site {name!r} holds {_count(value)}{source}, the first at index {first}: "
            f"the ELBO of such data is not finite. {MASK_ADVICE}"
        )


def _nan_log_density(
    trace: Trace, model: Callable[..., object], args: tuple, kwargs: dict
) -> None:
    suspects = nonfinite_arguments(model, args, kwargs)
    if not suspects:
        return
    with torch.no_grad(), pyro.validation_enabled(False):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or not site["is_observed"]:
                continue
            try:
                log_prob = site["fn"].log_prob(site["value"])
            except Exception:  # noqa: BLE001 - a site the check cannot score is left to Pyro
                continue
            if bool(torch.isnan(torch.as_tensor(log_prob)).any()):
                raise DataError(
                    f"Observed site {name!r} has a NaN log-density at the initial point, and "
                    f"the model's {', '.join(suspects)}: NaN or infinite inputs (covariates, "
                    f"data) make the ELBO NaN. {MASK_ADVICE}"
                )


def check_data(trace: Trace, model: Callable[..., object], args: tuple, kwargs: dict) -> None:
    r"""Raises a :class:`DataError` naming the observed site that NaN or infinite data reach.

    Two cases: an observed value holds NaN or infinite entries (masked or not: a masked NaN
    still makes the gradients NaN); or an observed site's log-density is NaN at the values
    of the trace while some of the model's arguments hold NaN or infinite entries (a
    covariate). The arguments are named, when the model's signature allows.

    Arguments:
        trace: A trace of the whole model, observed sites included.
        model: The model.
        args: The model's positional arguments.
        kwargs: The model's keyword arguments.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyro import poutine
        >>> def model(y):
        ...     pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)
        >>> y = torch.tensor(float("nan"))
        >>> check_data(poutine.trace(model).get_trace(y), model, (y,), {})
        Traceback (most recent call last):
        ...
        pyro_flows.errors.DataError: Observed site 'y' holds 1 NaN ...
    """

    _observed_nonfinite(trace, model, args, kwargs)
    _nan_log_density(trace, model, args, kwargs)
