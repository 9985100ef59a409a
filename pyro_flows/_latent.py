r"""The latent sites of a model packed into one unconstrained vector, and the way back.

:class:`PackedLatent` is what :class:`~pyro_flows.AutoFlowGuide` places its flow on and what
the starts (:func:`~pyro_flows.laplace_start`) search over: every latent site mapped to the
reals by :func:`~pyro_flows.supports.site_bijection` of its support, flattened, site after
site in model order. Sites whose support depends on other latents are mapped through the
support the model gives them for the upstream values (:mod:`pyro_flows.supports`).

Elements that ``obs_mask`` samples and the model throws away are left out of the vector and
held at the observed values: they have no density in the model, so a guide's entropy alone
would drive them without bound (under an affine flow they reached 1e9 in 1,500 steps, and
the other coordinates, which the flow's layers condition on them, lost their accuracy).
"""

from __future__ import annotations

__all__ = ["PackedLatent", "explained_setup_errors"]

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.trace_struct import Trace
from torch import Size, Tensor

from ._checks import MASK_ADVICE, check_data, nonfinite_arguments
from ._guard import is_invalid_value_error
from ._replay import log_probs, per_draw, total, trace
from ._structure import observed_partner, plate_nesting, subsampled_plate
from ._vmap import vmapped
from .errors import DataError
from .supports import (
    ConstrainMessenger,
    dependent_support_sites,
    site_bijection,
    trace_with_leaf_latents,
)


