r"""Fitted Pyro guide to ArviZ ``InferenceData``."""

__all__ = ["to_inference_data"]

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from torch import Tensor

from . import _draws
from ._plates import plate_dims

CHUNK_ELEMENTS = 2**20


def to_inference_data(
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    model: Callable | None = None,
    coords: Mapping[str, Sequence | np.ndarray] | None = None,
    dims: Mapping[str, Sequence[str | None]] | None = None,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    prior: bool = False,
    constant_data: Mapping[str, Any] | None = None,
    chunk_size: int | None = None,
    vectorize: bool = True,
    **kwargs: Any,
) -> Any:
    r"""Converts a fitted Pyro guide to ArviZ ``InferenceData``.

    The guide's draws are replayed through the model, vectorized over draws and a chunk of
    draws at a time, and the results are handed to :func:`arviz.from_dict`, which returns
    ``InferenceData`` on ArviZ 0.x and a ``DataTree`` on ArviZ 1.x. Groups:

    - ``posterior``: latent sites in their constrained space and ``pyro.deterministic``
      sites, shaped ``(chain=1, draw, *site_shape)``;
    - ``posterior_predictive``: observed sites simulated from the model given each draw;
    - ``log_likelihood``: the pointwise log-density of each observed site (event dimensions
      summed, masked points zero), for :func:`arviz.loo` and :func:`arviz.compare`;
    - ``observed_data``, and ``constant_data`` when given;
    - ``prior`` and ``prior_predictive`` when ``prior=True``;
    - ``sample_stats``: per draw ``log_q`` (guide log-density, auxiliary latents included),
      ``lp`` (model log-joint) and ``log_weight = lp - log_q``, with attributes ``elbo``
      (mean of ``log_weight``), ``pareto_k`` (PSIS :math:`\hat{k}` of the weights, by
      ArviZ's PSIS), ``guide``, ``flow_config`` (JSON, for guides that have one) and the
      library versions.

    Dimensions created by a ``pyro.plate`` are named after the plate, with coordinates
    ``0, 1, ...``; ``dims`` and ``coords`` override them per variable and per dimension.
    Latent sites are never drawn from the prior (unless ``prior=True``), so models with
    improper priors (``ImproperUniform``) work.

    Arguments:
        guide: A fitted guide, such as any Pyro autoguide.
        args: Positional arguments of the model (and guide).
        num_samples: The number of draws.
        model: The model. Defaults to ``guide.model`` without Pyro's initialization wrapper.
        coords: Coordinates of dimensions, as in :func:`arviz.from_dict`.
        dims: Dimension names of variables, as in :func:`arviz.from_dict`.
        posterior_predictive: Whether to make the ``posterior_predictive`` group.
        log_likelihood: Whether to make the ``log_likelihood`` group.
        prior: Whether to make the ``prior`` and ``prior_predictive`` groups.
        constant_data: Variables for the ``constant_data`` group.
        chunk_size: The number of draws per model run. If :py:`None`, as many as keep a
            chunk's site values and log-densities near :math:`2^{20}` numbers (about 260
            draws of a model with 1,000 observations).
        vectorize: Whether to run the model on a chunk of draws at once. Models that do
            not broadcast over a leading batch dimension need :py:`False` (one run per draw).
        kwargs: Keyword arguments of the model (and guide).

    Returns:
        What :func:`arviz.from_dict` returns: ``InferenceData`` (ArviZ 0.x) or ``DataTree``.

    Example:
        >>> import pyro, torch
        >>> import pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("school", len(y)):
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.tensor([1.0, 2.0, 3.0])
        >>> guide = AutoNormal(model)
        >>> optim = pyro.optim.Adam({"lr": 0.1})
        >>> svi = pyro.infer.SVI(model, guide, optim, pyro.infer.Trace_ELBO())
        >>> losses = [svi.step(y) for _ in range(100)]
        >>> idata = to_inference_data(guide, y, num_samples=200)
        >>> idata.posterior["mu"].shape
        (1, 200)
        >>> idata.log_likelihood["obs"].dims
        ('chain', 'draw', 'school')
    """
    model = _check(guide, model, num_samples, chunk_size, coords, dims)
    structure = _draws.inspect(guide, model, args, kwargs)
    if prior:
        _check_samplable(structure)
    groups: dict[str, dict[str, np.ndarray]] = {}
    step = _chunk_size(structure, num_samples, chunk_size) if vectorize else 1
    options = {"vectorize": vectorize, "predictive": posterior_predictive, "prior": prior}
    for start in range(0, num_samples, step):
        size = min(step, num_samples - start)
        chunk = _chunk(guide, model, structure, size, args, kwargs, first=start == 0, **options)
        for group, values in chunk.items():
            if group != "log_likelihood" or log_likelihood:
                _put(groups, group, values, start, num_samples)
    observed = structure.names("observed")
    groups["observed_data"] = {name: _numpy(structure.sites[name].value) for name in observed}
    if constant_data is not None:
        groups["constant_data"] = {name: _numpy(value) for name, value in constant_data.items()}
    groups = {group: data for group, data in groups.items() if data}
    attrs = _attrs(guide, groups["sample_stats"]["log_weight"][0])
    return _from_dict(
        groups, coords=coords, dims={**plate_dims(structure.sites), **(dims or {})}, attrs=attrs
    )


