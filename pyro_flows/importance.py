r"""Importance weights :math:`\log p(x, z) - \log q(z)` of guide draws, vectorized over
draws, and their statistics: Pareto-smoothed k-hat and ESS, ELBO and IW-ELBO."""

__all__ = [
    "ImportanceWeights",
    "khat_threshold",
    "log_importance_weights",
]

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import _draws
from ._structure import model_structure

FLAT = 0.01  # log weights all within this many nats: constant weights, k-hat = -inf


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
    vectorize: bool | None = None,
    **kwargs: Any,
) -> ImportanceWeights:
    r"""Draws from a guide and computes the log importance weights of the draws.

    The draws are made in vectorized runs (a plate over draws outside the model's plates,
    as Pyro's :func:`~pyro.infer.importance.vectorized_importance_weights` does), a chunk
    of draws at a time to bound memory. The first and last draws of the first chunk are
    recomputed one at a time; a model or guide that fails to run vectorized, or gives other
    numbers (a model that mixes draws, e.g. by summing over a leading dimension), is handled
    as `vectorize` says.

    Arguments:
        model: A Pyro model.
        guide: A guide for `model`: any Pyro autoguide or guide function.
        args: Positional arguments of the model and guide.
        num_samples: The number of draws.
        max_plate_nesting: The number of nested plates in the model. If :py:`None`, found by
            tracing the model once.
        chunk_size: The number of draws per vectorized run. If :py:`None`, chosen so that a
            run holds about a million site values.
        vectorize: If :py:`None`, a model that runs vectorized neither under a plate over
            draws nor under ``torch.func.vmap`` gets a warning
            and its draws are computed one at a time; if :py:`True`, it gets a
            :py:`ValueError`; if :py:`False`, draws are computed one at a time (slow)
            without trying.
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

    options = {"max_plate_nesting": max_plate_nesting, "chunk_size": chunk_size}
    return importance(model, guide, args, kwargs, num_samples, vectorize=vectorize, **options)[0]


def importance(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    *,
    max_plate_nesting: int | None = None,
    chunk_size: int | None = None,
    vectorize: bool | None = None,
) -> tuple[ImportanceWeights, bool, dict[str, int]]:
    r"""Like :func:`log_importance_weights`; also returns whether the draws were vectorized
    and, per site, the number of NaN or :math:`+\infty` log-density values."""

    _draws.check_options(num_samples, chunk_size, vectorize)
    with torch.no_grad(), warnings.catch_warnings():
        # Pyro's NaN warnings: non-finite weights are counted and reported instead.
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        structure = model_structure(
            model, guide, args, kwargs, max_plate_nesting=max_plate_nesting
        )
        names = structure.names("latent", "deterministic")
        log_weights, samples, nonfinite = [], {name: [] for name in names}, Counter()
        for chunk in _draws.chunks(
            model,
            guide,
            structure,
            num_samples,
            args,
            kwargs,
            chunk_size=chunk_size,
            vectorize=vectorize,
        ):
            log_weights.append(chunk.log_weight)
            for name in names:
                samples[name].append(chunk.posterior[name])
            nonfinite.update(chunk.nonfinite)
    weights = ImportanceWeights(
        torch.cat(log_weights), {name: torch.cat(values) for name, values in samples.items()}
    )
    return weights, chunk.vectorized, dict(nonfinite)


def khat_threshold(num_samples: int) -> float:
    r"""Returns the sample-size-aware k-hat threshold :math:`\min(1 - 1 / \log_{10} S, 0.7)`.

    Arguments:
        num_samples: The number of draws :math:`S`.

    Example:
        >>> round(khat_threshold(1000), 3), khat_threshold(4000)
        (0.667, 0.7)

    References:
        | Pareto Smoothed Importance Sampling (Vehtari et al., 2024)
        | https://arxiv.org/abs/1507.02646
    """

    return min(1 - 1 / math.log10(num_samples), 0.7) if num_samples > 1 else -math.inf


def _tied_tail(finite: np.ndarray, n: int) -> bool:
    r"""Whether the largest weights (the tail PSIS fits) take at most 4 distinct values.

    Rounding makes the weights of an (almost) exact guide take few distinct values; when the
    largest ones tie, PSIS has no tail to fit and ArviZ reports infinity. Tied largest
    weights are the opposite of a heavy tail: the weights are bounded.
    """

    tail = int(math.ceil(min(n / 5, 3 * math.sqrt(n))))
    return len(finite) > tail and len(np.unique(np.sort(finite)[-tail:])) <= 4


def _pareto_smooth(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    r"""Returns ArviZ's Pareto-smoothed, normalized log weights and their k-hat.

    The draws are independent (``r_eff = 1``). ArviZ 0.x's ``arviz.psislw`` takes log
    importance ratios; ArviZ 1.x's ``arviz_stats`` version takes log-likelihoods and negates
    them, so it is given the negated log weights.

    Arguments:
        log_weights: Finite log weights, shape :py:`(S,)`, float64.

    Example:
        >>> log_weights = np.random.default_rng(0).normal(size=1000)
        >>> smoothed, khat = _pareto_smooth(log_weights)
        >>> round(float(np.logaddexp.reduce(smoothed)), 6), khat < 0.5
        (0.0, True)

    References:
        | Pareto Smoothed Importance Sampling (Vehtari et al., 2024)
        | https://arxiv.org/abs/1507.02646
    """

    import arviz

    with np.errstate(over="ignore"):  # ArviZ's GPD fit overflows harmlessly
        if hasattr(arviz, "psislw"):
            smoothed, khat = arviz.psislw(log_weights, reff=1.0)
        else:
            from arviz_stats.base import array_stats

            smoothed, khat = array_stats.psislw(-log_weights, r_eff=1.0)
    smoothed = np.asarray(smoothed, dtype=np.float64)
    return smoothed - np.logaddexp.reduce(smoothed), float(khat)


def psis(lw: np.ndarray) -> dict[str, Any]:
    r"""Returns the k-hat (threshold), ESS, ELBO (and error) and smoothed log weights."""

    n = len(lw)
    finite = lw[np.isfinite(lw)]
    stats = {
        "khat_threshold": khat_threshold(n),
        "elbo": float(np.mean(lw)) if not np.isnan(lw).any() else math.nan,
        "elbo_se": float(np.std(lw, ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
    }
    if np.isnan(lw).any() or np.isposinf(lw).any() or len(finite) == 0:
        nan = np.full(n, np.nan)
        return stats | {"khat": math.nan, "ess": math.nan, "psis_log_weights": nan}
    if np.ptp(finite) < FLAT:
        smoothed, khat = lw - np.logaddexp.reduce(lw), -math.inf
    else:
        smoothed, khat = _pareto_smooth(lw)
        khat = khat if not _tied_tail(finite, n) else -math.inf
    ess = float(1.0 / np.sum(np.exp(2 * smoothed)))
    return stats | {"khat": khat, "ess": ess, "psis_log_weights": smoothed}


def iwelbo(
    lw: np.ndarray, num_particles: Sequence[int]
) -> tuple[dict[int, float], dict[int, float]]:
    r"""Returns the IW-ELBO per :math:`K`, from :math:`S / K` groups, and its standard error."""

    values, errors = {}, {}
    for k in num_particles:
        groups = len(lw) // k
        bounds = np.logaddexp.reduce(lw[: groups * k].reshape(groups, k), axis=1) - math.log(k)
        values[k] = float(np.mean(bounds))
        errors[k] = float(np.std(bounds, ddof=1) / math.sqrt(groups)) if groups > 1 else math.nan
    return values, errors
