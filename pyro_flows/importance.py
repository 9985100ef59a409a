r"""Importance weights :math:`\log p(x, z) - \log q(z)` of guide draws, vectorized over draws."""

__all__ = [
    "ImportanceWeights",
    "log_importance_weights",
]

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

BUDGET = 2**20  # site elements per vectorized chunk


class ImportanceWeights(NamedTuple):
    r"""Guide draws and their log importance weights.

    Arguments:
        log_weights: The log weights :math:`\log p(x, z_s) - \log q(z_s)`, with shape
            :py:`(num_samples,)`.
        samples: For every latent (and deterministic) site of the model, its values in the
            constrained space, with shape :py:`(num_samples, *site_shape)`.

    Example:
        >>> weights = ImportanceWeights(torch.zeros(3), {"z": torch.ones(3, 2)})
        >>> log_weights, samples = weights
        >>> samples["z"].shape
        torch.Size([3, 2])
    """

    log_weights: Tensor
    samples: dict[str, Tensor]


def log_importance_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 4000,
    max_plate_nesting: int | None = None,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> ImportanceWeights:
    r"""Draws from a guide and computes the log importance weights of the draws.

    The draws are made in one vectorized pass (a plate over draws outside the model's plates,
    as Pyro's :func:`~pyro.infer.importance.vectorized_importance_weights` does), split into
    chunks to bound memory. Two draws are recomputed one at a time; if they disagree with the
    vectorized pass (a model that mixes draws, e.g. by summing over a leading dimension), or
    the model cannot run vectorized, every draw is computed one at a time instead.

    Arguments:
        model: A Pyro model.
        guide: A guide for `model`: any Pyro autoguide or guide function.
        args: Positional arguments of the model and guide.
        num_samples: The number of draws.
        max_plate_nesting: The number of nested plates in the model. If :py:`None`, found by
            tracing the model once.
        chunk_size: The number of draws per vectorized pass. If :py:`None`, chosen so that a
            pass holds about a million site values.
        kwargs: Keyword arguments of the model and guide.

    Returns:
        The log weights and the draws of every latent site.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> guide = AutoNormal(model)
        >>> log_weights, samples = log_importance_weights(model, guide, num_samples=100)
        >>> log_weights.shape, samples["z"].shape
        (torch.Size([100]), torch.Size([100]))
    """

    return importance(model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size)[0]


def importance(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    max_plate_nesting: int | None = None,
    chunk_size: int | None = None,
) -> tuple[ImportanceWeights, bool, dict[str, int]]:
    r"""Like :func:`log_importance_weights`; also returns whether the pass was vectorized and,
    per site, the number of non-finite log-density values."""

    _check_int("num_samples", num_samples, 1)
    with torch.no_grad(), warnings.catch_warnings():
        # Pyro's NaN warnings: non-finite weights are counted and reported instead.
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        return _importance(model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size)


def _importance(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    max_plate_nesting: int | None,
    chunk_size: int | None,
) -> tuple[ImportanceWeights, bool, dict[str, int]]:
    model_trace, guide_trace = traces(model, guide, args, kwargs)
    _check_full_data(model_trace)
    shapes = latent_shapes(model_trace)
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting(model_trace, guide_trace)
    if chunk_size is None:
        size = sum(site["value"].numel() for site in _samples(model_trace, guide_trace))
        chunk_size = max(1, BUDGET // max(size, 1))
    _check_int("chunk_size", chunk_size, 1)
    _check_int("max_plate_nesting", max_plate_nesting, 0)
    found = None
    if not isinstance(poutine.unwrap(guide), Messenger):  # Pyro vectorizes guide functions
        try:
            found = [
                _vectorized(model, guide, args, kwargs, n, max_plate_nesting, shapes)
                for n in _chunks(num_samples, chunk_size)
            ]
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError):
            found = None
    guide_shapes = {site["name"]: site["value"].shape for site in _samples(guide_trace)}
    if found is None or not _agrees(model, guide, args, kwargs, found[0], guide_shapes):
        found = [_single(model, guide, args, kwargs, shapes) for _ in range(num_samples)]
        vectorized = False
    else:
        vectorized = True
    log_weights = torch.cat([part[0] for part in found])
    samples = {name: torch.cat([part[1][name] for part in found]) for name in shapes}
    problems: dict[str, int] = {}
    for part in found:
        for name, count in part[2].items():
            problems[name] = problems.get(name, 0) + count
    return ImportanceWeights(log_weights, samples), vectorized, problems