def _chunk(
    guide: Callable,
    model: Callable,
    structure: _draws.Structure,
    size: int,
    args: tuple,
    kwargs: dict,
    *,
    first: bool,
    vectorize: bool,
    predictive: bool,
    prior: bool,
) -> dict[str, dict[str, Tensor]]:
    r"""Returns every group's values for one chunk of draws, keyed by group."""
    try:
        draws = _draws.draw(
            guide, model, structure, size, args, kwargs, vectorize=vectorize, predictive=predictive
        )
        if vectorize and first:
            _draws.check_first_draw(model, structure, draws, args, kwargs)
    except (RuntimeError, IndexError) as error:
        if not vectorize:
            raise
        reason = str(error).splitlines()[0]
        raise ValueError(
            f"The model failed to run vectorized over draws ({reason}). {_draws.HINT}"
        ) from error
    stats = {"log_q": draws.log_q, "lp": draws.lp, "log_weight": draws.lp - draws.log_q}
    groups = {
        "posterior": draws.posterior,
        "posterior_predictive": draws.posterior_predictive,
        "log_likelihood": draws.log_likelihood,
        "sample_stats": stats,
    }
    if prior:
        latent, observed = _draws.draw_prior(
            model, structure, size, args, kwargs, vectorize=vectorize
        )
        groups.update(prior=latent, prior_predictive=observed)
    return groups


def _check(
    guide: Callable,
    model: Callable | None,
    num_samples: int,
    chunk_size: int | None,
    coords: Any,
    dims: Any,
) -> Callable:
    if not callable(guide):
        raise TypeError(f"guide must be a fitted Pyro guide, got {type(guide).__name__}.")
    if getattr(guide, "prototype_trace", True) is None:
        raise ValueError(
            f"The {type(guide).__name__} has not been run yet: fit it with SVI (or call it "
            "once with the model's arguments) before converting it."
        )
    for name, value, least in (("num_samples", num_samples, 1), ("chunk_size", chunk_size, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
        if value is not None and value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}.")
    for name, value in (("coords", coords), ("dims", dims)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}.")
    if model is None:
        if not hasattr(guide, "model"):
            raise ValueError(
                f"The {type(guide).__name__} has no model attribute: pass model=your_model."
            )
        model = _draws.user_model(guide)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}.")
    return model


def _check_samplable(structure: _draws.Structure) -> None:
    for name in structure.names("latent"):
        fn = structure.sites[name].fn
        try:
            with torch.no_grad():
                fn.sample()
        except NotImplementedError as error:
            raise ValueError(
                f"prior=True is not possible: latent site '{name}' has a prior that cannot be "
                f"sampled ({type(fn).__name__}, an improper prior). "
                "Pass prior=False; the other groups do not need prior draws."
            ) from error


def _chunk_size(structure: _draws.Structure, num_samples: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return min(chunk_size, num_samples)
    per_draw = sum(2 * math.prod(site.shape) for site in structure.sites.values())
    return max(1, min(num_samples, CHUNK_ELEMENTS // max(1, per_draw)))


def _put(
    groups: dict, group: str, values: Mapping[str, Tensor], start: int, num_samples: int
) -> None:
    r"""Writes a chunk into preallocated ``(1, num_samples, ...)`` arrays."""
    arrays = groups.setdefault(group, {})
    for name, value in values.items():
        array = value.detach().cpu().numpy()
        if name not in arrays:
            arrays[name] = np.empty((1, num_samples, *array.shape[1:]), dtype=array.dtype)
        arrays[name][0, start : start + len(array)] = array


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _attrs(guide: Callable, log_weight: np.ndarray) -> dict[str, Any]:
    from pyro_flows import __version__

    attrs = {
        "elbo": float(np.mean(log_weight)),
        "pareto_k": _pareto_k(log_weight),
        "guide": type(guide).__name__,
        "pyro_flows_version": __version__,
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
    }
    if hasattr(guide, "flow_config"):
        attrs["flow_config"] = json.dumps(guide.flow_config, default=str, sort_keys=True)
    return attrs


def _pareto_k(log_weight: np.ndarray) -> float:
    r"""Returns the PSIS :math:`\hat{k}` of log importance weights, by ArviZ's PSIS."""
    import arviz

    log_weight = np.asarray(log_weight, dtype=np.float64)
    if hasattr(arviz, "psislw"):  # ArviZ 0.x takes log importance ratios
        _, khat = arviz.psislw(log_weight)
    else:  # ArviZ 1.x: arviz-stats negates its input (it expects log-likelihoods)
        from arviz_stats.base import array_stats

        _, khat = array_stats.psislw(-log_weight)
    return float(khat)


def _from_dict(groups: dict[str, dict], *, coords: Any, dims: dict, attrs: dict) -> Any:
    r"""Calls :func:`arviz.from_dict` in the calling convention of the installed ArviZ."""
    import arviz

    if "data" in inspect.signature(arviz.from_dict).parameters:  # ArviZ 1.x
        group_attrs = {"/": attrs, "sample_stats": attrs}
        return arviz.from_dict(groups, coords=coords, dims=dims, attrs=group_attrs)
    return arviz.from_dict(
        **groups, coords=coords, dims=dims, attrs=attrs, sample_stats_attrs=attrs
    )
