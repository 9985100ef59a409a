r"""A start for a guide at the posterior mode, with scales from the Hessian there."""

from __future__ import annotations

__all__ = ["LaplaceStart", "laplace_start"]

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pyro.infer.autoguide.initialization import init_to_value
from torch import Tensor

from ._latent import PackedLatent
from .initialization import init_to_median_or_feasible

RESTARTS = 3  # L-BFGS runs at most, each from where the last one stopped
_NO_MODE = (
    "The search for the posterior's mode left the region where the log density is finite: "
    "the posterior may have no mode (an improper posterior, a density that grows without "
    "bound). Start the guide at the default point instead."
)


@dataclass(frozen=True)
class LaplaceStart:
    r"""The mode of a model's posterior and the scales of a Gaussian around it.

    Both are in the coordinates that :class:`~pyro_flows.AutoFlowGuide` works in: the mode
    maximizes the log joint density of the unconstrained latents (log-Jacobians included).
    With :math:`H` the negative Hessian there (the precision of the Laplace approximation),
    ``scales`` holds :math:`1 / \sqrt{H_{ii}}` for every unconstrained coordinate: the sds
    of the diagonal Gaussian closest to the Laplace approximation in :math:`KL(q \| p)`,
    which is what a mean-field guide converges to on a Gaussian posterior. Where latents are
    correlated these are smaller than the marginal sds (by :math:`\sqrt{1 - \rho^2}` for
    two coordinates of correlation :math:`\rho`): the guide starts inside the posterior and
    the flow learns the correlations from there.

    Arguments:
        values: The mode, per site, in the site's support (constrained).
        scales: :math:`1 / \sqrt{H_{ii}}` for every unconstrained coordinate, per site,
            shaped as the site's unconstrained value.
        log_density: The unnormalized log density of the unconstrained latents at the mode.
        iterations: The L-BFGS iterations that found the mode.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> from pyro_flows import AutoFlowGuide
        >>> start = laplace_start(model, torch.tensor([0.5, 1.5]))
        >>> guide = AutoFlowGuide(model, init_loc_fn=start.init_loc_fn, init_scale=start.scales)
    """

    values: dict[str, Tensor]
    scales: dict[str, Tensor]
    log_density: float
    iterations: int

    @property
    def init_loc_fn(self) -> Callable[[dict], Tensor]:
        r"""Pyro's ``init_to_value`` at the mode, for any guide's ``init_loc_fn``."""

        return init_to_value(values=self.values, fallback=init_to_median_or_feasible)


def laplace_start(
    model: Callable[..., object],
    *args: object,
    init_loc_fn: Callable[[dict], Tensor] = init_to_median_or_feasible,
    max_iterations: int = 1000,
    **kwargs: object,
) -> LaplaceStart:
    r"""Finds the posterior mode and the scales around it, as a start for a guide.

    A guide started at the prior's median with scale 0.1 needs many steps when the posterior
    is far from the prior's centre or much narrower than 0.1 (regressions on unscaled
    predictors: posterior sds of 0.001 are common). This finds the mode of the log joint
    density of the unconstrained latents with L-BFGS (strong Wolfe line search) from
    ``init_loc_fn``'s point, and the scales of the mean-field Gaussian closest to the
    Laplace approximation there (see :class:`LaplaceStart`). Pass ``start.init_loc_fn`` and
    ``start.scales`` to
    :class:`~pyro_flows.AutoFlowGuide` (``init_loc_fn``, ``init_scale``); the flow then
    starts as that Gaussian and learns the rest.

    The Hessian is :math:`D \times D` and costs :math:`D` backward passes, so this suits
    models up to a few thousand latent dimensions. The model must be deterministic given
    its latents (no subsampling) and have a strict maximum: a density that is flat along some
    direction or grows without bound raises a ``ValueError``. It is a good start where the
    posterior is close to Gaussian around its mode; a funnel's mode is at its neck (for
    Neal's 10-D funnel, scales of 1e-9), a correct answer but a poor start.

    Arguments:
        model: A Pyro model.
        args: The model's positional arguments.
        init_loc_fn: Where the search starts (any Pyro init strategy).
        max_iterations: The most L-BFGS iterations.
        kwargs: The model's keyword arguments.

    Returns:
        The mode and the scales.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> start = laplace_start(model, torch.tensor([0.5, 1.5]))
        >>> start.values["mu"], start.scales["mu"]  # the posterior's mean and sd here
        (tensor(0.9950), tensor(0.7053))
    """

    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations={max_iterations!r}: use a positive int.")
    latent = PackedLatent.from_model(model, init_loc_fn, *args, **kwargs)
    found = _mode_and_hessian(latent, model, args, kwargs, latent.initial(), max_iterations)
    mode, scales = found.mode, found.hessian.diagonal().rsqrt()
    with torch.no_grad():
        values = {name: value for name, value, _ in latent.constrain(mode, model, args, kwargs)}
        log_density = float(latent.log_density(mode, model, args, kwargs))
    per_site = {site["name"]: scale for site, scale in latent.unpack(scales)}
    return LaplaceStart(values, per_site, log_density, found.iterations)


def laplace_gaussian(
    latent: PackedLatent,
    model: Callable,
    args: tuple,
    kwargs: dict,
    init_loc: Tensor,
    max_iterations: int = 1000,
) -> tuple[Tensor, Tensor, int]:
    r"""The Laplace approximation of the packed latent: the mode, the covariance
    :math:`H^{-1}` and the log-density evaluations spent (the guide's ``init="laplace"``)."""
    found = _mode_and_hessian(latent, model, args, kwargs, init_loc, max_iterations)
    return found.mode, torch.cholesky_inverse(found.cholesky), found.evaluations


