r"""Draws from a guide, replays the model on the draws, and sums log-densities per draw.

The one engine behind :func:`pyro_flows.to_inference_data` and :func:`pyro_flows.diagnose`
(through :func:`pyro_flows.log_importance_weights`):
:func:`~pyro_flows._structure.model_structure` finds the model's sites, :func:`chunks` draws
a chunk at a time, vectorized over draws (with the primitives of :mod:`pyro_flows._replay`).

The first chunk is checked against single-draw runs of its first and last draws. A model or
guide that fails to run vectorized, or runs but mixes draws, is handled as ``vectorize``
says: :py:`None` warns and runs one draw at a time, :py:`True` raises, :py:`False` runs one
draw at a time without trying.
"""

__all__ = ["HINT", "Draws", "check_options", "chunks"]

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ._checks import check_int
from ._replay import (
    ResampleObserved,
    draws_plate,
    log_probs,
    nonfinite,
    samples,
    to_draws,
    total,
    trace,
    traces,
)
from ._structure import Structure, log_likelihood, site_values

# What a model that does not broadcast over a leading dimension raises when run vectorized.
VECTORIZE_ERRORS = (RuntimeError, ValueError, IndexError, KeyError, TypeError, AssertionError)

HINT = (
    "Declare every batch dimension of the model with pyro.plate and index tensors from the "
    "right (x[..., i]) so that the model broadcasts over a leading draws dimension."
)


@dataclass(frozen=True)
class Draws:
    r"""Per-draw results of one chunk; every tensor has the draws as leading dimension.

    Arguments:
        posterior: Latent (constrained) and deterministic sites.
        log_likelihood: Pointwise log-densities of observed sites: unscaled, masked points 0.
        posterior_predictive: Observed sites drawn anew given each draw, if asked for.
        prior: Latent and deterministic sites drawn from the model alone, if asked for.
        prior_predictive: Observed sites drawn from the model alone, if asked for.
        site_log_prob: Every model site's log-density (scaled, masked), summed per draw.
        log_q: The guide's log-density of each draw, auxiliary sites included.
        lp: The model's log-joint of each draw.
        nonfinite: Per site, the number of NaN or :math:`+\infty` log-density values.
        vectorized: Whether the chunk was drawn in one vectorized run.
    """

    posterior: dict[str, Tensor]
    log_likelihood: dict[str, Tensor]
    posterior_predictive: dict[str, Tensor]
    prior: dict[str, Tensor]
    prior_predictive: dict[str, Tensor]
    site_log_prob: dict[str, Tensor]
    log_q: Tensor
    lp: Tensor
    nonfinite: dict[str, int]
    vectorized: bool

    @property
    def log_weight(self) -> Tensor:
        r"""The log importance weights :math:`\log p(x, z) - \log q(z)`."""
        return self.lp - self.log_q


class SetValues(Messenger):
    r"""Gives the named latent sample sites the given values instead of sampling them."""

    def __init__(self, values: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: Any) -> None:
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"], msg["done"] = self.values[msg["name"]], True


def check_options(num_samples: int, chunk_size: int | None, vectorize: bool | None) -> None:
    r"""Checks the options of :func:`chunks`, which every caller takes from its user.

    Example:
        >>> check_options(100, None, "yes")
        Traceback (most recent call last):
        ...
        TypeError: vectorize must be None, True or False, got 'yes'.
    """
    check_int("num_samples", num_samples, 1)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if vectorize not in (None, True, False):
        raise TypeError(f"vectorize must be None, True or False, got {vectorize!r}.")


def chunks(
    model: Callable,
    guide: Callable,
    structure: Structure,
    num_samples: int,
    args: tuple,
    kwargs: dict,
    *,
    chunk_size: int | None = None,
    vectorize: bool | None = None,
    predictive: bool = False,
    prior: bool = False,
) -> Iterator[Draws]:
    r"""Draws ``num_samples`` times from the guide, a chunk at a time, and replays the model.

    Arguments:
        model: The model.
        guide: The guide (any guide function, autoguide or ``GuideMessenger``).
        structure: The model's structure, from
            :func:`~pyro_flows._structure.model_structure`.
        num_samples: The number of draws (options checked by :func:`check_options`).
        args: Positional arguments of the model and guide.
        kwargs: Keyword arguments of the model and guide.
        chunk_size: Draws per vectorized run (see :meth:`Structure.chunk_size`).
        vectorize: :py:`None` tries a vectorized run and, if the model or guide does not
            broadcast over draws, warns and runs one draw at a time; :py:`True` raises a
            :py:`ValueError` instead; :py:`False` runs one draw at a time without trying.
        predictive: Whether to draw observed sites anew given each draw.
        prior: Whether to draw every site from the model alone too.

    Yields:
        The results of each chunk, in order.
    """
    run = DrawRunner(model, guide, structure, args, kwargs, predictive, prior)
    size = structure.chunk_size(num_samples, chunk_size)
    first = run.first(size) if vectorize is not False else None
    if isinstance(first, Draws):
        yield first
        del first  # the caller holds what it needs of it: keep one chunk in memory, not two
        for start in range(size, num_samples, size):
            yield run.chunk(min(size, num_samples - start), structure.max_plate_nesting + 1)[0]
        return
    if first is not None:
        _not_vectorized(first, vectorize)
    for _ in range(num_samples):
        yield run.chunk(1, None)[0]


