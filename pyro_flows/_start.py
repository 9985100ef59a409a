r"""Where :class:`~pyro_flows.AutoFlowGuide` starts: a Gaussian on its packed latent.

Three starts, by the guide's ``init`` option:

- ``"pathfinder"`` (Zhang et al., 2022): the Gaussian of best ELBO along an L-BFGS path from
  ``init_loc_fn``'s point (:mod:`pyro_flows._pathfinder`);
- ``"laplace"``: the Laplace approximation at the posterior mode (:mod:`pyro_flows.laplace`),
  its full covariance;
- ``"prior"``: ``init_loc_fn``'s point with ``init_scale`` (``AutoNormal``'s start).

The automatic starts fall back to ``"prior"`` with a :class:`~pyro_flows.errors.StartWarning`
that says why when they cannot run (a subsampled model, a density that is not finite at the
start, no curvature, ...): never an error. Where they run, the prior start is kept instead
when it has the higher ELBO estimate (:data:`NUM_DRAWS` draws each): never a worse start;
and, with a warning, where Pathfinder's L-BFGS path ran into a funnel's neck.
"""

from __future__ import annotations

__all__ = ["STARTS", "Start", "find_start"]

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import pyro
import torch
from torch import Tensor

from ._latent import PackedLatent
from ._linear import root_factor
from ._pathfinder import PathfinderError, RootFactor, pathfinder
from .errors import StartWarning
from .initialization import init_scale_vector

STARTS = ("pathfinder", "laplace", "prior")
SEED = 0  # the starts draw from their own generator: the user's random stream is untouched
NUM_DRAWS = 32  # draws of the ELBO estimate that compares a start with the prior start


@dataclass(frozen=True)
class Start:
    r"""A Gaussian :math:`N(\mu_0, S_0 S_0^\top)` on the packed latent, and how it was found.

    Arguments:
        loc: :math:`\mu_0`, with shape :py:`(D,)`.
        root: :math:`S_0`.
        shift_multiplier: :math:`c`: the guide's location is :math:`\mu_0 + S_0 (c \odot m)`
            with :math:`m` learned from zero: ones (whitened: a step of Adam moves the
            location by about the learning rate in posterior sds) for the automatic starts,
            :math:`1 / s` (raw unconstrained units, as ``AutoNormal``) for the prior start.
        how: ``"pathfinder"``, ``"laplace"`` or ``"prior"``: the prior start also where an
            automatic start failed (with a warning) or had the lower ELBO estimate.
        elbo: An ELBO estimate of the start (NaN where none was made).
        seconds: The time the start took.
        evaluations: The log-density evaluations it took (rows).
        path_elbos: For Pathfinder, the L-BFGS iterates whose Gaussian's ELBO was estimated,
            with the estimates (see :class:`~pyro_flows._pathfinder.PathfinderResult`).
        path_values: For Pathfinder, the log density at every L-BFGS iterate.
    """

    loc: Tensor
    root: RootFactor
    shift_multiplier: Tensor
    how: str
    elbo: float = math.nan
    seconds: float = 0.0
    evaluations: int = 0
    path_elbos: tuple[tuple[int, float], ...] = ()
    path_values: tuple[float, ...] = ()


def find_start(
    how: str,
    latent: PackedLatent,
    model: Callable,
    args: tuple,
    kwargs: dict,
    init_scale: float | Mapping[str, Tensor],
) -> Start:
    r"""Returns the start ``how`` names, or the prior start with a warning where it cannot."""
    began = time.perf_counter()
    init_loc = latent.initial()
    prior = _prior(init_loc, init_scale_vector(init_scale, latent.shapes, init_loc), latent)
    if how == "prior":
        return prior
    reason = _cannot_start(latent)
    found = None
    if reason is None:
        try:
            with pyro.validation_enabled(False), torch.enable_grad():
                found = _automatic(how, latent, model, args, kwargs, init_loc)
        except (PathfinderError, ValueError, torch.linalg.LinAlgError) as error:
            reason = str(error).strip().splitlines()[0]
    if found is not None:
        # The better of the two by ELBO: never a worse start than the prior one.
        prior = replace(prior, elbo=_elbo(prior, latent, model, args, kwargs))
        best = found if not prior.elbo > found.elbo else prior
        reason = _ran_away(found) if best is found else None
        if reason is None:
            return _timed(replace(best, evaluations=found.evaluations + NUM_DRAWS), began)
        prior = replace(prior, evaluations=found.evaluations + NUM_DRAWS)
    warnings.warn(
        f"AutoFlowGuide(init={how!r}) starts at init_loc_fn's point with init_scale instead "
        f"(init='prior'): {reason}. Pass init='prior' to skip the attempt.",
        StartWarning,
        stacklevel=5,
    )
    return _timed(prior, began)


def _cannot_start(latent: PackedLatent) -> str | None:
    if latent.subsampled is not None:
        name, frame = latent.subsampled
        return (
            f"the model subsamples (plate {frame.name!r}, {frame.size} of {frame.full_size}, at "
            f"site {name!r}), so its density changes between evaluations"
        )
    return None


