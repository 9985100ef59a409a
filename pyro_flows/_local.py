r"""The guide of local latents: sites inside a subsampled plate, one Gaussian per element.

:class:`~pyro_flows.AutoFlowGuide` puts its flow on the global latents only (those outside
every subsampled plate). Each local site gets, as in ``AutoNormal``, a location and a scale
per element of the plate's full size, in the unconstrained space of the site's support;
inside the plate Pyro indexes them by the subsample (parameters with ``event_dim``, which
Pyro subsamples). Two kinds, by the guide's ``local`` option:

- ``"mean_field"``: :math:`u_j \sim N(m_j, s_j^2)`, independent of everything else
  (``AutoNormal``'s guide for those sites);
- ``"structured"``: :math:`u_j \sim N(m_j + W_j y, s_j^2)`, with :math:`y` the global draw
  standardized by the start (:math:`(z - \mu_0) / s_0`): each element's location moves
  linearly with the globals, as in hierarchical models where a group's effect and the group
  scale are strongly coupled (Agrawal & Domke, 2021; Pyro's ``AutoStructured``).
"""

from __future__ import annotations

__all__ = ["LOCAL_KINDS", "LocalSites", "STLNormal", "check_subsample", "local_sites"]

from collections.abc import Iterator
from contextlib import ExitStack
from operator import attrgetter

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam
from pyro.ops.tensor_utils import periodic_repeat
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from ._structure import subsampled_plate
from .supports import site_bijection

LOCAL_KINDS = ("mean_field", "structured")


class STLNormal(dist.Normal):
    r"""A Normal that draws with ``loc`` and ``scale`` and scores with ``score_loc`` and
    ``score_scale``: the same values with the parameters' gradients stopped (the "sticking the
    landing" estimator for the local sites), the draw's path (here through the globals, for
    the structured guide) kept.

    Example:
        >>> loc = torch.zeros(2, requires_grad=True)
        >>> q = STLNormal(loc, torch.ones(2), loc.detach(), torch.ones(2))
        >>> q.log_prob(torch.ones(2)).requires_grad
        False
    """

    def __init__(self, loc: Tensor, scale: Tensor, score_loc: Tensor, score_scale: Tensor) -> None:
        super().__init__(loc, scale)
        self.score_loc, self.score_scale = score_loc, score_scale

    def expand(self, batch_shape: torch.Size, _instance: object = None) -> STLNormal:
        shape = torch.Size(batch_shape)
        return STLNormal(
            self.loc.expand(shape),
            self.scale.expand(shape),
            self.score_loc.expand(shape),
            self.score_scale.expand(shape),
        )

    def log_prob(self, value: Tensor) -> Tensor:
        return dist.Normal(self.score_loc, self.score_scale).log_prob(value)