def _not_vectorized(problem: str, vectorize: bool | None) -> None:
    if vectorize:
        raise ValueError(f"{problem} {HINT} Or pass vectorize=False (one run per draw, slow).")
    warnings.warn(
        f"{problem} {HINT} Running the model one draw at a time instead (slow): pass "
        "vectorize=False to skip the attempt, vectorize=True to make this an error.",
        stacklevel=4,
    )


@dataclass(frozen=True)
class DrawRunner:
    r"""A model and its guide, with their arguments: what every chunk of draws runs."""

    model: Callable
    guide: Callable
    structure: Structure
    args: tuple
    kwargs: dict
    predictive: bool = False
    prior: bool = False

    def chunk(self, n: int, batch_ndim: int | None) -> tuple[Draws, Trace]:
        r"""Draws ``n`` times from the guide (vectorized, or in one plain run), replays the
        model; returns the results and the guide's trace."""
        model, args, kwargs, structure = self.model, self.args, self.kwargs, self.structure
        latent, observed = structure.names("latent", "deterministic"), structure.names("observed")
        groups: dict[str, dict[str, Tensor]] = {}
        with torch.no_grad():
            with draws_plate(n, batch_ndim):
                model_trace, guide_trace = traces(model, self.guide, args, kwargs)
            if self.predictive:
                replayed = poutine.replay(model, trace=guide_trace)
                predicted = _resampled(replayed, n, batch_ndim, args, kwargs)
                groups["posterior_predictive"] = site_values(predicted, observed, structure, n)
            if self.prior:
                prior = _resampled(model, n, batch_ndim, args, kwargs)
                groups["prior"] = site_values(prior, latent, structure, n)
                groups["prior_predictive"] = site_values(prior, observed, structure, n)
        model_log_prob = log_probs(model_trace, n, batch_ndim)
        guide_log_prob = log_probs(guide_trace, n, batch_ndim)
        draws = Draws(
            posterior=site_values(model_trace, latent, structure, n),
            log_likelihood=log_likelihood(model_trace, observed, structure, n),
            posterior_predictive=groups.get("posterior_predictive", {}),
            prior=groups.get("prior", {}),
            prior_predictive=groups.get("prior_predictive", {}),
            site_log_prob=model_log_prob,
            log_q=total(guide_log_prob, n),
            lp=total(model_log_prob, n),
            nonfinite=nonfinite((model_trace, model_log_prob), (guide_trace, guide_log_prob)),
            vectorized=batch_ndim is not None,
        )
        return draws, guide_trace

    def first(self, size: int) -> Draws | str:
        r"""Returns the first chunk, vectorized and rechecked, or why it could not be."""
        try:
            draws, guide_trace = self.chunk(size, self.structure.max_plate_nesting + 1)
            for i in sorted({0, size - 1}):
                problem = self.recheck(draws, guide_trace, i)
                if problem is not None:
                    return problem
        except VECTORIZE_ERRORS as error:
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            return f"The model or guide failed to run vectorized over draws ({reason})."
        return draws

    def recheck(self, draws: Draws, guide_trace: Trace, i: int) -> str | None:
        r"""Reruns draw ``i`` of a vectorized chunk alone; returns where the two runs differ.

        The guide's sampled sites get draw ``i``'s values (``Delta`` sites, such as those an
        autoguide computes from its auxiliary latent, are recomputed), and the model is
        replayed on them. A model that runs vectorized but mixes draws (a sum over all
        dimensions, say) would otherwise give wrong numbers silently.
        """
        n, shapes = len(draws.lp), self.structure.guide_shapes
        given = {
            name: to_draws(site["value"], n, shapes[name])[i]
            for name, site in samples(guide_trace)
            if _sampled(site)
        }
        alone = replace(self, guide=SetValues(given)(self.guide), predictive=False, prior=False)
        with torch.random.fork_rng(devices=[]):
            single, _ = alone.chunk(1, None)
        if set(single.site_log_prob) != set(draws.site_log_prob):
            return "The model has other sites in a vectorized run than in a single-draw run."
        for name, log_prob in single.site_log_prob.items():
            pairs = [(draws.site_log_prob[name][i], log_prob[0])]
            if name in single.posterior:
                pairs.append((draws.posterior[name][i], single.posterior[name][0]))
            if not all(_close(a, b) for a, b in pairs):
                return (
                    f"Site {name!r} differs between the run vectorized over draws and a "
                    "single-draw run: the model does not broadcast over draws."
                )
        if not _close(draws.log_q[i], single.log_q[0]):
            return (
                "The guide's log-density differs between the run vectorized over draws and a "
                "single-draw run: the guide does not broadcast over draws."
            )
        return None


def _resampled(fn: Callable, n: int, batch_ndim: int | None, args: tuple, kwargs: dict) -> Trace:
    with draws_plate(n, batch_ndim):
        return trace(ResampleObserved()(fn), args, kwargs)


def _sampled(site: dict) -> bool:
    r"""Whether a guide site is drawn at random (not observed, not a ``Delta``)."""
    if site["is_observed"]:
        return False
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return bool((site["infer"] or {}).get("is_auxiliary")) or not isinstance(fn, Delta)


def _close(a: Tensor, b: Tensor) -> bool:
    b = b.to(a)
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)