class _Mode(NamedTuple):
    mode: Tensor
    hessian: Tensor  # of the negative log density
    cholesky: Tensor
    iterations: int  # of L-BFGS
    evaluations: int  # of the log density (and its gradient), the Hessian's D passes included


def _mode_and_hessian(
    latent: PackedLatent,
    model: Callable,
    args: tuple,
    kwargs: dict,
    init_loc: Tensor,
    max_iterations: int,
) -> _Mode:
    r"""Returns the mode, the negative Hessian :math:`H` there, its Cholesky factor, and the
    L-BFGS iterations; raises a :py:`ValueError` that says why where there is no mode."""
    evaluations = 0

    def negative_log_density(z: Tensor) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        return -latent.log_density(z, model, args, kwargs)

    z = init_loc.detach().clone().requires_grad_()
    _check_deterministic(negative_log_density, z)
    iterations = 0
    for _ in range(RESTARTS):
        # A search that met a point where the density is not finite (in float32, gradients
        # that overflow) can lose its curvature memory to NaN: restart from where it got.
        used, exhausted, hit_wall = _maximize(negative_log_density, z, max_iterations)
        iterations += used
        if not hit_wall:
            break
    mode = z.detach()
    hessian = torch.autograd.functional.hessian(negative_log_density, mode)
    cholesky = _cholesky(latent, hessian, exhausted, hit_wall)
    _check_stationary(negative_log_density, mode, cholesky, iterations)
    return _Mode(mode, hessian, cholesky, iterations, evaluations + len(mode))


def _check_deterministic(objective: Callable[[Tensor], Tensor], z: Tensor) -> None:
    with torch.no_grad():
        first, second = float(objective(z)), float(objective(z))
    if not math.isfinite(first):
        raise ValueError(
            "The model's log density is not finite at the starting point: pass an init_loc_fn "
            "that starts inside the posterior's support."
        )
    if first != second:
        raise ValueError(
            "The model's log density changes between two evaluations at the same latent "
            "values (a subsampled pyro.plate, or randomness outside sample sites): a mode "
            "needs a deterministic density. Pass the full data without subsample_size."
        )


def _maximize(
    objective: Callable[[Tensor], Tensor], z: Tensor, max_iterations: int
) -> tuple[int, bool, bool]:
    r"""Runs L-BFGS on ``z`` in place.

    A trial point of the line search where the density is not finite (or where a
    distribution refuses its parameters) scores far worse than the start, so the search
    steps back from it.

    Returns:
        The iterations; whether it ran out of them (or of function evaluations, 1.25 per
        iteration) rather than converging; whether it met such a point.
    """

    optimizer = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=max_iterations,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    with torch.no_grad():
        first = float(objective(z))
    wall = first + 1e6 * (1.0 + abs(first))
    hit_wall = False

    def closure() -> Tensor:
        nonlocal hit_wall
        try:
            loss = objective(z)
            (gradient,) = torch.autograd.grad(loss, z)
        except ValueError:  # a distribution's validation of a non-finite parameter
            loss = gradient = None
        if loss is None or not (torch.isfinite(loss) and torch.isfinite(gradient).all()):
            hit_wall = True
            z.grad = torch.zeros_like(z)
            return torch.tensor(wall)
        z.grad = gradient
        return loss.detach()

    optimizer.step(closure)
    with torch.no_grad():
        if not (torch.isfinite(z).all() and torch.isfinite(objective(z))):
            raise ValueError(_NO_MODE)
    state = optimizer.state[z]
    budget = optimizer.defaults
    exhausted = state["n_iter"] >= budget["max_iter"] or state["func_evals"] >= budget["max_eval"]
    return int(state["n_iter"]), bool(exhausted), hit_wall


def _cholesky(latent: PackedLatent, hessian: Tensor, exhausted: bool, hit_wall: bool) -> Tensor:
    cholesky, info = torch.linalg.cholesky_ex(hessian)
    if info == 0 and torch.isfinite(hessian).all():
        return cholesky
    if hit_wall:
        raise ValueError(_NO_MODE)
    if exhausted:
        raise ValueError(
            "L-BFGS used all its iterations without reaching a maximum of the log density "
            "(its Hessian at the last point is not negative definite): raise max_iterations."
        )
    flat = torch.diagonal(hessian) <= 0
    sites = [site["name"] for site, bad in latent.unpack(flat) if bad.any()]
    where = f" (not curved down along sites {sites})" if sites else ""
    raise ValueError(
        "The log density at the point found is not a strict maximum: its Hessian is not "
        f"negative definite{where}. The posterior may have no mode (a flat or improper "
        "direction). Start the guide at the default point instead."
    )


def _check_stationary(
    objective: Callable[[Tensor], Tensor], z: Tensor, cholesky: Tensor, iterations: int
) -> None:
    # The Newton step from z, in the Laplace approximation's sds along it (the step's
    # Mahalanobis length): scale-free, and
    # unlike the gradient's norm not fooled by float32 rounding on sharp posteriors.
    point = z.detach().requires_grad_()
    (gradient,) = torch.autograd.grad(objective(point), point)
    step = torch.cholesky_solve(gradient.unsqueeze(-1), cholesky).squeeze(-1)
    distance = float(torch.dot(gradient, step).clamp(min=0).sqrt())
    if distance > 0.1:
        warnings.warn(
            f"L-BFGS stopped after {iterations} iterations {distance:.2g} Laplace sds from "
            "where a Newton step puts the mode: the scales may be off. Raise max_iterations.",
            stacklevel=3,
        )