class LocalSites:
    r"""The local sites of a guide: their parameters (held by the guide's modules) and their
    draws.

    Arguments:
        sites: The local sites of the prototype trace, in model order.
    """

    def __init__(self, sites: dict[str, dict]) -> None:
        self.sites = sites
        self.event_dims: dict[str, int] = {}
        self.shapes: dict[str, torch.Size] = {}  # unconstrained, as in the prototype trace

    def build(
        self,
        guide: PyroModule,
        init_scale: float | dict[str, Tensor],
        kind: str,
        global_dim: int,
        amortized: bool = False,
    ) -> None:
        r"""Creates the parameters, of each plate's full size, in ``guide.local_locs``,
        ``guide.local_scales`` (and ``guide.local_weights`` for ``"structured"``); none for
        an amortized guide (``guide.local_guide``), which gives them batch by batch."""
        for name, site in self.sites.items():
            init_loc = site_bijection(site["fn"].support).inv(site["value"].detach()).detach()
            self.event_dims[name] = site["fn"].event_dim + init_loc.dim() - site["value"].dim()
            self.shapes[name] = init_loc.shape
        if amortized:
            return
        guide.local_locs, guide.local_scales = PyroModule(), PyroModule()
        if kind == "structured":
            guide.local_weights = PyroModule()
        for name, site in self.sites.items():
            init_loc = site_bijection(site["fn"].support).inv(site["value"].detach()).detach()
            event_dim = self.event_dims[name]
            for frame in site["cond_indep_stack"]:
                full_size = frame.full_size or frame.size
                if full_size != frame.size:
                    init_loc = periodic_repeat(init_loc, full_size, frame.dim - event_dim)
            init_loc = init_loc.contiguous()
            scale = init_scale.get(name, 0.1) if isinstance(init_scale, dict) else init_scale
            init = torch.as_tensor(scale, dtype=init_loc.dtype).expand(init_loc.shape)
            positive = constraints.softplus_positive
            deep_setattr(guide.local_locs, name, PyroParam(init_loc, constraints.real, event_dim))
            deep_setattr(guide.local_scales, name, PyroParam(init.clone(), positive, event_dim))
            if kind == "structured":
                weights = init_loc.new_zeros(*init_loc.shape, global_dim)
                param = PyroParam(weights, constraints.real, event_dim + 1)
                deep_setattr(guide.local_weights, name, param)

    def draw(
        self,
        guide: PyroModule,
        plates: dict,
        standardized: Tensor | None,
        stl: bool,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> Iterator[tuple[str, Tensor]]:
        r"""Samples every local site inside its plates; yields names and constrained values.

        Arguments:
            guide: The guide holding the parameters.
            plates: The guide's plates, by name.
            standardized: The global draw standardized by the start, shaped as the guide's
                packed latent (for ``"structured"``), or :py:`None`.
            stl: Whether the log-densities see stopped-gradient parameters.
            args: The model's positional arguments (for an amortized guide).
            kwargs: The model's keyword arguments (for an amortized guide).
        """
        amortized = None
        if getattr(guide, "local_guide", None) is not None:
            amortized = self.encode(guide, plates, args, kwargs or {}, register=True)
        for name, site in self.sites.items():
            if amortized is not None:
                loc, scale = amortized[name]
                normal = dist.Normal(loc, scale)
                if stl:
                    normal = STLNormal(loc, scale, loc.detach(), scale.detach())
                with _within(site, plates):
                    yield name, self._sample(name, site, normal)
                continue
            with _within(site, plates):
                event_dim = self.event_dims[name]
                loc = _in_order(attrgetter(name)(guide.local_locs), site, plates, event_dim)
                scale = _in_order(attrgetter(name)(guide.local_scales), site, plates, event_dim)
                score = (loc.detach(), scale.detach())
                if standardized is not None:
                    weights = attrgetter(name)(guide.local_weights)
                    weights = _in_order(weights, site, plates, event_dim + 1)
                    loc = loc + _linear_in(weights, standardized, event_dim)
                    score_loc = score[0] + _linear_in(weights.detach(), standardized, event_dim)
                    score = (score_loc, score[1])
                normal = STLNormal(loc, scale, *score) if stl else dist.Normal(loc, scale)
                yield name, self._sample(name, site, normal)

    def encode(
        self, guide: PyroModule, plates: dict, args: tuple, kwargs: dict, register: bool
    ) -> dict[str, tuple[Tensor, Tensor]]:
        r"""Runs the amortized local guide on the model's arguments; returns each local
        site's location and scale, checked against the site's shape in the current plates.

        Arguments:
            guide: The guide, with its ``local_guide``.
            plates: The guide's plates, by name (their subsample sizes give the shapes).
            args: The model's positional arguments.
            kwargs: The model's keyword arguments.
            register: Whether to put the encoder's parameters in Pyro's param store (for
                SVI's optimizer), as :func:`pyro.module` does.
        """
        encoder = guide.local_guide
        if register:
            pyro.module(f"{guide._pyro_name}.local_guide", encoder)
        found = encoder(*args, **kwargs)
        if not isinstance(found, dict) or set(found) != set(self.sites):
            got = sorted(found) if isinstance(found, dict) else type(found).__name__
            raise ValueError(
                f"local_guide returned {got}: it must return a dict with one entry for each "
                f"local latent site, {sorted(self.sites)}, each a (loc, scale) pair."
            )
        result = {}
        for name, site in self.sites.items():
            pair = found[name]
            shape = self._batch_shape(name, site, plates)
            if not (
                isinstance(pair, tuple | list)
                and len(pair) == 2
                and all(isinstance(t, Tensor) and t.shape == shape for t in pair)
            ):
                got = type(pair).__name__
                if isinstance(pair, tuple | list):
                    got = [tuple(getattr(t, "shape", ())) for t in pair]
                raise ValueError(
                    f"local_guide returned {got} for local latent site {name!r}: give a "
                    f"(loc, scale) pair of tensors of shape {tuple(shape)} (the site's "
                    "unconstrained shape for this batch), scale positive."
                )
            result[name] = (pair[0], pair[1])
        return result

    def _batch_shape(self, name: str, site: dict, plates: dict) -> torch.Size:
        # The site's unconstrained shape with each plate at its current subsample size.
        shape = list(self.shapes[name])
        for frame in site["cond_indep_stack"]:
            plate = plates.get(frame.name)
            position = frame.dim - self.event_dims[name]
            if plate is not None and -len(shape) <= position and shape[position] != 1:
                shape[position] = plate.subsample_size
        return torch.Size(shape)

    def _sample(self, name: str, site: dict, normal: dist.Normal) -> Tensor:
        normal = normal.to_event(self.event_dims[name])
        infer = {"is_auxiliary": True}
        u = pyro.sample(f"{name}_unconstrained", normal, infer=infer)
        transform = site_bijection(site["fn"].support)
        value = transform(u)
        log_density = 0.0
        if pyro.poutine.get_mask() is not False:
            ladj = transform.log_abs_det_jacobian(u, value)
            log_density = -sum_rightmost(ladj, ladj.dim() - value.dim() + site["fn"].event_dim)
        delta = dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim)
        return pyro.sample(name, delta)

    def quantiles(
        self,
        guide: PyroModule,
        probs: Tensor,
        standardized: Tensor | None,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        r"""Quantiles of every local site over the plates' full sizes, constrained.

        Mean-field: the Normal's, mapped through the support (per coordinate, as
        ``AutoNormal``'s). Structured: of :math:`m_j + W_j y + s_j \epsilon` over the draws
        ``standardized`` of the globals (Monte Carlo), a chunk of elements at a time.
        Amortized: the encoder's Normals for the rows of the arguments given.
        """
        result = {}
        if getattr(guide, "local_guide", None) is not None:
            plates = guide._create_plates(*args, **(kwargs or {}))
            encoded = self.encode(guide, plates, args, kwargs or {}, register=False)
            for name, site in self.sites.items():
                loc, scale = (t.detach() for t in encoded[name])
                shape = (-1,) + (1,) * loc.dim()
                u = dist.Normal(loc, scale).icdf(probs.reshape(shape).to(loc))
                result[name] = site_bijection(site["fn"].support)(u)
            return result
        for name, site in self.sites.items():
            loc = attrgetter(name)(guide.local_locs).detach()
            scale = attrgetter(name)(guide.local_scales).detach()
            shape = (-1,) + (1,) * loc.dim()
            if standardized is None:
                u = dist.Normal(loc, scale).icdf(probs.reshape(shape).to(loc))
            else:
                weights = attrgetter(name)(guide.local_weights).detach()
                u = _structured_quantiles(loc, scale, weights, standardized, probs)
            result[name] = site_bijection(site["fn"].support)(u)
        return result


def check_subsample(plates: dict, sites: dict[str, dict]) -> None:
    r"""Raises a :py:`ValueError` where a plate of a local site subsamples with indices that
    cannot index its per-element parameters (e.g. from ``create_plates``): not a 1-D integer
    tensor, or out of :math:`[0, N)` for the plate's full size :math:`N`. (Indexing would
    otherwise fail with torch's bare message, or on a GPU with a device-side assertion.)"""
    names = {f.name for site in sites.values() for f in site["cond_indep_stack"]}
    for name in sorted(names & plates.keys()):
        plate = plates[name]
        indices = getattr(plate, "_indices", None)
        if indices is None:
            continue
        size = plate.size
        problem = None
        if not isinstance(indices, Tensor) or indices.dim() != 1:
            problem = f"of shape {tuple(getattr(indices, 'shape', ()))}"
        elif indices.dtype in (torch.bool,) or indices.is_floating_point():
            problem = f"of dtype {indices.dtype}"
        elif len(indices) and (indices.min() < 0 or indices.max() >= size):
            low, high = int(indices.min()), int(indices.max())
            problem = f"from {low} to {high}"
        if problem is not None:
            raise ValueError(
                f"Plate {name!r} subsamples local latent sites with indices {problem}: give a "
                f"1-D integer tensor of indices in [0, {size}) (the plate's full size), e.g. "
                f"pyro.plate({name!r}, {size}, subsample=torch.randperm({size})[:batch])."
            )


def _in_order(value: Tensor, site: dict, plates: dict, event_dim: int) -> Tensor:
    r"""Indexes a local parameter by its plates' subsamples where Pyro does not.

    Pyro indexes a parameter with ``event_dim`` inside a plate by the plate's subsample only
    where the subsample is smaller than the plate: a subsample of the plate's full size is
    taken to be in order. One in another order (a shuffled data loader's batch that holds the
    whole plate) would pair each element's parameters with another element's data; it is
    indexed here.
    """
    for frame in site["cond_indep_stack"]:
        plate = plates.get(frame.name)
        indices = getattr(plate, "_indices", None)
        if indices is None or plate.subsample_size < plate.size:
            continue
        indices = indices.to(value.device)
        if not torch.equal(indices, torch.arange(len(indices), device=value.device)):
            value = value.index_select(frame.dim - event_dim, indices)
    return value


def _within(site: dict, plates: dict) -> ExitStack:
    stack = ExitStack()
    for frame in site["cond_indep_stack"]:
        if frame.vectorized:
            stack.enter_context(plates[frame.name])
    return stack


def _linear_in(weights: Tensor, standardized: Tensor, event_dim: int) -> Tensor:
    r"""Returns :math:`W_j y` for every element: ``weights`` has the site's (subsampled) shape
    and the globals as last dimension; the leading (particle or draw) dimensions of ``y`` go
    left of the plate dimensions, which the globals' draw has as ones."""
    shape = weights.shape[:-1]
    batch_dim = len(shape) - event_dim
    lead = standardized.shape[:-1]
    lead = lead[: max(0, len(lead) - batch_dim)]
    y = standardized.reshape(*lead, *(1,) * len(shape), standardized.shape[-1])
    return (weights * y).sum(-1)


def _structured_quantiles(
    loc: Tensor, scale: Tensor, weights: Tensor, standardized: Tensor, probs: Tensor
) -> Tensor:
    draws = standardized.reshape(-1, standardized.shape[-1])
    generator = torch.Generator(device=loc.device).manual_seed(0)
    flat_loc, flat_scale = loc.reshape(-1), scale.reshape(-1)
    flat_weights = weights.reshape(-1, weights.shape[-1])
    chunk = max(1, 2**22 // len(draws))
    parts = []
    for start in range(0, len(flat_loc), chunk):
        stop = start + chunk
        noise = torch.randn(
            len(draws), len(flat_loc[start:stop]), generator=generator, dtype=loc.dtype
        ).to(loc.device)
        u = flat_loc[start:stop] + draws @ flat_weights[start:stop].mT
        u = u + flat_scale[start:stop] * noise
        parts.append(torch.quantile(u, probs.to(u), dim=0))
    return torch.cat(parts, -1).reshape(len(probs), *loc.shape)


def local_sites(prototype: Trace) -> dict[str, dict]:
    r"""The latent sites of a prototype trace inside a subsampled plate, in model order."""
    return {
        name: site
        for name, site in prototype.iter_stochastic_nodes()
        if subsampled_plate(site) is not None
    }
