r"""What the sites of a model look like for one draw: their kinds, shapes and plates.

Also the knowledge about sites that more than one part of the package needs: the number of
plate dimensions, subsampled plates, and the pair of sites that ``obs_mask`` creates.
"""

__all__ = [
    "Site",
    "Structure",
    "log_likelihood",
    "model_structure",
    "observed_partner",
    "plate_nesting",
    "site_values",
    "subsampled_plate",
    "user_model",
]

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from pyro.distributions import Distribution
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine import Trace
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.indep_messenger import CondIndepStackFrame
from torch import Size, Tensor

from ._checks import check_int
from ._replay import samples, to_draws, traces

CHUNK_ELEMENTS = 2**20  # site values and log-densities per chunk


@dataclass(frozen=True)
class Site:
    r"""What one sample site of the model looks like for a single draw.

    Arguments:
        kind: ``"latent"``, ``"deterministic"``, ``"observed"`` or ``"auxiliary"``.
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
    r"""The sites of a model replayed on one guide draw, and its plate nesting.

    Arguments:
        sites: The model's sample sites, in model order.
        max_plate_nesting: The number of plate dimensions; draws go to the left of them.
        guide_shapes: The shapes of the guide's sample sites for a single draw.
    """

    sites: dict[str, Site]
    max_plate_nesting: int
    guide_shapes: dict[str, Size]

    def names(self, *kinds: str) -> list[str]:
        r"""Returns the names of the sites of the given kinds, in model order."""
        return [name for name, site in self.sites.items() if site.kind in kinds]

    def chunk_size(self, num_samples: int, chunk_size: int | None = None) -> int:
        r"""Returns the draws per chunk: ``chunk_size``, or as many as keep a chunk's site
        values and log-densities near :math:`2^{20}` numbers."""
        if chunk_size is not None:
            return min(chunk_size, num_samples)
        per_draw = sum(2 * math.prod(site.shape) for site in self.sites.values())
        return max(1, min(num_samples, CHUNK_ELEMENTS // max(1, per_draw)))


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


def model_structure(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    max_plate_nesting: int | None = None,
) -> Structure:
    r"""Replays the model on one guide draw, without consuming the global random stream.

    Raises a :py:`ValueError` if a plate subsamples (draws are scored on the whole data), or
    if the guide does not sample a latent site of the model; a :py:`TypeError` if the model
    is a guide (the two swapped).
    """
    if isinstance(model, (AutoGuide, GuideMessenger)):
        raise TypeError(
            f"The model is a {type(model).__name__}, a guide: the model and guide are swapped. "
            "diagnose and log_importance_weights take the model first, then the guide (as "
            "SVI(model, guide, ...)); to_inference_data takes the guide first, and model= for "
            "the model."
        )
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        model_trace, guide_trace = traces(model, guide, args, kwargs)
    _check_guided(model_trace, guide_trace)
    _warn_masked(model_trace)
    return _structure(model_trace, guide_trace, max_plate_nesting)


def _check_guided(model_trace: Trace, guide_trace: Trace) -> None:
    r"""Raises a :py:`ValueError` naming a latent site of the model that the guide lacks.

    The model would draw it from its prior: a posterior mixing guide and prior draws, and
    importance weights that count its prior density but not its sampling density.
    """
    guided = {name for name, _ in samples(guide_trace)}
    for name, site in samples(model_trace):
        if site["is_observed"] or (site["infer"] or {}).get("is_auxiliary") or name in guided:
            continue
        raise ValueError(
            f"The model's latent site {name!r} is not in the guide: it would be drawn from "
            "its prior, and the importance weights would be wrong. If it holds data, pass the "
            "data as when fitting (an observed site given None is latent); otherwise use a "
            "guide that samples it."
        )


def _warn_masked(model_trace: Trace) -> None:
    r"""Warns about latent sites with entries the model masks out (``obs_mask``,
    ``poutine.mask``).

    The model gives those entries no density: nothing holds the guide's draws of them (their
    scale grows as the fit goes on), yet they count in the importance weights.
    """
    for name, site in samples(model_trace):
        mask = site["mask"]
        if site["is_observed"] or mask is None:
            continue
        mask = torch.broadcast_to(torch.as_tensor(mask), site["fn"].batch_shape)
        if not mask.all() and not _held_at_data(model_trace, name, ~mask):
            warnings.warn(
                f"The model masks out {int((~mask).sum())} of {mask.numel()} entries of latent "
                f"site {name!r} (obs_mask or poutine.mask): it gives them no density, so the fit "
                "leaves the guide's draws of them free (their scale grows with the steps), yet "
                "they count in the importance weights, k-hat and verdict. To judge the guide "
                "on the rest, make only those entries latent: the missing data as a site of "
                "its own, in a plate over the missing indices.",
                stacklevel=4,
            )


def _held_at_data(model_trace: Trace, name: str, masked: Tensor) -> bool:
    r"""Whether the guide holds the masked entries of an ``obs_mask`` site
    (``<name>_unobserved``) at the observed values, as :class:`~pyro_flows.AutoFlowGuide`
    does: a free draw equals the data with probability zero."""
    observed = observed_partner(model_trace, name)
    if observed is None:
        return False
    value = model_trace.nodes[name]["value"]
    equal = (value == observed["value"]).reshape(*masked.shape, -1).all(-1)
    return bool(equal[masked].all())


def _structure(model_trace: Trace, guide_trace: Trace, max_plate_nesting: int | None) -> Structure:
    both = [*samples(guide_trace), *samples(model_trace)]
    for name, site in both:
        frame = subsampled_plate(site)
        if frame is not None:
            raise ValueError(
                f"Plate {frame.name!r} subsamples {frame.size} of {frame.full_size} points "
                f"at site {name!r}: draws are scored on the whole data. Call the model with "
                "the arguments that make it use all of it (no subsample_size)."
            )
    nesting = plate_nesting(site for _, site in both)
    if max_plate_nesting is not None:
        check_int("max_plate_nesting", max_plate_nesting, 0)
        nesting = max_plate_nesting
    sites = {name: _site(site) for name, site in samples(model_trace)}
    guide_shapes = {name: site["value"].shape for name, site in samples(guide_trace)}
    return Structure(sites, nesting, guide_shapes)


def _site(site: dict) -> Site:
    infer = site["infer"] or {}
    if infer.get("_deterministic"):
        kind = "deterministic"
    elif infer.get("is_auxiliary"):
        kind = "auxiliary"
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


def site_values(
    trace: Trace, names: list[str], structure: Structure, num_draws: int
) -> dict[str, Tensor]:
    r"""Returns the values of the named sites of a trace, shaped ``(num_draws, *shape)``."""
    return {
        name: to_draws(trace.nodes[name]["value"], num_draws, structure.sites[name].shape)
        for name in names
    }


def log_likelihood(
    trace: Trace, names: list[str], structure: Structure, num_draws: int
) -> dict[str, Tensor]:
    r"""Pointwise log-densities of observed sites: unscaled, masked points zero."""
    result = {}
    for name in names:
        node, site = trace.nodes[name], structure.sites[name]
        log_lik = scale_and_mask(node["unscaled_log_prob"], mask=node["mask"])
        result[name] = to_draws(log_lik, num_draws, site.fn.log_prob(site.value).shape)
    return result


def plate_nesting(sites: Iterable[dict]) -> int:
    r"""Returns the number of plate dimensions that sample sites use (Pyro's
    ``max_plate_nesting``).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro import poutine
        >>> def model():
        ...     with pyro.plate("a", 2, dim=-2):
        ...         pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> trace = poutine.trace(model).get_trace()
        >>> plate_nesting(site for _, site in trace.iter_stochastic_nodes())
        2
    """
    return max(
        (
            -frame.dim
            for site in sites
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.vectorized and frame.dim is not None
        ),
        default=0,
    )


def subsampled_plate(site: dict) -> CondIndepStackFrame | None:
    r"""Returns the first plate of a site that subsamples (uses fewer points than it has), or
    :py:`None`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro import poutine
        >>> def model():
        ...     with pyro.plate("data", 100, subsample_size=10):
        ...         pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> site = poutine.trace(model).get_trace().nodes["x"]
        >>> subsampled_plate(site).name
        'data'
    """
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.size != frame.full_size:
            return frame
    return None


def observed_partner(trace: Trace, name: str) -> dict | None:
    r"""Returns the observed half of an ``obs_mask`` pair, given the latent half's name.

    ``pyro.sample(name, fn, obs=y, obs_mask=m)`` creates a latent site ``{name}_unobserved``
    and an observed site ``{name}_observed``; the latent one's entries where ``m`` is true
    are thrown away by the model. Returns the observed site for a latent site so named
    (:py:`None` for any other site).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro import poutine
        >>> def model():
        ...     pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.zeros(2),
        ...                 obs_mask=torch.tensor([True, False]))
        >>> trace = poutine.trace(model).get_trace()
        >>> observed_partner(trace, "y_unobserved")["name"]
        'y_observed'
    """
    base = name.removesuffix("_unobserved")
    observed = trace.nodes.get(f"{base}_observed")
    if base == name or observed is None or observed["type"] != "sample":
        return None
    return observed if observed["is_observed"] else None
