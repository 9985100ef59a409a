r"""Replays a Pyro model on draws of its guide, vectorized over draws.

The guide runs once inside an extra :class:`pyro.plate` placed to the left of every
plate of the model (as :class:`pyro.infer.Trace_ELBO` does with ``vectorize_particles``),
and the model is replayed on that trace under the same plate. Every site then carries the
draws as its leading batch dimension, so one model run scores a whole chunk of draws.
"""

__all__ = [
    "Draws",
    "Site",
    "Structure",
    "check_first_draw",
    "draw",
    "draw_prior",
    "inspect",
    "user_model",
]

import math
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import Distribution
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine import Trace
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import prune_subsample_sites
from torch import Size, Tensor

DRAWS = "_pyro_flows_draws"

HINT = (
    "Declare every batch dimension of the model with pyro.plate and index tensors from the "
    "right (x[..., i]) so that the model broadcasts over a leading draws dimension, or pass "
    "vectorize=False (one model run per draw, slow)."
)


@dataclass(frozen=True)
class Site:
    r"""What one sample site of the model looks like for a single draw.

    Arguments:
        kind: ``"latent"``, ``"deterministic"`` or ``"observed"``.
        shape: The shape of the site's value.
        event_dim: The number of rightmost event dimensions of the value.
        plates: The enclosing vectorized plates, as ``(name, dim, size)``.
        fn: The site's distribution.
        value: The site's value (the data, for observed sites).
    """

    kind: str
    shape: Size
    event_dim: int
    plates: tuple[tuple[str, int, int], ...]
    fn: Distribution
    value: Tensor


@dataclass(frozen=True)
class Structure:
    r"""The sites of a model replayed on one guide draw, and its plate nesting."""

    sites: dict[str, Site]
    max_plate_nesting: int

    def names(self, *kinds: str) -> list[str]:
        r"""Returns the names of the sites of the given kinds, in model order."""
        return [name for name, site in self.sites.items() if site.kind in kinds]


@dataclass(frozen=True)
class Draws:
    r"""Per-draw results of one chunk; every tensor has the draws as leading dimension."""

    posterior: dict[str, Tensor]
    log_likelihood: dict[str, Tensor]
    posterior_predictive: dict[str, Tensor]
    site_log_prob: dict[str, Tensor]
    log_q: Tensor
    lp: Tensor


class ResampleObserved(UnconditionMessenger):
    r"""Samples observed sites afresh, leaving ``pyro.deterministic`` sites as they are.

    (``pyro.deterministic`` sites are observed ``Delta`` sites; resampled, a plate would
    broadcast their value into its event shape.)
    """

    def _pyro_sample(self, msg: Any) -> None:
        if not (msg["infer"] or {}).get("_deterministic"):
            super()._pyro_sample(msg)


def user_model(guide: Any) -> Callable:
    r"""Returns the user's model of an autoguide, without the ``InitMessenger`` around it.

    Pyro's autoguides store ``InitMessenger(init_loc_fn)(model)`` as ``guide.model``; run
    unconditioned, that wrapper puts initial values where prior draws belong.
    """
    model = guide.model
    while True:
        inner = model.func if isinstance(model, partial) and not model.args else model
        if not (isinstance(inner, partial) and len(inner.args) >= 2):
            return model
        if not isinstance(inner.args[0], InitMessenger):
            return model
        model = inner.args[1]