def traces(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    r"""Traces the guide, and the model replayed against it (or a Pyro GuideMessenger)."""

    if isinstance(poutine.unwrap(guide), Messenger):
        guide(*args, **kwargs)
        model_trace, guide_trace = poutine.unwrap(guide).get_traces()
    else:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def latent_shapes(model_trace: Trace) -> dict[str, torch.Size]:
    r"""The shapes of the model's latent and deterministic sites, in trace order."""

    shapes = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("is_auxiliary"):
            continue
        if not site["is_observed"] or site["infer"].get("_deterministic"):
            shapes[name] = site["value"].shape
    return shapes


def plate_nesting(*traces: Trace) -> int:
    r"""The deepest plate dimension used by any site of the traces."""

    dims = [
        -frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def _check_full_data(trace: Trace) -> None:
    r"""Raises a :py:`ValueError` if a plate subsamples: weights need the whole likelihood."""

    for site in _samples(trace):
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"plate {frame.name!r} subsamples {frame.size} of {frame.full_size} at site "
                    f"{site['name']!r}: importance weights need the full data; run the model "
                    "without subsample_size (or pass all the data) to diagnose it"
                )


def _samples(*traces: Trace) -> list[dict]:
    return [site for trace in traces for site in trace.nodes.values() if site["type"] == "sample"]


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _nonfinite(*traces: Trace) -> dict[str, int]:
    r"""Counts NaN and :math:`+\infty` log-density values per site (:math:`-\infty` is a zero
    density, a legitimate weight)."""

    counts = {}
    for site in _samples(*traces):
        log_prob = site.get("log_prob")
        if isinstance(log_prob, Tensor):
            count = int((torch.isnan(log_prob) | (log_prob == math.inf)).sum())
            if count:
                counts[site["name"]] = count
    return counts


def _vectorized(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    n: int,
    nesting: int,
    shapes: dict[str, torch.Size],
) -> tuple[Tensor, dict[str, Tensor], dict[str, int], Trace]:
    log_weights, model_trace, guide_trace = vectorized_importance_weights(
        model, guide, *args, num_samples=n, max_plate_nesting=nesting, **kwargs
    )
    samples = {
        name: model_trace.nodes[name]["value"].reshape(n, *shape) for name, shape in shapes.items()
    }
    problems = _nonfinite(model_trace, guide_trace)
    return log_weights.reshape(n), samples, problems, guide_trace


def _single(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    shapes: dict[str, torch.Size],
) -> tuple[Tensor, dict[str, Tensor], dict[str, int]]:
    model_trace, guide_trace = traces(model, guide, args, kwargs)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_weight = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
    samples = {name: model_trace.nodes[name]["value"][None] for name in shapes}
    return log_weight.reshape(1), samples, _nonfinite(model_trace, guide_trace)


def _agrees(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    part: tuple,
    shapes: dict[str, torch.Size],
) -> bool:
    r"""Recomputes the first and last draws of a vectorized pass one at a time."""

    log_weights, _, _, guide_trace = part
    sites = [site for site in _samples(guide_trace) if not site["is_observed"]]
    if any(site["infer"].get("is_auxiliary") for site in sites):
        sites = [site for site in sites if site["infer"].get("is_auxiliary")]
    n = len(log_weights)
    for i in {0, n - 1}:
        draw = Trace()
        try:
            for site in sites:
                value = site["value"].reshape(n, -1)[i].reshape(shapes[site["name"]])
                draw.add_node(site["name"], type="sample", is_observed=False, value=value)
                draw.nodes[site["name"]]["infer"] = site["infer"]
        except (RuntimeError, KeyError):
            return False
        model_trace, single_trace = traces(model, poutine.replay(guide, trace=draw), args, kwargs)
        expected = model_trace.log_prob_sum() - single_trace.log_prob_sum()
        if not _close(float(log_weights[i]), float(expected)):
            return False
    return True


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= 1e-3 * max(1.0, abs(a), abs(b))