def _prior(init_loc: Tensor, scale: Tensor, latent: PackedLatent) -> Start:
    scale = latent.live_coordinates(scale)
    return Start(init_loc, root_factor(scale), 1.0 / scale, "prior")


def _automatic(
    how: str, latent: PackedLatent, model: Callable, args: tuple, kwargs: dict, init_loc: Tensor
) -> Start:
    if how == "pathfinder":

        def log_density(z: Tensor) -> Tensor:
            return latent.log_densities(z, model, args, kwargs)

        generator = torch.Generator(device=init_loc.device).manual_seed(SEED)
        result = pathfinder(log_density, init_loc, generator=generator)
        ones = torch.ones_like(init_loc)
        start = Start(
            result.loc, result.factor(), ones, how, result.elbo, evaluations=result.num_evaluations
        )
        return replace(start, path_elbos=result.elbos, path_values=result.values)
    from .laplace import laplace_gaussian

    loc, covariance, evaluations = laplace_gaussian(latent, model, args, kwargs, init_loc)
    sd = covariance.diagonal().sqrt()
    correlation = covariance / (sd[:, None] * sd)
    cholesky = torch.linalg.cholesky(correlation)
    eye = torch.eye(len(sd), dtype=sd.dtype, device=sd.device)
    root = root_factor(sd, eye, cholesky - eye)
    start = Start(loc, root, torch.ones_like(sd), how, evaluations=evaluations)
    return replace(start, elbo=_elbo(start, latent, model, args, kwargs))


def _ran_away(start: Start) -> str | None:
    r"""Says why a Pathfinder start is not to be used where its L-BFGS path ran away; :py:`None`
    otherwise. The path ran away where, after the iterate of the best Gaussian, the log
    density still rose by more than :math:`D + 10` while the Gaussians got worse by more than
    :math:`D + 10` nats of ELBO (estimates from the same draws).

    On a posterior with a mode that summarizes it, the path ends at the mode and the best
    Gaussian's iterate lies in the posterior's mass, where the log density is about
    :math:`D / 2` below the mode's: measured on the benchmark's targets and the tests'
    models, the log density rose by at most 4.8 after the best iterate. Where the density
    grows without bound toward a region of little mass, such as the neck of a centred
    hierarchical model's funnel, L-BFGS keeps climbing into it and the Gaussians get ever
    worse: centred eight schools rose by 88 while the ELBO fell by 12,000; the 10-dimensional
    funnel by 91 and 5e19. (A fall of the ELBO alone is not enough: in float32 the last
    curvature estimate can be ruined by rounding at the mode, ELBO -9.7e8 with a rise of 2e-5.)
    The best Gaussian is then a piece of the way into the neck, far narrower than the
    posterior, and a guide trained in its whitened coordinates stays there: on centred eight
    schools its ELBO was -40.6 after 2,000 steps, against -31.7 from the prior start.
    """
    finite = {i: elbo for i, elbo in start.path_elbos if math.isfinite(elbo)}
    if not finite or not start.path_values:
        return None
    best = max(finite, key=finite.get)
    last, values = start.path_elbos[-1], start.path_values
    margin = len(start.loc) + 10.0
    if not (last[1] < finite[best] - margin and values[-1] - values[best] > margin):
        return None
    return (
        f"the L-BFGS path ran away from the posterior's mass (after the best Gaussian the log "
        f"density rose by {values[-1] - values[best]:.3g} while the ELBO estimates fell from "
        f"{finite[best]:.4g} to {last[1]:.4g}): its density grows without bound where there "
        "is little mass, as in the neck of a centred hierarchical model (a non-centred "
        "parameterization usually fits better)"
    )


def _elbo(start: Start, latent: PackedLatent, model: Callable, args: tuple, kwargs: dict) -> float:
    r"""An ELBO estimate of the start's Gaussian from :data:`NUM_DRAWS` draws (:math:`-\infty`
    where the density is not finite at a draw)."""
    generator = torch.Generator(device=start.loc.device).manual_seed(SEED + 1)
    shape = (NUM_DRAWS, len(start.loc))
    eps = torch.randn(shape, generator=generator, dtype=start.loc.dtype, device=start.loc.device)
    z = start.loc + start.root.apply(eps)
    with torch.no_grad(), pyro.validation_enabled(False):
        try:
            log_p = latent.log_densities(z, model, args, kwargs)
        except (ValueError, torch.linalg.LinAlgError):
            return -math.inf
    log_q = -0.5 * eps.square().sum(-1) - start.root.log_abs_det
    log_q = log_q - 0.5 * len(start.loc) * math.log(2 * math.pi)
    log_w = (log_p - log_q).double()
    if torch.isnan(log_w).any():
        return -math.inf
    return float(log_w.mean())


def _timed(start: Start, began: float) -> Start:
    return replace(start, seconds=time.perf_counter() - began)