class PackedLatent:
    r"""The latent sites of a model as one unconstrained vector.

    Arguments:
        model: The model (without Pyro's initialization wrapper).
        prototype: A trace of the model's latent sites at their initial values, as an
            autoguide's ``prototype_trace``.
        args: The model's positional arguments.
        kwargs: The model's keyword arguments.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> latent = PackedLatent.from_model(model, lambda site: site["fn"].mean)
        >>> latent.dim, latent.initial()
        (3, tensor([0.5000, 0.0000, 0.0000]))
        >>> sorted(name for name, _, _ in latent.constrain(torch.zeros(3), model, (), {}))
        ['s', 'x']
    """

    def __init__(
        self,
        model: Callable,
        prototype: Trace,
        args: tuple,
        kwargs: dict,
        local: frozenset[str] = frozenset(),
    ) -> None:
        self.sites = {
            name: site for name, site in prototype.iter_stochastic_nodes() if name not in local
        }
        self.transforms = {
            name: site_bijection(site["fn"].support) for name, site in self.sites.items()
        }
        self.shapes = {
            name: self.transforms[name].inv(site["value"]).shape
            for name, site in self.sites.items()
        }
        self.live: dict[str, Tensor] = {}  # per site with held elements: which are packed
        self.fill: dict[str, Tensor] = {}  # and the unconstrained values of the held ones
        self.discarded: dict[str, Tensor] = {}  # the held elements, in the site's batch shape
        self.sizes = {name: shape.numel() for name, shape in self.shapes.items()}
        if self.dim == 0 and local:
            raise ValueError(
                f"Every latent site of the model ({', '.join(sorted(local))}) is inside a "
                "subsampled plate: there are no global latents for a flow. Use AutoNormal "
                "(its guide for local sites is AutoFlowGuide's)."
            )
        if self.dim == 0:
            raise RuntimeError("no latent elements")  # explained by explained_setup_errors
        _check_subsampled(self.sites)
        values = {name: site["value"] for name, site in prototype.iter_stochastic_nodes()}
        trace = trace_with_leaf_latents(model, values, *args, **kwargs)
        check_data(trace, model, args, kwargs)
        self.dependent = frozenset(dependent_support_sites(trace, self.sites))
        _check_local_supports(dependent_support_sites(trace, local))
        self.max_plate_nesting = plate_nesting(trace.nodes.values())
        self.subsampled = next(
            (
                (name, frame)
                for name, site in trace.nodes.items()
                if site["type"] == "sample"
                for frame in [subsampled_plate(site)]
                if frame is not None
            ),
            None,
        )  # a site in a subsampled plate and the plate: the density changes between calls
        self._way, self._checked = 0, False  # how log_densities evaluates rows (see there)
        self._hold_discarded_elements(trace)

    @classmethod
    def from_model(
        cls,
        model: Callable,
        init_loc_fn: Callable[[dict], Tensor],
        *args: object,
        **kwargs: object,
    ) -> PackedLatent:
        r"""Traces the model at ``init_loc_fn``'s values, as an autoguide's set-up does.

        Arguments:
            model: The model.
            init_loc_fn: A Pyro init strategy.
            args: The model's positional arguments.
            kwargs: The model's keyword arguments.
        """
        with explained_setup_errors(model, args, kwargs) as prototype:
            initialized = poutine.block(InitMessenger(init_loc_fn)(model), prototype_hide_fn)
            prototype.trace = poutine.block(poutine.trace(initialized).get_trace)(*args, **kwargs)
            return cls(model, prototype.trace, args, kwargs)

    @property
    def dim(self) -> int:
        r"""The number of packed coordinates."""
        return sum(self.sizes.values())

    def _hold_discarded_elements(self, trace: Trace) -> None:
        found = _discarded_elements(trace)
        if sum(int(discarded.sum()) for discarded, _ in found.values()) >= self.dim:
            return  # nothing else to fit: keep them
        for name, (discarded, data) in found.items():
            fill = self.transforms[name].inv(data)
            event_shape = fill.shape[discarded.dim() :]
            live = ~discarded.reshape(discarded.shape + (1,) * len(event_shape))
            self.live[name] = live.expand(fill.shape)
            self.fill[name], self.discarded[name] = fill.detach(), discarded
            self.sizes[name] = int(self.live[name].sum())

    def initial(self) -> Tensor:
        r"""Returns the packed coordinates of the prototype's values (the initial point)."""
        parts = [
            self.transforms[name].inv(site["value"].detach()).reshape(-1)
            for name, site in self.sites.items()
        ]
        return self.live_coordinates(torch.cat(parts))

    def live_coordinates(self, full: Tensor) -> Tensor:
        r"""Returns the packed coordinates of a vector over every unconstrained element."""
        if not self.live:
            return full
        parts = full.split([shape.numel() for shape in self.shapes.values()])
        return torch.cat(
            [
                part[self.live[name].reshape(-1)] if name in self.live else part
                for name, part in zip(self.shapes, parts, strict=True)
            ]
        )

    def unpack(self, latent: Tensor) -> Iterator[tuple[dict, Tensor]]:
        r"""Yields each prototype site and its unconstrained value, in the site's dtype.

        A batch shape of ``latent`` goes to the left of each site's shape (Pyro's
        ``AutoContinuous._unpack_latent`` convention, which ``NeuTraReparam`` relies on).
        """
        batch_shape, start = latent.shape[:-1], 0
        for name, site in self.sites.items():
            shape = self.shapes[name]
            event_dim = site["fn"].event_dim + len(shape) - site["value"].dim()
            full = torch.broadcast_shapes(shape, batch_shape + (1,) * event_dim)
            values = latent[..., start : start + self.sizes[name]]
            if name in self.live:
                value = _scatter_live(self.fill[name], self.live[name], values, full)
            else:
                value = values.reshape(full)
            yield site, value.to(site["value"].dtype)
            start += self.sizes[name]

    def constrain(
        self, latent: Tensor, model: Callable, args: tuple, kwargs: dict
    ) -> Iterator[tuple[str, Tensor, Tensor | float]]:
        r"""Yields each site's name, constrained value and the log-density that makes a
        density on ``latent`` one on the constrained values: :math:`-\log |\det J|` per
        element of the site's plates (0 for held elements, and inside
        ``poutine.mask(mask=False)``).

        The model is run (blocked) only when some support depends on other latents.
        """
        compute_density = poutine.get_mask() is not False
        if self.dependent:
            unconstrained = {site["name"]: u for site, u in self.unpack(latent)}
            with poutine.block(), ConstrainMessenger(unconstrained) as messenger:
                model(*args, **kwargs)
            found = ((n, v, -ladj) for n, (v, ladj) in messenger.values.items())
        else:
            found = self._constrain_fixed(latent)
        for name, value, log_density in found:
            if not compute_density:
                log_density = 0.0
            elif name in self.discarded:  # held at a constant: no density
                log_density = log_density.masked_fill(self.discarded[name], 0.0)
            yield name, value, log_density

    def _constrain_fixed(self, latent: Tensor) -> Iterator[tuple[str, Tensor, Tensor]]:
        for site, u in self.unpack(latent):
            transform = self.transforms[site["name"]]
            value = transform(u)
            ladj = transform.log_abs_det_jacobian(u, value)
            ladj = sum_rightmost(ladj, ladj.dim() - value.dim() + site["fn"].event_dim)
            yield site["name"], value, -ladj

    def log_density(self, latent: Tensor, model: Callable, args: tuple, kwargs: dict) -> Tensor:
        r"""Returns the model's log joint density of the packed coordinates (log-Jacobians
        included), differentiable; ``latent`` has shape :math:`(D,)`."""
        values, log_jacobian = {}, latent.new_zeros(())
        with poutine.block():
            for name, value, log_density in self.constrain(latent, model, args, kwargs):
                values[name] = value
                log_jacobian = log_jacobian - torch.as_tensor(log_density).sum()
            conditioned = poutine.condition(model, values)
            return trace(conditioned, args, kwargs).log_prob_sum() + log_jacobian

    def log_densities(self, latent: Tensor, model: Callable, args: tuple, kwargs: dict) -> Tensor:
        r"""Returns :meth:`log_density` of every row of ``latent``, with shape :math:`(N, D)`.

        The rows are evaluated in one run of the model under a plate over rows (as Pyro's
        vectorized particles are) where the model broadcasts over it, else under
        :func:`torch.func.vmap` (torch layers with sampled weights), else one row at a time.
        The first batch of two rows or more is checked against single-row runs, and the way
        that gives the same numbers is kept for the later calls.
        """
        for way in self._ways[self._way :]:
            try:
                batched = way(self, latent, model, args, kwargs)
            except _NOT_BATCHED:
                batched = None
            if batched is not None and not self._checked and len(latent) > 1:
                ends = [0, len(latent) - 1]
                rows = [self.log_density(latent[i], model, args, kwargs) for i in ends]
                single = torch.stack(rows)
                agree = torch.allclose(batched[ends], single, rtol=1e-4, atol=1e-3, equal_nan=True)
                self._checked = bool(agree)
                batched = batched if agree else None
            if batched is not None:
                return batched
            self._way += 1
        return torch.stack([self.log_density(row, model, args, kwargs) for row in latent])

    def _vmapped(self, latent: Tensor, model: Callable, args: tuple, kwargs: dict) -> Tensor:
        def one(row: dict[str, Tensor]) -> Tensor:
            return self.log_density(row["z"], model, args, kwargs)

        return vmapped(one, {"z": latent}, len(latent))

    def _batched(self, latent: Tensor, model: Callable, args: tuple, kwargs: dict) -> Tensor:
        rows, dim = len(latent), self.max_plate_nesting + 1
        latent = latent.reshape(rows, *(1,) * self.max_plate_nesting, latent.shape[-1])
        values, log_jacobian = {}, latent.new_zeros(rows)
        with poutine.block(), pyro.plate(_ROWS, rows, dim=-dim):
            for name, value, log_density in self.constrain(latent, model, args, kwargs):
                values[name] = value
                log_jacobian = log_jacobian - per_draw(log_density, rows, dim)
            found = trace(poutine.condition(model, values), args, kwargs)
        return total(log_probs(found, rows, dim), rows).to(latent.dtype) + log_jacobian