def inspect(guide: Callable, model: Callable, args: tuple, kwargs: dict) -> Structure:
    r"""Replays the model on one guide draw, without consuming the global random stream."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        guide_trace = _trace(guide, args, kwargs)
        model_trace = _trace(poutine.replay(model, trace=guide_trace), args, kwargs)
    frames = [
        frame
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    for frame in frames:
        if frame.full_size is not None and frame.size != frame.full_size:
            raise ValueError(
                f"Plate '{frame.name}' subsamples {frame.size} of {frame.full_size} points: "
                "call with the model arguments that make it use the full data."
            )
    sites = {
        name: _site(site) for name, site in model_trace.nodes.items() if site["type"] == "sample"
    }
    return Structure(sites, max((-frame.dim for frame in frames), default=0))


def draw(
    guide: Callable,
    model: Callable,
    structure: Structure,
    num_draws: int,
    args: tuple,
    kwargs: dict,
    *,
    vectorize: bool = True,
    predictive: bool = True,
) -> Draws:
    r"""Draws from the guide and replays the model on the draws (vectorized, or one draw)."""
    batch_ndim = structure.max_plate_nesting + 1 if vectorize else None
    guide = _vectorized(guide, num_draws, batch_ndim)
    model = _vectorized(model, num_draws, batch_ndim)
    with torch.no_grad():
        guide_trace = _trace(guide, args, kwargs)
        model_trace = _trace(poutine.replay(model, trace=guide_trace), args, kwargs)
        if predictive:
            replayed = ResampleObserved()(poutine.replay(model, trace=guide_trace))
            pp_trace = _trace(replayed, args, kwargs)
    site_log_prob = _site_log_probs(model_trace, num_draws, batch_ndim)
    log_q = _site_log_probs(guide_trace, num_draws, batch_ndim).values()
    sites, observed = structure.sites, structure.names("observed")
    posterior = structure.names("latent", "deterministic")
    return Draws(
        posterior=_values(model_trace, posterior, sites, num_draws),
        log_likelihood=_log_likelihood(model_trace, observed, sites, num_draws),
        posterior_predictive=_values(pp_trace, observed, sites, num_draws) if predictive else {},
        site_log_prob=site_log_prob,
        log_q=sum(log_q),
        lp=sum(site_log_prob.values()),
    )


def draw_prior(
    model: Callable,
    structure: Structure,
    num_draws: int,
    args: tuple,
    kwargs: dict,
    *,
    vectorize: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r"""Draws latent and deterministic sites, then observed sites, from the prior."""
    batch_ndim = structure.max_plate_nesting + 1 if vectorize else None
    model = _vectorized(ResampleObserved()(model), num_draws, batch_ndim)
    with torch.no_grad():
        trace = _trace(model, args, kwargs)
    return (
        _values(trace, structure.names("latent", "deterministic"), structure.sites, num_draws),
        _values(trace, structure.names("observed"), structure.sites, num_draws),
    )


def check_first_draw(
    model: Callable, structure: Structure, draws: Draws, args: tuple, kwargs: dict
) -> None:
    r"""Checks the vectorized run against a plain run of the model on the first draw.

    A model that runs vectorized but mixes draws (a sum over all dimensions, say) would
    otherwise give wrong numbers silently.
    """
    data = {name: draws.posterior[name][0] for name in structure.names("latent")}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        trace = _trace(poutine.condition(model, data=data), args, kwargs)
    trace.compute_log_prob()
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name not in structure.sites:
            continue
        pairs = [(draws.site_log_prob[name][0], site["log_prob"].sum())]
        if name in draws.posterior:
            pairs.append((draws.posterior[name][0], site["value"]))
        for vectorized, single in pairs:
            if not torch.allclose(vectorized, single.to(vectorized), rtol=1e-4, atol=1e-4):
                raise ValueError(
                    f"Site '{name}' differs between the run vectorized over draws and a "
                    f"single-draw run: the model does not broadcast over draws. {HINT}"
                )


def _trace(fn: Callable, args: tuple, kwargs: Mapping[str, Any]) -> Trace:
    return prune_subsample_sites(poutine.trace(fn).get_trace(*args, **kwargs))


def _vectorized(fn: Callable, num_draws: int, batch_ndim: int | None) -> Callable:
    if batch_ndim is None:
        return fn

    def run(*args: Any, **kwargs: Any) -> Any:
        with ExitStack() as stack:
            stack.enter_context(pyro.plate(DRAWS, num_draws, dim=-batch_ndim))
            return fn(*args, **kwargs)

    return run


def _site(site: dict) -> Site:
    infer = site["infer"] or {}
    if infer.get("_deterministic"):
        kind = "deterministic"
    else:
        kind = "observed" if site["is_observed"] else "latent"
    value = site["value"]
    event_dim = site["fn"].event_dim
    if kind == "deterministic" and event_dim == value.dim():
        event_dim = 0  # pyro.deterministic's default: no event dims were declared
    plates = tuple(
        (frame.name, frame.dim, frame.size)
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    )
    return Site(kind, value.shape, event_dim, plates, site["fn"], value)


def _site_log_probs(trace: Trace, num_draws: int, batch_ndim: int | None) -> dict[str, Tensor]:
    trace.compute_log_prob()
    return {
        name: _per_draw(site["log_prob"], num_draws, batch_ndim)
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
    }


def _log_likelihood(
    trace: Trace, names: list[str], sites: Mapping[str, Site], num_draws: int
) -> dict[str, Tensor]:
    r"""Pointwise log-densities of observed sites: unscaled, masked points zero."""
    result = {}
    for name in names:
        node = trace.nodes[name]
        log_lik = scale_and_mask(node["unscaled_log_prob"], mask=node["mask"])
        shape = sites[name].fn.log_prob(sites[name].value).shape
        result[name] = _to_draws(log_lik, num_draws, shape)
    return result


def _values(
    trace: Trace, names: list[str], sites: Mapping[str, Site], num_draws: int
) -> dict[str, Tensor]:
    return {
        name: _to_draws(trace.nodes[name]["value"], num_draws, sites[name].shape) for name in names
    }


def _to_draws(value: Tensor, num_draws: int, shape: Size) -> Tensor:
    r"""Reshapes a vectorized value to ``(num_draws, *shape)``."""
    extra = value.dim() - len(shape)
    if extra > 0:
        value = value.reshape(math.prod(value.shape[:extra]), *value.shape[extra:])
    return value.expand(num_draws, *shape)


def _per_draw(log_prob: Tensor | float, num_draws: int, batch_ndim: int | None) -> Tensor:
    r"""Sums a site's log-density over everything but the draws dimension."""
    log_prob = torch.as_tensor(log_prob)
    if batch_ndim is None or log_prob.dim() < batch_ndim:
        return log_prob.sum().expand(num_draws)
    log_prob = log_prob.movedim(log_prob.dim() - batch_ndim, 0)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(num_draws)
