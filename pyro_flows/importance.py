r"""Importance weights :math:`\log p(x, z) - \log q(z)` of guide draws, vectorized over draws."""

__all__ = [
    "ImportanceWeights",
    "log_importance_weights",
]

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _draws


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
        vectorize: If :py:`None`, a model that does not broadcast over draws gets a warning
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

    _draws.check_int("num_samples", num_samples, 1)
    if chunk_size is not None:
        _draws.check_int("chunk_size", chunk_size, 1)
    with torch.no_grad(), warnings.catch_warnings():
        # Pyro's NaN warnings: non-finite weights are counted and reported instead.
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        structure = _draws.inspect(model, guide, args, kwargs, max_plate_nesting=max_plate_nesting)
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
