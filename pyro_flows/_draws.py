r"""Draws from a guide, replays the model on the draws, and sums log-densities per draw.

The one engine behind :func:`pyro_flows.to_inference_data` and :func:`pyro_flows.diagnose`
(through :func:`pyro_flows.log_importance_weights`):
:func:`~pyro_flows._structure.model_structure` finds the model's sites, :func:`chunks` draws
a chunk at a time, vectorized over draws, in the first of these ways that works:

1. the guide and the model under a plate over draws (the primitives of
   :mod:`pyro_flows._replay`), for models that broadcast over a leading dimension;
2. the guide under that plate, the model run on each draw under :func:`torch.func.vmap`
   (:mod:`pyro_flows._vmap`), for models written for one draw, such as a
   ``PyroModule[nn.Linear]`` with sampled weights; observed sites drawn anew (posterior
   predictive, prior) are drawn under :func:`torch.func.vmap` too where the distributions
   allow it, else one draw at a time;
3. one draw at a time, with a warning that says what keeps the model from broadcasting.

The first chunk is checked against single-draw runs of its first and last draws. A model or
guide that fails to run vectorized both ways, or runs but mixes draws, is handled as
``vectorize`` says: :py:`None` warns and runs one draw at a time, :py:`True` raises,
:py:`False` runs one draw at a time without trying.
"""

__all__ = ["HINT", "Draws", "check_options", "chunks"]

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.poutine import Trace
from pyro.poutine.guide import GuideMessenger
from torch import Tensor

from ._checks import check_int
from ._replay import (
    ResampleObserved,
    SetValues,
    draws_plate,
    log_probs,
    nonfinite,
    sampled,
    samples,
    to_draws,
    total,
    trace,
    traces,
)
from ._structure import Structure, log_likelihood, site_values
from ._vmap import (
    SAMPLING_ERRORS,
    culprit,
    layer_advice,
    reason,
    replay_draws,
    resample_draws,
)

# What a model that does not broadcast over a leading dimension raises when run vectorized
# (torch.func.vmap: RuntimeError, or NotImplementedError for what it has no rule for).
VECTORIZE_ERRORS = (
    RuntimeError,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    AssertionError,
    NotImplementedError,
)

PLATE, VMAP, SINGLE = "plate", "vmap", "single"  # how a chunk is drawn

HINT = (
    "Declare every batch dimension of the model with pyro.plate and index tensors from the "
    "right (x[..., i]) so that the model broadcasts over a leading draws dimension."
)