_ROWS = "_pyro_flows_rows"
# What a model that does not broadcast over a leading dimension raises when run batched.
_NOT_BATCHED = (RuntimeError, ValueError, IndexError, KeyError, TypeError, AssertionError)


PackedLatent._ways = (PackedLatent._batched, PackedLatent._vmapped)


def _check_local_supports(dependent: set[str]) -> None:
    for name in sorted(dependent):
        raise NotImplementedError(
            f"Local latent site {name!r} (inside a subsampled plate) has a support that "
            "depends on other latents: AutoFlowGuide's guide for local sites maps each through "
            "a fixed support. Reparametrize the site (sample it on a fixed support and "
            "transform it in the model), or make its plate not subsampled."
        )


def _check_subsampled(sites: dict[str, dict]) -> None:
    for name, site in sites.items():
        frame = subsampled_plate(site)
        if frame is not None:
            raise ValueError(
                f"Latent site '{name}' is inside plate '{frame.name}', which is subsampled "
                f"({frame.size} of {frame.full_size}): a mode and a Hessian need the whole "
                "data. Call the model with the arguments that make it use all of it (no "
                "subsample_size)."
            )


def _discarded_elements(trace: Trace) -> dict[str, tuple[Tensor, Tensor]]:
    r"""Finds the elements of ``obs_mask`` imputation sites that the model throws away.

    Returns:
        For each latent site that ``obs_mask`` made and that has such elements, a boolean
        tensor of the site's batch shape, true where the element is thrown away, and the
        observed values (with the site's shape).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(y, mask):
        ...     with pyro.plate("data", 3):
        ...         pyro.sample("y", dist.Normal(0.0, 1.0), obs=y, obs_mask=mask)
        >>> mask = torch.tensor([True, False, True])
        >>> trace = pyro.poutine.trace(model).get_trace(torch.tensor([1.0, 0.0, 2.0]), mask)
        >>> _discarded_elements(trace)
        {'y_unobserved': (tensor([ True, False,  True]), tensor([1., 0., 2.]))}
    """
    found = {}
    for name, site in trace.nodes.items():  # conditioned latent sites count as observed
        observed = observed_partner(trace, name) if site["type"] == "sample" else None
        if observed is None:
            continue
        latent_mask, observed_mask = site["mask"], observed["mask"]
        if not (isinstance(latent_mask, Tensor) and isinstance(observed_mask, Tensor)):
            continue
        discarded = (observed_mask & ~latent_mask).expand(site["fn"].batch_shape)
        if discarded.any():
            found[name] = discarded, observed["value"].detach().expand(site["value"].shape)
    return found


