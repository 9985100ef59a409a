r"""Fitted Pyro guide to ArviZ ``InferenceData``."""

__all__ = ["to_inference_data"]

import inspect
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from torch import Tensor

from . import _draws
from ._structure import Site, Structure, model_structure, user_model
from ._version import __version__
from .diagnostics import Diagnosis

RESERVED = frozenset({"chain", "draw"})  # ArviZ's names of the sample dimensions


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
    vectorize: bool | None = None,
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
      ``lp`` (model log-joint) and ``log_weight = lp - log_q``. Its attributes are
      :func:`pyro_flows.diagnose`'s results on these weights
      (:meth:`pyro_flows.Diagnosis.to_dict`: ``khat``, ``khat_threshold``, ``ess``,
      ``elbo``, ``iwelbo_<K>``, their errors, ``verdict`` and ``reason``), ``pareto_k``
      (the same as ``khat``), ``guide``, ``flow_config`` (JSON, for guides that have one)
      and the library versions.

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
        vectorize: What to do with a model that runs vectorized neither under a plate over
            draws nor under ``torch.func.vmap`` (found by running it on a chunk of draws and
            checking two draws against single-draw runs): if :py:`None`, warn and run it
            once per draw (slow); if :py:`True`, raise a :py:`ValueError`; if :py:`False`,
            run it once per draw without trying.
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
    model = _check(guide, model, coords, dims)
    _draws.check_options(num_samples, chunk_size, vectorize)
    structure = model_structure(model, guide, args, kwargs)
    if prior:
        _check_samplable(structure)
    options = {"chunk_size": chunk_size, "vectorize": vectorize, "prior": prior}
    options |= {"predictive": posterior_predictive, "log_likelihood": log_likelihood}
    groups, diagnosis = _draw(model, guide, structure, num_samples, args, kwargs, **options)
    observed = structure.names("observed")
    groups["observed_data"] = {name: _numpy(structure.sites[name].value) for name in observed}
    if constant_data is not None:
        groups["constant_data"] = {name: _numpy(value) for name, value in constant_data.items()}
    groups = {group: data for group, data in groups.items() if data}
    return _from_dict(
        groups,
        coords=coords,
        dims={**_plate_dims(structure.sites), **(dims or {})},
        attrs=_attrs(guide, diagnosis),
    )


def _draw(
    model: Callable,
    guide: Callable,
    structure: Structure,
    num_samples: int,
    args: tuple,
    kwargs: dict,
    *,
    log_likelihood: bool,
    **options: Any,
) -> tuple[dict[str, dict[str, np.ndarray]], Diagnosis]:
    r"""Returns the groups made of draws, and the diagnosis of their importance weights."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    nonfinite: Counter = Counter()
    start = 0
    for chunk in _draws.chunks(model, guide, structure, num_samples, args, kwargs, **options):
        for group, values in _groups(chunk, log_likelihood).items():
            _put(groups, group, values, start, num_samples)
        start += len(chunk.lp)
        nonfinite.update(chunk.nonfinite)
    diagnosis = Diagnosis.from_log_weights(  # what diagnose computes, on the same draws
        torch.from_numpy(groups["sample_stats"]["log_weight"][0]),
        {name: torch.from_numpy(v[0]) for name, v in groups.get("posterior", {}).items()},
        vectorized=chunk.vectorized,
        nonfinite=dict(nonfinite),
    )
    return groups, diagnosis


def _groups(chunk: _draws.Draws, log_likelihood: bool) -> dict[str, dict[str, Tensor]]:
    r"""Returns every group's values for one chunk of draws, keyed by group."""
    stats = {"log_q": chunk.log_q, "lp": chunk.lp, "log_weight": chunk.log_weight}
    groups = {
        "posterior": chunk.posterior,
        "posterior_predictive": chunk.posterior_predictive,
        "log_likelihood": chunk.log_likelihood if log_likelihood else {},
        "sample_stats": stats,
        "prior": chunk.prior,
        "prior_predictive": chunk.prior_predictive,
    }
    return {group: values for group, values in groups.items() if values}


def _check(guide: Callable, model: Callable | None, coords: Any, dims: Any) -> Callable:
    if not callable(guide):
        raise TypeError(f"guide must be a fitted Pyro guide, got {type(guide).__name__}.")
    if getattr(guide, "prototype_trace", True) is None:
        raise ValueError(
            f"The {type(guide).__name__} has not been run yet: fit it with SVI (or call it "
            "once with the model's arguments) before converting it."
        )
    for name, value in (("coords", coords), ("dims", dims)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}.")
    if model is None:
        if not hasattr(guide, "model"):
            raise ValueError(
                f"The {type(guide).__name__} has no model attribute: pass model=your_model."
            )
        model = user_model(guide)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}.")
    return model


def _check_samplable(structure: Structure) -> None:
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


def _attrs(guide: Callable, diagnosis: Diagnosis) -> dict[str, Any]:
    stats = diagnosis.to_dict()
    attrs = {
        **stats,
        "pareto_k": stats["khat"],
        "guide": type(guide).__name__,
        "pyro_flows_version": __version__,
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
    }
    if hasattr(guide, "flow_config"):
        attrs["flow_config"] = json.dumps(guide.flow_config, default=str, sort_keys=True)
    return attrs


def _from_dict(groups: dict[str, dict], *, coords: Any, dims: dict, attrs: dict) -> Any:
    r"""Calls :func:`arviz.from_dict` in the calling convention of the installed ArviZ."""
    import arviz

    if "data" in inspect.signature(arviz.from_dict).parameters:  # ArviZ 1.x
        group_attrs = {"/": attrs, "sample_stats": attrs}
        return arviz.from_dict(groups, coords=coords, dims=dims, attrs=group_attrs)
    return arviz.from_dict(
        **groups, coords=coords, dims=dims, attrs=attrs, sample_stats_attrs=attrs
    )


def _plate_dims(sites: Mapping[str, Site]) -> dict[str, list[str | None]]:
    r"""Returns ArviZ ``dims`` naming each site's plate dimensions after their plates.

    A plate of ``dim=d`` sits at position ``d`` counted from the right of the site's batch
    shape; it names that dimension when the sizes agree. Other dimensions (event dimensions,
    size-one broadcast dimensions) are left as :py:`None`, which ArviZ names
    ``<site>_dim_<i>``. A plate named ``chain`` or ``draw`` is renamed ``<plate>_plate``, as
    ArviZ uses these names for the sample dimensions.

    Arguments:
        sites: The model's sites for a single draw.

    Returns:
        A mapping from site names to dimension names, for the sites with a named dimension.

    Example:
        >>> import torch
        >>> import pyro.distributions as dist
        >>> plates = (("school", -1, 8),)
        >>> theta = Site("latent", torch.Size([8]), 0, plates, dist.Normal(0, 1), None)
        >>> _plate_dims({"theta": theta})
        {'theta': ['school']}
    """
    dims = {}
    for name, site in sites.items():
        names: list[str | None] = [None] * len(site.shape)
        batch_ndim = len(site.shape) - site.event_dim
        for plate, dim, size in site.plates:
            position = batch_ndim + dim
            if 0 <= position < batch_ndim and site.shape[position] == size:
                names[position] = f"{plate}_plate" if plate in RESERVED else plate
        if any(names):
            dims[name] = names
    return dims