VMAP_HINT = (
    "(torch.func.vmap, the other way to vectorize, needs a model without .item(), Python "
    "control flow on tensor values, or in-place writes into tensors made outside it.)"
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


class Failure(NamedTuple):
    r"""Why a vectorized first chunk could not be used: the way it was drawn, what went
    wrong, and the error raised (if one was)."""

    mode: str
    problem: str
    error: BaseException | None


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
        vectorize: :py:`None` tries the vectorized runs (a plate over draws, then
            :func:`torch.func.vmap`) and, if neither works, warns and runs one draw at a time;
            :py:`True` raises a :py:`ValueError` instead; :py:`False` runs one draw at a time
            without trying.
        predictive: Whether to draw observed sites anew given each draw.
        prior: Whether to draw every site from the model alone too.

    Yields:
        The results of each chunk, in order.
    """
    run = DrawRunner(model, guide, structure, args, kwargs, predictive, prior)
    size = structure.chunk_size(num_samples, chunk_size)
    if vectorize is not False:
        first = run.first(size)
        if isinstance(first, tuple):
            mode, draws = first
            yield draws
            del draws  # the caller holds what it needs of it: keep one chunk in memory, not two
            for start in range(size, num_samples, size):
                yield run.chunk(min(size, num_samples - start), mode)[0]
            return
        _not_vectorized(first, model, vectorize)
    for _ in range(num_samples):
        yield run.chunk(1, SINGLE)[0]


def _not_vectorized(failures: list[Failure], model: Callable, vectorize: bool | None) -> None:
    problem = f"{failures[0].problem} {failures[1].problem}"
    advice = _advice(failures, model)
    if vectorize:
        raise ValueError(f"{problem} {advice} Or pass vectorize=False (one run per draw, slow).")
    warnings.warn(
        f"{problem} {advice} Running the model one draw at a time instead (slow): pass "
        "vectorize=False to skip the attempt, vectorize=True to make this an error.",
        stacklevel=4,
    )


def _advice(failures: list[Failure], model: Callable) -> str:
    r"""What to change so that the model vectorizes: the torch layer with sampled weights
    where one is found, else the plate and indexing advice."""
    found = culprit(failures[0].error, model)
    if found is None:
        vmap_raised = failures[1].error is not None
        return f"{HINT} {VMAP_HINT}" if vmap_raised else HINT
    how = layer_advice(found)
    return f"{found} To run it vectorized, {how}." if how else str(found)


def _attempt(mode: str, check: Callable[[], str | None]) -> Failure | None:
    r"""Runs ``check`` (a vectorized first chunk, rechecked); returns why it failed, if it
    did, in words that say which way (``mode``) was tried."""
    try:
        problem, error = check(), None
    except VECTORIZE_ERRORS as raised:
        problem, error = reason(raised), raised
    if problem is None:
        return None
    if mode == PLATE and error is not None:
        problem = f"The model or guide failed to run vectorized over draws ({problem})."
    elif mode == VMAP and error is not None:
        problem = f"Under torch.func.vmap, it failed too ({problem})."
    elif mode == VMAP:
        problem = f"Under torch.func.vmap too: {problem}"
    return Failure(mode, problem, error)


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
    loops: set[str] = field(default_factory=set)  # groups that vmap cannot draw

    def chunk(self, n: int, mode: str) -> tuple[Draws, Trace]:
        r"""Draws ``n`` times from the guide and replays the model, in the given way
        (:py:`"plate"`, :py:`"vmap"` or :py:`"single"`, a plain run of one draw); returns the
        results and the guide's trace."""
        if mode == VMAP:
            return self._vmapped(n)
        return self._plated(n, None if mode == SINGLE else self.batch_ndim)

    @property
    def batch_ndim(self) -> int:
        r"""The position of the plate over draws, counted from the right among batch dims."""
        return self.structure.max_plate_nesting + 1

    def _plated(self, n: int, batch_ndim: int | None) -> tuple[Draws, Trace]:
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

    def _vmapped(self, n: int) -> tuple[Draws, Trace]:
        r"""The guide under the plate over draws, the model under :func:`torch.func.vmap`."""
        if isinstance(poutine.unwrap(self.guide), GuideMessenger):
            raise NotImplementedError("a GuideMessenger guide runs the model itself")
        structure, args, kwargs = self.structure, self.args, self.kwargs
        names = {kind: structure.names(kind) for kind in ("observed", "deterministic")}
        with torch.no_grad():
            with draws_plate(n, self.batch_ndim):
                guide_trace = trace(self.guide, args, kwargs)
            values = {
                name: to_draws(guide_trace.nodes[name]["value"], n, structure.sites[name].shape)
                for name in structure.names("latent")
            }
            out = replay_draws(self.model, values, n, args, kwargs, **names)
            groups = self._vmapped_groups(values, n)
        guide_log_prob = log_probs(guide_trace, n, self.batch_ndim)
        counts = Counter(nonfinite((guide_trace, guide_log_prob)))
        counts.update({name: int(count.sum()) for name, count in out["nonfinite"].items()})
        posterior = {**values, **out["value"]}
        draws = Draws(
            posterior={
                name: posterior[name] for name in structure.names("latent", "deterministic")
            },
            log_likelihood={
                name: to_draws(log_lik, n, _pointwise_shape(structure, name))
                for name, log_lik in out["log_likelihood"].items()
            },
            site_log_prob=out["log_prob"],
            log_q=total(guide_log_prob, n),
            lp=total(out["log_prob"], n),
            nonfinite=dict(+counts),  # without zero counts
            vectorized=True,
            **groups,
        )
        return draws, guide_trace

    def _vmapped_groups(self, values: dict[str, Tensor], n: int) -> dict[str, dict[str, Tensor]]:
        r"""The posterior predictive and prior groups, drawn under :func:`torch.func.vmap`
        where the model's distributions allow it, else one draw at a time."""
        latent = self.structure.names("latent", "deterministic")
        observed = self.structure.names("observed")
        groups: dict[str, dict[str, Tensor]] = {
            "posterior_predictive": {},
            "prior": {},
            "prior_predictive": {},
        }
        if self.predictive:
            groups["posterior_predictive"] = self._resample(values, n, observed, "predictive")
        if self.prior:
            drawn = self._resample({}, n, latent + observed, "prior")
            groups["prior"] = {name: drawn[name] for name in latent}
            groups["prior_predictive"] = {name: drawn[name] for name in observed}
        return groups

    def _resample(
        self, values: dict[str, Tensor], n: int, names: list[str], group: str
    ) -> dict[str, Tensor]:
        args, kwargs, structure = self.args, self.kwargs, self.structure
        if group not in self.loops:
            try:
                drawn = resample_draws(self.model, values, n, names, args, kwargs)
                return {
                    name: to_draws(drawn[name], n, structure.sites[name].shape) for name in names
                }
            except SAMPLING_ERRORS:
                self.loops.add(group)  # e.g. Beta, Dirichlet: samplers vmap cannot run
        rows = []
        for i in range(n):
            model = SetValues({name: value[i] for name, value in values.items()})(self.model)
            rows.append(site_values(_resampled(model, 1, None, args, kwargs), names, structure, 1))
        return {name: torch.cat([row[name] for row in rows]) for name in names}

    def first(self, size: int) -> tuple[str, Draws] | list[Failure]:
        r"""Returns the first chunk and how it was drawn (with a plate over draws, else under
        :func:`torch.func.vmap`), rechecked; or why neither way could be used."""
        failures, found = [], {}

        def check(mode: str) -> str | None:
            draws, guide_trace = found[mode] = self.chunk(size, mode)
            ends = sorted({0, size - 1})
            return next(filter(None, (self.recheck(draws, guide_trace, i) for i in ends)), None)

        for mode in (PLATE, VMAP):
            failure = _attempt(mode, lambda mode=mode: check(mode))
            if failure is None:
                return mode, found[mode][0]
            failures.append(failure)
        return failures

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
            if sampled(site)
        }
        alone = replace(self, guide=SetValues(given)(self.guide), predictive=False, prior=False)
        with torch.random.fork_rng(devices=[]):
            single, _ = alone.chunk(1, SINGLE)
        if set(single.site_log_prob) != set(draws.site_log_prob):
            return "The model has other sites in a vectorized run than in a single-draw run."
        for name, log_prob in single.site_log_prob.items():
            pairs = [(draws.site_log_prob[name][i], log_prob[0])]
            if name in single.posterior:
                pairs.append((draws.posterior[name][i], single.posterior[name][0]))
            if not all(_close(a, b) for a, b in pairs):
                return _differs(f"Site {name!r}", "model")
        if not _close(draws.log_q[i], single.log_q[0]):
            return _differs("The guide's log-density", "guide")
        return None


def _differs(what: str, who: str) -> str:
    return (
        f"{what} differs between the run vectorized over draws and a single-draw run: the "
        f"{who} does not broadcast over draws."
    )


def _pointwise_shape(structure: Structure, name: str) -> torch.Size:
    site = structure.sites[name]
    return site.fn.log_prob(site.value).shape


def _resampled(fn: Callable, n: int, batch_ndim: int | None, args: tuple, kwargs: dict) -> Trace:
    with draws_plate(n, batch_ndim):
        return trace(ResampleObserved()(fn), args, kwargs)


def _close(a: Tensor, b: Tensor) -> bool:
    b = b.to(a)
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)
