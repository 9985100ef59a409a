r"""Runs a model and its guide on a batch of draws, and sums log-densities per draw.

The primitives of the draws engine (:mod:`pyro_flows._draws`): the guide runs inside an extra
:class:`pyro.plate` placed to the left of every plate of the model (as
:class:`pyro.infer.Trace_ELBO` does with ``vectorize_particles``), and the model is replayed
on the guide's trace under the same plate. Every site then carries the draws as its leading
batch dimension, at ``-batch_ndim`` counted among batch dimensions; ``batch_ndim=None`` is a
plain run of a single draw.
"""

__all__ = [
    "ResampleObserved",
    "SetValues",
    "draws_plate",
    "log_probs",
    "nonfinite",
    "per_draw",
    "sampled",
    "samples",
    "subsample_trace",
    "to_draws",
    "total",
    "trace",
    "traces",
]

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.poutine import Trace
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch import Size, Tensor

DRAWS = "_pyro_flows_draws"


class ResampleObserved(UnconditionMessenger):
    r"""Samples observed sites afresh, leaving ``pyro.deterministic`` sites as they are.

    (``pyro.deterministic`` sites are observed ``Delta`` sites; resampled, a plate would
    broadcast their value into its event shape.)
    """

    def _pyro_sample(self, msg: Any) -> None:
        if not (msg["infer"] or {}).get("_deterministic"):
            super()._pyro_sample(msg)


class SetValues(Messenger):
    r"""Gives the named latent sample sites the given values instead of sampling them.

    Example:
        >>> def model():
        ...     return pyro.sample("x", pyro.distributions.Normal(0.0, 1.0))
        >>> SetValues({"x": torch.tensor(2.0)})(model)()
        tensor(2.)
    """

    def __init__(self, values: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: Any) -> None:
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"], msg["done"] = self.values[msg["name"]], True


def sampled(site: dict) -> bool:
    r"""Whether a guide site is drawn at random (not observed, not a ``Delta``)."""
    if site["is_observed"]:
        return False
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return bool((site["infer"] or {}).get("is_auxiliary")) or not isinstance(fn, Delta)


def draws_plate(num_draws: int, batch_ndim: int | None) -> AbstractContextManager:
    r"""The plate over draws at dimension ``-batch_ndim``; none for a single plain run.

    Example:
        >>> with draws_plate(3, 2):
        ...     pyro.sample("x", pyro.distributions.Normal(0.0, 1.0)).shape
        torch.Size([3, 1])
    """
    if batch_ndim is None:
        return nullcontext()
    return pyro.plate(DRAWS, num_draws, dim=-batch_ndim)


def trace(fn: Callable, args: tuple, kwargs: Mapping[str, Any]) -> Trace:
    r"""Traces ``fn(*args, **kwargs)``, without subsample sites."""
    return prune_subsample_sites(poutine.trace(fn).get_trace(*args, **kwargs))


def traces(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    r"""Traces the guide and the model replayed on it (or runs a ``GuideMessenger``), as
    Pyro's ELBOs do: the model gets the guide's subsample indices too.

    Returns:
        The model's trace and the guide's trace, without subsample sites.
    """
    if isinstance(poutine.unwrap(guide), GuideMessenger):
        guide(*args, **kwargs)
        model_trace, guide_trace = poutine.unwrap(guide).get_traces()
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = trace(poutine.replay(model, trace=guide_trace), args, kwargs)
    return model_trace, prune_subsample_sites(guide_trace)


def subsample_trace(trace: Trace) -> Trace:
    r"""Returns a copy of a trace with only its subsample sites (a plate's indices), to
    replay them into another run."""
    trace = trace.copy()
    for name, site in list(trace.nodes.items()):
        if not site_is_subsample(site):
            trace.remove_node(name)
    return trace


def samples(trace: Trace) -> list[tuple[str, dict]]:
    r"""Returns the ``(name, site)`` pairs of a trace's sample sites."""
    return [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample"]


def log_probs(trace: Trace, num_draws: int, batch_ndim: int | None) -> dict[str, Tensor]:
    r"""Returns every sample site's log-density (scaled and masked), summed per draw."""
    trace.compute_log_prob()
    return {
        name: per_draw(site["log_prob"], num_draws, batch_ndim) for name, site in samples(trace)
    }


def total(per_site: Mapping[str, Tensor], n: int) -> Tensor:
    r"""Returns the sum of per-draw values over sites (zeros when there are none)."""
    return sum(per_site.values(), torch.zeros(n))


def per_draw(log_prob: Tensor | float, num_draws: int, batch_ndim: int | None) -> Tensor:
    r"""Sums a site's log-density over every dimension but the draws.

    A log-density without the draws dimension (a site that does not depend on the draws)
    is the same for every draw.

    Example:
        >>> per_draw(torch.ones(3, 1, 4), 3, 3)
        tensor([4., 4., 4.])
    """
    log_prob = torch.as_tensor(log_prob)
    if batch_ndim is None or log_prob.dim() < batch_ndim:
        return log_prob.sum().expand(num_draws)
    log_prob = log_prob.movedim(log_prob.dim() - batch_ndim, 0)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(num_draws)


def to_draws(value: Tensor, num_draws: int, shape: Size) -> Tensor:
    r"""Reshapes a vectorized value to ``(num_draws, *shape)``, ``shape`` being one draw's.

    Example:
        >>> to_draws(torch.zeros(5, 1, 8), 5, torch.Size([8])).shape
        torch.Size([5, 8])
    """
    extra = value.dim() - len(shape)
    if extra > 0:
        value = value.reshape(math.prod(value.shape[:extra]), *value.shape[extra:])
    return value.expand(num_draws, *shape)


def nonfinite(*scored: tuple[Trace, Mapping[str, Tensor]]) -> dict[str, int]:
    r"""Counts the NaN and :math:`+\infty` log-density values of each site.

    :math:`-\infty` is a zero density, a legitimate weight. Such values make a site's
    per-draw sum NaN or :math:`+\infty`, so only those sites' values are counted.

    Arguments:
        scored: Traces with their per-site, per-draw sums (see :func:`log_probs`).

    Example:
        >>> def model():
        ...     pyro.factor("bad", torch.tensor([0.0, math.inf, -math.inf]))
        >>> with pyro.validation_enabled(False):
        ...     trace_ = trace(model, (), {})
        ...     counts = nonfinite((trace_, log_probs(trace_, 1, None)))
        >>> counts
        {'bad': 1}
    """
    counts: dict[str, int] = {}
    for trace_, sums in scored:
        for name, per_draw_sum in sums.items():
            if torch.isnan(per_draw_sum).any() or torch.isposinf(per_draw_sum).any():
                log_prob = torch.as_tensor(trace_.nodes[name]["log_prob"])
                count = int((torch.isnan(log_prob) | torch.isposinf(log_prob)).sum())
                if count:
                    counts[name] = counts.get(name, 0) + count
    return counts