def _scatter_live(fill: Tensor, live: Tensor, values: Tensor, shape: Size) -> Tensor:
    r"""Returns ``fill`` expanded to ``shape``, with ``values`` in the ``live`` elements.

    Arguments:
        fill: The value of every element that is not live.
        live: Which elements are live, with the shape of ``fill``.
        values: The live elements, with shape :math:`(*, L)` in row-major order.
        shape: The output shape: a batch shape followed by the shape of ``fill``.

    Example:
        >>> live = torch.tensor([False, True, True])
        >>> _scatter_live(torch.zeros(3), live, torch.tensor([[1.0, 2.0]]), torch.Size([1, 3]))
        tensor([[0., 1., 2.]])
    """
    return fill.to(values).expand(shape).masked_scatter(live.expand(shape), values)


class _Prototype:
    trace: Trace | None = None


@contextmanager
def explained_setup_errors(model: Callable, args: tuple, kwargs: dict) -> Iterator[_Prototype]:
    r"""Turns an error of a guide's set-up into one that says what to do.

    Yields a holder whose ``trace`` the set-up fills with the prototype trace once it has
    one: the explanation looks at its sites (discrete, none, without elements, with a
    support that no bijection maps). Without a trace, the model's arguments are checked for
    NaN or infinite values.
    """
    prototype = _Prototype()
    try:
        yield prototype
    except (ValueError, RuntimeError, NotImplementedError) as error:
        if isinstance(error, DataError):
            raise
        _explain(prototype.trace, error, model, args, kwargs)


def _explain(
    trace: Trace | None, error: Exception, model: Callable, args: tuple, kwargs: dict
) -> None:
    if trace is None:
        suspects = nonfinite_arguments(model, args, kwargs)
        if is_invalid_value_error(error) and suspects:
            raise DataError(
                f"{error}\nThe model's {', '.join(suspects)}: NaN or infinite inputs make "
                f"distribution arguments invalid. {MASK_ADVICE}"
            ) from error
        raise error
    latent = list(trace.iter_stochastic_nodes())
    for name, site in latent:
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"Latent site '{name}' is discrete ({type(site['fn']).__name__}); a flow guide "
                "covers continuous latents only. Enumerate it out (infer={'enumerate': "
                "'parallel'} with TraceEnum_ELBO, hiding it from this guide with "
                f"poutine.block(model, hide=['{name}'])), or combine guides with "
                "AutoGuideList (e.g. AutoDiscreteParallel for the discrete sites)."
            ) from error
    if not latent:
        raise ValueError(
            "The model has no latent sample sites (every pyro.sample is observed), so there "
            "is nothing for a guide to fit. Use an empty guide, e.g. `def guide(*args): pass`."
        ) from error
    if all(site["value"].numel() == 0 for _, site in latent):
        shapes = {name: tuple(site["value"].shape) for name, site in latent}
        raise ValueError(
            f"The model's latent sites have no elements (shapes {shapes}), so there is nothing "
            "for a guide to fit: check the sizes of the plates and data that set these shapes."
        ) from error
    for name, site in latent:
        try:
            site_bijection(site["fn"].support)
        except NotImplementedError:
            raise NotImplementedError(
                f"Latent site '{name}' has support {site['fn'].support}, which neither torch's "
                "biject_to nor pyro_flows.supports.site_bijection maps from the real line. "
                "Reparametrize the site (e.g. sample "
                "an unconstrained value and transform it) or register a bijection with "
                "torch.distributions.biject_to.register."
            ) from error
    raise error
