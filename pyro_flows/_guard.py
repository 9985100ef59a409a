r"""Guarding a fit against non-finite losses: detection, and the site to blame."""

__all__ = ["all_finite", "find_nonfinite", "is_invalid_value_error", "nonfinite_grads"]

from collections.abc import Callable, Mapping, Sequence

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from .errors import DataError


def is_invalid_value_error(error: BaseException) -> bool:
    r"""Whether `error` is torch's complaint that a distribution got non-finite arguments."""

    # DataError: bad data, which retrying cannot fix.
    invalid = isinstance(error, ValueError) and "invalid values" in str(error)
    return invalid and not isinstance(error, DataError)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    r"""Whether every element of every tensor is finite."""

    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def nonfinite_grads(params: Mapping[str, Tensor]) -> list[str]:
    r"""Names of the parameters whose gradient has a non-finite element."""

    return [
        name
        for name, p in params.items()
        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]


def _run(tracer: poutine.trace_messenger.TraceHandler, args: tuple, kwargs: dict) -> str:
    r"""Runs a traced program; returns an empty string, or what it raised and where."""

    try:
        tracer.get_trace(*args, **kwargs)
    except Exception as error:
        names = [name for name, site in tracer.msngr.trace.nodes.items() if site["type"]]
        after = f" after site {names[-1]!r}" if names else " before its first site"
        return f"raised {type(error).__name__}{after}: {error}"
    return ""


def _sites(trace: Trace, role: str) -> list[tuple[str, str]]:
    r"""Lists `(site, problem)` for every site with a non-finite value or log-density."""

    found = []
    for name, site in trace.nodes.items():
        if site["type"] not in ("sample", "param"):
            continue
        value = site["value"]
        if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
            if site["type"] == "sample" and site["is_observed"]:
                problem = f"{role} site {name!r} is observed and its data hold NaN or inf values"
            else:
                problem = f"{role} {site['type']} site {name!r} has a non-finite value"
            found.append((name, problem))
            continue
        if site["type"] != "sample":
            continue
        try:
            log_prob = site["fn"].log_prob(value)
        except Exception as error:
            found.append((name, f"{role} site {name!r}: log_prob raised {error}"))
            continue
        log_prob = torch.as_tensor(log_prob)
        if not bool(torch.isfinite(log_prob).all()):
            bad = log_prob[~torch.isfinite(log_prob)].flatten()[0].item()
            found.append((name, f"{role} site {name!r} has log-density {bad}"))
    return found


def find_nonfinite(
    model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> tuple[str | None, list[str]]:
    r"""Traces the guide and the model replayed against it, and blames sites.

    Validation is off while tracing, so a distribution given non-finite arguments yields a
    non-finite log-density at its own site instead of an error before the site is reached.

    Returns:
        The name of the first site with a non-finite value or log-density (or :py:`None`),
        and a list of every problem found, in words.
    """

    with torch.no_grad(), pyro.validation_enabled(False):
        if isinstance(poutine.unwrap(guide), Messenger):
            try:
                guide(*args, **kwargs)
            except Exception as error:
                return None, [f"the guide raised {type(error).__name__}: {error}"]
            model_trace, guide_trace = poutine.unwrap(guide).get_traces()
        else:
            guide_tracer = poutine.trace(guide)
            problem = _run(guide_tracer, args, kwargs)
            if problem:
                return None, [f"the guide {problem}"]
            guide_trace = guide_tracer.msngr.trace
            model_tracer = poutine.trace(poutine.replay(model, trace=guide_trace))
            problem = _run(model_tracer, args, kwargs)
            model_trace = model_tracer.msngr.trace
            if problem:
                return None, [f"the model {problem}"]
        found = _sites(model_trace, "model") + _sites(guide_trace, "guide")
    site = found[0][0] if found else None
    return site, [problem for _, problem in found]
