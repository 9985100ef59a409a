r"""Pathfinder: a Gaussian start for a guide, chosen by ELBO along an L-BFGS path."""

from __future__ import annotations

__all__ = ["PathfinderError", "PathfinderResult", "RootFactor", "pathfinder"]

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

MAX_ELBO_ITERATES = 30  # Gaussians whose ELBO is estimated, at most, spread along the path
LAST_ITERATES = 4  # the last iterates of the path are always among them
MAX_LINE_SEARCH = 25  # evaluations of one line search, at most
ARMIJO, WOLFE = 1e-4, 0.9  # the weak Wolfe conditions' constants (sufficient increase, slope)
ROUNDING = 64.0  # the log density's rounding error, in machine epsilons (relative)
PENALTY = 1.0  # the choice maximizes the ELBO estimate less this many standard errors
STALLED = 10  # L-BFGS stops after this many iterations in a row that gain less than that
CURVATURE_EPSILON = 1e-12  # a pair (s, y) is kept if s.y > eps |y|^2 (Zhang et al., Stan)
# What a model raises at a point where its density is zero or not finite: a distribution's
# validation of its parameters, or a Cholesky factorization of a matrix that is not positive
# definite there.
REFUSALS = (ValueError, torch.linalg.LinAlgError)


class PathfinderError(ValueError):
    r"""Pathfinder could not find a start: the message says why, in plain words."""


@dataclass(frozen=True)
class RootFactor:
    r"""A square root :math:`S = \operatorname{diag}(s) (I + U C U^\top)` of a covariance.

    With :math:`U` a :math:`D \times r` matrix of orthonormal columns and :math:`C` an
    :math:`r \times r` lower-triangular matrix (:math:`I + C` invertible), applying
    :math:`S` or :math:`S^{-1}` costs :math:`O(D r)` and
    :math:`\log |\det S| = \sum_i \log s_i + \log |\det (I + C)|`.

    Arguments:
        scale: The diagonal :math:`s`, with shape :py:`(D,)`.
        basis: The orthonormal :math:`U`, with shape :py:`(D, r)`.
        core: The lower-triangular :math:`C`, with shape :py:`(r, r)`.
        log_abs_det: :math:`\log |\det S|`, a scalar tensor.

    Example:
        >>> root = RootFactor(torch.tensor([2.0]), torch.ones(1, 1), torch.ones(1, 1),
        ...                   torch.tensor(math.log(4.0)))
        >>> root.apply(torch.ones(1, 1)), root.solve(torch.ones(1, 1))
        (tensor([[4.]]), tensor([[0.2500]]))
    """

    scale: Tensor
    basis: Tensor
    core: Tensor
    log_abs_det: Tensor

    def apply(self, u: Tensor) -> Tensor:
        r"""Returns :math:`S u` for every row :math:`u` of `u`, with shape :py:`(N, D)`."""

        return (u + (u @ self.basis) @ self.core.mT @ self.basis.mT) * self.scale

    def solve(self, z: Tensor) -> Tensor:
        r"""Returns :math:`S^{-1} z` for every row :math:`z` of `z`, with shape :py:`(N, D)`."""

        w = z / self.scale
        v = w @ self.basis
        eye = torch.eye(len(self.core), dtype=self.core.dtype, device=self.core.device)
        inner = torch.linalg.solve_triangular(eye + self.core, v.mT, upper=False).mT
        return w + (inner - v) @ self.basis.mT


@dataclass(frozen=True)
class PathfinderResult:
    r"""The Gaussian Pathfinder chose, and what finding it cost.

    The covariance is :math:`\Sigma = \operatorname{diag}(\alpha) + \beta \gamma \beta^\top`
    (Zhang et al., 2022), stored as :math:`\Sigma = A (I + U (L L^\top - I) U^\top) A` with
    :math:`A = \operatorname{diag}(\sqrt{\alpha})`, :math:`U` the thin QR basis of
    :math:`A^{-1} \beta` and :math:`L` a lower Cholesky factor: memory :math:`O(D J)`.

    Arguments:
        loc: The mean, with shape :py:`(D,)`.
        diag: The diagonal part :math:`\alpha` of the covariance, with shape :py:`(D,)`.
        basis: :math:`U`, with orthonormal columns, with shape :py:`(D, r)`, :math:`r \leq 2J`.
        tril: :math:`L`, with shape :py:`(r, r)`.
        elbo: An ELBO estimate of this Gaussian, from draws other than those it was chosen
            by (:math:`-\infty` if the log density was not finite at one of them).
        iteration: The L-BFGS iterate it was built at (0 is the starting point).
        elbos: The iterates whose Gaussian's ELBO was estimated to choose one, with the
            estimates (:math:`-\infty` where a draw's log density was not finite).
        values: The log density at every iterate (up to the constant of `log_density`).
        num_iterations: The L-BFGS iterations run.
        num_evaluations: The log density's evaluations (rows), L-BFGS and ELBO draws.
        seconds: The time spent.

    Example:
        >>> result = pathfinder(lambda z: -0.5 * (z**2).sum(-1), torch.ones(3))
        >>> result.sample(2).shape, result.log_prob(torch.zeros(1, 3))
        (torch.Size([2, 3]), tensor([-2.7568]))
    """

    loc: Tensor
    diag: Tensor
    basis: Tensor
    tril: Tensor
    elbo: float
    iteration: int
    elbos: tuple[tuple[int, float], ...]
    values: tuple[float, ...]
    num_iterations: int
    num_evaluations: int
    seconds: float

    def factor(self) -> RootFactor:
        r"""Returns a square root :math:`S` of the covariance, :math:`S S^\top = \Sigma`."""

        return _Gaussian(self.loc, self.diag, self.basis, self.tril).root()

    def covariance(self) -> Tensor:
        r"""Returns the dense covariance :math:`\Sigma`, with shape :py:`(D, D)`."""

        root = self.factor()
        dense = root.apply(torch.eye(len(self.loc), dtype=self.loc.dtype, device=self.loc.device))
        return dense.mT @ dense  # the rows of `dense` are the columns of S

    def scale_tril(self) -> Tensor:
        r"""Returns the lower Cholesky factor of :math:`\Sigma`, with shape :py:`(D, D)`.

        This is dense: for moderate :math:`D` only. :meth:`factor` is cheap at any :math:`D`.
        """

        return torch.linalg.cholesky(self.covariance())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        r"""Returns `n` draws, with shape :py:`(n, D)`."""

        u = torch.randn(
            n, len(self.loc), generator=generator, dtype=self.loc.dtype, device=self.loc.device
        )
        return self.loc + self.factor().apply(u)

    def log_prob(self, z: Tensor) -> Tensor:
        r"""Returns the log density of every row of `z`, with shape :py:`(N, D)`."""

        root = self.factor()
        u = root.solve(z - self.loc)
        return _standard_log_prob(u) - root.log_abs_det


def pathfinder(
    log_density: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    max_iterations: int = 400,
    history: int = 6,
    num_elbo_draws: int = 32,
    max_evaluations: int = 1500,
    generator: torch.Generator | None = None,
) -> PathfinderResult:
    r"""Finds a Gaussian close to a density by single-path Pathfinder.

    L-BFGS climbs the log density from `z0`. At an iterate :math:`\theta` with gradient
    :math:`g`, the last `history` (:math:`J`) steps :math:`s` and gradient changes :math:`y`
    that pass the curvature check :math:`s^\top y > 10^{-12} \|y\|^2` give an inverse
    Hessian estimate :math:`\Sigma = \operatorname{diag}(\alpha) + \beta \gamma \beta^\top`
    (the diagonal :math:`\alpha` starts at ones and is updated elementwise by every kept
    pair), and the Gaussian there is :math:`N(\theta + \Sigma g, \Sigma)`. The ELBO of each
    Gaussian is estimated with `num_elbo_draws` draws, the same standard normal draws for
    every iterate so that the comparison is not swamped by noise, and the best Gaussian is
    returned, its ELBO estimated afresh (the best of several noisy estimates is biased up).
    The best is the highest estimate less its standard error: an estimate that is high by
    luck is a noisy one, and a Gaussian that fits well has log weights of little spread.
    The best is not the mode's where the mode is a poor summary: on Neal's funnel the path
    runs into the neck, and the ELBO picks a Gaussian from the way there.

    Unlike Stan's and BlackJAX's, this L-BFGS starts its inverse Hessian from
    :math:`\operatorname{diag}(\alpha)`, not a multiple of the identity, so the quasi-Newton
    step is the Gaussian's mean: on posteriors whose scales differ by orders of magnitude
    it converges in far fewer iterations. Its line search looks for the weak Wolfe
    conditions, judged by the slope alone where the log density changes by less than its
    rounding error (float32 along a direction of large scale). It stops when its line
    search fails twice in a row, after 10 iterations in a row that gain less than the
    rounding error, or when it runs out of iterations or evaluations.

    Cost: the starting point is evaluated twice (a check that the density is
    deterministic); each L-BFGS iteration evaluates the log density and its gradient once
    or a few times (25 at most); at most 30 Gaussians get an ELBO estimate (the start, the
    last 4 iterates and others spaced evenly in log scale between, dense early on), each
    one batched call of `num_elbo_draws` rows, and the chosen one a fresh one.
    `max_evaluations` caps the count of rows evaluated in all: the ELBO estimates get at
    most two thirds of it, L-BFGS the rest. With the defaults that is at most 992 rows in
    31 batched calls for the ELBO and 506 evaluations for L-BFGS; a Gaussian posterior of
    moderate scales costs 20 to 150 of those. Memory is :math:`O(L D)` for the path of
    :math:`L` iterates and :math:`O(D J)` for each Gaussian: nothing is
    :math:`D \times D`.

    The covariance is exact only for a Gaussian whose curvature the path explored: for
    larger :math:`D` the directions L-BFGS did not move along keep a diagonal guess, and a
    float32 log density limits the accuracy to what its rounding error lets L-BFGS resolve.

    Arguments:
        log_density: The log density, up to a constant: maps points with shape
            :py:`(N, D)` to :py:`(N,)`, differentiably. Where it is not finite, or raises
            a :py:`ValueError` (or :py:`torch.linalg.LinAlgError`), the density is taken
            to be zero; a batch that raises is zero at all its rows.
        z0: The starting point, with shape :py:`(D,)`: its dtype and device are those of
            the computation (the Gaussian's algebra is done in float64 where the device
            has it).
        max_iterations: The most L-BFGS iterations.
        history: The pairs :math:`(s, y)` in the inverse Hessian estimate (:math:`J`), of
            the Gaussians and of L-BFGS's steps.
        num_elbo_draws: The draws per ELBO estimate (:math:`K`).
        max_evaluations: The most rows of `log_density` evaluated in all.
        generator: The random number generator of the ELBO draws, on the device of `z0`
            (torch's default if :py:`None`).

    Returns:
        The Gaussian with the highest ELBO estimate, in the dtype and on the device of `z0`.

    Raises:
        PathfinderError: If the log density is not finite at `z0`, gives two different
            values there, no Gaussian along the path has a finite ELBO, or no curvature
            pair passes the check anywhere along a path that moved.

    Example:
        >>> scales = torch.tensor([0.001, 1.0, 100.0])
        >>> def log_density(z):
        ...     return -0.5 * (((z - 1.0) / scales) ** 2).sum(-1)
        >>> generator = torch.Generator().manual_seed(0)
        >>> result = pathfinder(log_density, torch.zeros(3), generator=generator)
        >>> result.loc.round(decimals=3)
        tensor([1., 1., 1.])
        >>> (result.covariance().diagonal().sqrt() / scales).round(decimals=2)
        tensor([1., 1., 1.])

    References:
        | Pathfinder: Parallel quasi-Newton variational inference (Zhang et al., 2022)
        | https://jmlr.org/papers/v23/21-0889.html

        | Some numerical experiments with variable-storage quasi-Newton algorithms
        | (Gilbert & Lemaréchal, 1989)
        | https://doi.org/10.1007/BF01589113
    """

    _check_arguments(z0, max_iterations, history, num_elbo_draws, max_evaluations)
    start = time.perf_counter()
    z0 = z0.detach().clone()
    share = 2 * max_evaluations // 3 // num_elbo_draws - 1  # the ELBO's two thirds at most
    elbo_iterates = min(MAX_ELBO_ITERATES, max_iterations + 1, max(1, share))
    reserve = (elbo_iterates + 1) * num_elbo_draws  # the ELBO estimates, and a fresh one
    density = _Density(log_density, max_evaluations - reserve)
    value, gradient = density.check_start(z0)
    path = _lbfgs_path(density, z0, value, gradient, max_iterations, history)
    density.budget = max_evaluations
    selected = set(_thin(len(path.points), elbo_iterates))
    gaussian, iteration, elbos = _choose(
        density, path, selected, history, num_elbo_draws, generator
    )
    # The best of several noisy estimates is biased up: estimate the winner's afresh.
    u = _standard_draws(num_elbo_draws, z0, gaussian.loc.dtype, generator)
    elbo, _ = _elbo(density, gaussian, u, z0.dtype)
    return PathfinderResult(
        *(tensor.to(z0.dtype) for tensor in gaussian),
        elbo=elbo,
        iteration=iteration,
        elbos=elbos,
        values=tuple(path.values),
        num_iterations=len(path.points) - 1,
        num_evaluations=density.evaluations,
        seconds=time.perf_counter() - start,
    )


def _check_arguments(
    z0: Tensor, max_iterations: int, history: int, num_elbo_draws: int, max_evaluations: int
) -> None:
    if not isinstance(z0, Tensor) or z0.dim() != 1 or len(z0) == 0:
        raise ValueError(f"z0 must be a tensor of shape (D,) with D >= 1, got {z0!r}.")
    if not z0.is_floating_point():
        raise ValueError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}.")
    for name, value in [
        ("max_iterations", max_iterations),
        ("history", history),
        ("num_elbo_draws", num_elbo_draws),
        ("max_evaluations", max_evaluations),
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: use a positive int.")
    least = 2 * num_elbo_draws + 3
    if max_evaluations < least:
        raise ValueError(
            f"max_evaluations={max_evaluations} leaves no room: with num_elbo_draws="
            f"{num_elbo_draws} it must be at least {least} (two checks at the start, two "
            "ELBO estimates and one L-BFGS evaluation)."
        )


def _check_output(value: object, z: Tensor) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != z.shape[:1]:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"log_density must map points of shape (N, D) to log densities of shape (N,): "
            f"for shape {tuple(z.shape)} it returned {shape}."
        )
    return value


class _OutOfEvaluations(Exception):
    r"""The budget of evaluations is spent."""


class _Density:
    r"""The log density, with every row evaluated counted and the budget enforced."""

    def __init__(self, log_density: Callable[[Tensor], Tensor], budget: int) -> None:
        self.log_density = log_density
        self.budget = budget
        self.evaluations = 0

    def _spend(self, rows: int) -> None:
        if self.evaluations + rows > self.budget:
            raise _OutOfEvaluations
        self.evaluations += rows

    def value_and_gradient(self, z: Tensor) -> tuple[float, Tensor] | None:
        r"""The value and gradient at `z`, or :py:`None` where either is not finite."""

        self._spend(1)
        point = z.detach().clone().requires_grad_()
        try:
            with torch.enable_grad():
                value = self.log_density(point.unsqueeze(0))
        except REFUSALS:  # a distribution's validation of a non-finite parameter
            return None
        value = _check_output(value, point.unsqueeze(0))[0]
        if not torch.isfinite(value):
            return None
        if not value.requires_grad:
            raise PathfinderError(
                "The log density does not depend differentiably on the latent values: "
                "Pathfinder needs its gradient."
            )
        (gradient,) = torch.autograd.grad(value, point)
        if not torch.isfinite(gradient).all():
            return None
        return float(value.detach()), gradient.detach()

    def values(self, z: Tensor) -> Tensor:
        r"""The values at the rows of `z`; :math:`-\infty` where not finite."""

        self._spend(len(z))
        try:
            with torch.no_grad():
                value = self.log_density(z)
        except REFUSALS:
            return torch.full(z.shape[:1], -math.inf, dtype=z.dtype, device=z.device)
        value = _check_output(value, z).detach()
        return torch.where(torch.isfinite(value), value, -math.inf)

    def check_start(self, z0: Tensor) -> tuple[float, Tensor]:
        r"""The value and gradient at `z0`, after checking that they are finite and fixed."""

        first = self.value_and_gradient(z0)
        if first is None:
            raise PathfinderError(
                "The log density or its gradient is not finite at the starting point (or the "
                "model refused it with a ValueError): Pathfinder needs a start inside the "
                "posterior's support. Start from another point."
            )
        second = float(self.values(z0.unsqueeze(0))[0])
        tolerance = 64 * torch.finfo(z0.dtype).eps * (1.0 + abs(first[0]))
        if not abs(first[0] - second) <= tolerance:
            raise PathfinderError(
                f"The log density changed between two evaluations at the starting point "
                f"({first[0]:.6g}, then {second:.6g}): Pathfinder needs a deterministic "
                "density, and a subsampled plate or randomness outside sample sites makes it "
                "random. Use the full data without subsample_size."
            )
        return first


class _Gaussian(NamedTuple):
    r"""A Gaussian along the path, in the terms of :class:`PathfinderResult`."""

    loc: Tensor
    diag: Tensor
    basis: Tensor
    tril: Tensor

    def root(self) -> RootFactor:
        eye = torch.eye(len(self.tril), dtype=self.tril.dtype, device=self.tril.device)
        scale = self.diag.sqrt()
        log_abs_det = scale.log().sum() + self.tril.diagonal().log().sum()
        return RootFactor(scale, self.basis, self.tril - eye, log_abs_det)


@dataclass(frozen=True)
class _Path:
    r"""The iterates of L-BFGS (the start first), the log density's values and gradients
    there, and the iterates after which the curvature memory was cleared (a failed line
    search)."""

    points: list[Tensor]
    gradients: list[Tensor]
    resets: set[int]
    values: list[float]


class _Curvature:
    r"""The inverse Hessian estimate of L-BFGS with a diagonal initial matrix.

    The diagonal :math:`\alpha` starts at ones and is updated elementwise by every pair
    :math:`(s, y)` (a step and the change of the gradient of :math:`-\log p`) that passes
    the curvature check; the last `history` such pairs are kept.
    """

    def __init__(self, dimension: int, history: int, like: Tensor) -> None:
        dtype = _work_dtype(like.device)
        self.alpha = torch.ones(dimension, dtype=dtype, device=like.device)
        self.pairs: deque[tuple[Tensor, Tensor]] = deque(maxlen=history)
        self.accepted = 0

    def update(self, s: Tensor, y: Tensor) -> None:
        s, y = s.to(self.alpha.dtype), y.to(self.alpha.dtype)
        if torch.dot(s, y) > CURVATURE_EPSILON * torch.dot(y, y):
            self.alpha = _update_diagonal(self.alpha, s, y)
            self.pairs.append((s, y))
            self.accepted += 1

    def step(self, gradient: Tensor) -> Tensor:
        r"""Returns :math:`\Sigma g`, the quasi-Newton step up the log density, by the
        two-loop recursion."""

        q = gradient.to(self.alpha.dtype)
        coefficients = []
        for s, y in reversed(self.pairs):
            a = torch.dot(s, q) / torch.dot(s, y)
            q = q - a * y
            coefficients.append(a)
        r = self.alpha * q
        for (s, y), a in zip(self.pairs, reversed(coefficients), strict=True):
            b = torch.dot(y, r) / torch.dot(s, y)
            r = r + (a - b) * s
        return r

    def gaussian(self, point: Tensor, gradient: Tensor) -> _Gaussian | None:
        r"""The Gaussian at an iterate, or :py:`None` if its covariance is degenerate."""

        point, gradient = point.to(self.alpha.dtype), gradient.to(self.alpha.dtype)
        loc = point + self.step(gradient)
        basis, tril = _low_rank(self.alpha, self.pairs)
        if tril is None or not torch.isfinite(loc).all():
            return None
        return _Gaussian(loc, self.alpha, basis, tril)


def _lbfgs_path(
    density: _Density,
    z0: Tensor,
    value: float,
    gradient: Tensor,
    max_iterations: int,
    history: int,
) -> _Path:
    r"""Runs L-BFGS up the log density from `z0` until it converged to the precision of the
    log density's dtype (its line search fails twice in a row, or `STALLED` iterations in a
    row gain less than the rounding error), or the iterations or the evaluations run out.

    A stretch of iterations that gain less than the rounding error is not always the end:
    in float32, along a direction of large scale the log density changes by less than its
    rounding error while the steps, guided by the gradient, grow tenfold an iteration.
    """

    curvature = _Curvature(len(z0), history, z0)
    path = _Path([z0], [gradient], set(), [value])
    point, stalled = z0, 0
    for iteration in range(max_iterations):
        try:
            found = _line_search(density, point, value, gradient, curvature, iteration == 0)
            if found is None and curvature.pairs:
                path.resets.add(len(path.points) - 1)
                curvature.pairs.clear()
                found = _line_search(density, point, value, gradient, curvature, False)
        except _OutOfEvaluations:
            break
        if found is None:
            break
        new_point, new_value, new_gradient = found
        curvature.update(new_point - point, gradient - new_gradient)
        path.points.append(new_point)
        path.gradients.append(new_gradient)
        path.values.append(new_value)
        noise = ROUNDING * torch.finfo(z0.dtype).eps * max(1.0, abs(value))
        stalled = stalled + 1 if new_value - value <= noise else 0
        point, value, gradient = new_point, new_value, new_gradient
        if stalled == STALLED:
            break
    return path


def _line_search(
    density: _Density,
    point: Tensor,
    value: float,
    gradient: Tensor,
    curvature: _Curvature,
    first: bool,
) -> tuple[Tensor, float, Tensor] | None:
    r"""Searches along the quasi-Newton step for a point that satisfies the weak Wolfe
    conditions, by interpolation, bisection and extension.

    Where the log density changes by less than its rounding error (float32 along a
    direction of large scale), sufficient increase is judged by the slope instead: Hager
    and Zhang's approximate Wolfe conditions.

    Returns:
        The point, the log density and its gradient there; the last point that increased
        the log density enough if none satisfied both conditions in `MAX_LINE_SEARCH`
        evaluations; :py:`None` if none did.
    """

    direction = curvature.step(gradient)
    slope = float(torch.dot(gradient.to(direction.dtype), direction))
    if not (torch.isfinite(direction).all() and slope > 0):
        return None
    noise = ROUNDING * torch.finfo(point.dtype).eps * max(1.0, abs(value))
    t = min(1.0, 1.0 / float(direction.abs().max())) if first else 1.0
    low, high, fallback = 0.0, math.inf, None
    for _ in range(MAX_LINE_SEARCH):
        trial = (point.to(direction.dtype) + t * direction).to(point.dtype)
        if torch.equal(trial, point):
            break  # a step below the resolution of the point's dtype
        result = density.value_and_gradient(trial)
        if result is not None:
            new_slope = float(torch.dot(result[1].to(direction.dtype), direction))
            enough = result[0] >= value + ARMIJO * t * slope or (
                result[0] >= value - noise and new_slope >= (2 * ARMIJO - 1) * slope
            )
        if result is None or not enough:
            high = t
            if result is None or low > 0 or result[0] >= value - noise:
                t = 0.5 * (low + high)
            else:  # the maximum of the quadratic through the values and the slope at 0
                drop = value + slope * t - result[0]
                t = min(max(0.5 * slope * t * t / drop, 1e-4 * t), 0.5 * t)
        elif new_slope > WOLFE * slope:  # still climbing steeply: a longer step
            low, fallback = t, (trial, *result)
            t = 10.0 * t if high == math.inf else 0.5 * (low + high)
        else:
            return trial, *result
    return fallback


def _thin(length: int, most: int) -> list[int]:
    r"""Indices of at most `most` of `length` iterates: the first, the last few, and others
    spaced evenly in log scale between (dense early on, where a funnel's best is)."""

    if length <= most:
        return list(range(length))
    last = min(LAST_ITERATES, most - 1)
    spaced = torch.logspace(0, math.log10(length - last - 1), most - last - 1, dtype=torch.float64)
    indices = {0, *range(length - last, length)}
    for index in spaced.round().long().tolist():
        while index in indices and index < length - last - 1:
            index += 1  # rounding gives repeats early on: take the next free iterate
        indices.add(index)
    return sorted(indices)


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _choose(
    density: _Density,
    path: _Path,
    selected: Sequence[int],
    history: int,
    num_draws: int,
    generator: torch.Generator | None,
) -> tuple[_Gaussian, int, tuple[tuple[int, float], ...]]:
    r"""Estimates the ELBO of the Gaussian at every selected iterate, with the same standard
    normal draws for all, and returns the best.

    Returns:
        The best Gaussian and its iterate; and every iterate whose ELBO was estimated, with
        the estimate.
    """

    z0 = path.points[0]
    curvature = _Curvature(len(z0), history, z0)
    u = _standard_draws(num_draws, z0, curvature.alpha.dtype, generator)
    best, elbos, curved, degenerate = None, [], False, False
    for index, (point, gradient) in enumerate(zip(path.points, path.gradients, strict=True)):
        if index > 0:
            curvature.update(point - path.points[index - 1], path.gradients[index - 1] - gradient)
        gaussian = curvature.gaussian(point, gradient) if index in selected else None
        if index in selected and curvature.pairs:
            curved, degenerate = curved or gaussian is not None, degenerate or gaussian is None
        if index in path.resets:
            curvature.pairs.clear()
        if gaussian is None:
            continue
        try:
            elbo, error = _elbo(density, gaussian, u, z0.dtype)
        except _OutOfEvaluations:
            break
        elbos.append((index, elbo))
        score = elbo - PENALTY * error
        if math.isfinite(score) and (best is None or score > best[2]):
            best = (gaussian, index, score)
    if len(path.points) > 1 and (curvature.accepted == 0 or (degenerate and not curved)):
        raise PathfinderError(
            f"Along the {len(path.points) - 1} L-BFGS iterations no step passed the curvature "
            "check, or the covariance it gave was degenerate (the log density did not curve "
            "down along the path): the posterior may be improper or flat in some direction. "
            "Start from the default point instead."
        )
    if best is None:
        raise PathfinderError(
            f"None of the {len(elbos)} Gaussians along the L-BFGS path has a finite ELBO "
            "estimate: their draws land where the log density is not finite. The start may "
            "be on the edge of the support or the density may overflow; start from another "
            "point."
        )
    return best[0], best[1], tuple(elbos)


def _standard_draws(
    n: int, like: Tensor, dtype: torch.dtype, generator: torch.Generator | None
) -> Tensor:
    shape = (n, len(like))
    u = torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    return u.to(dtype)


def _update_diagonal(alpha: Tensor, s: Tensor, y: Tensor) -> Tensor:
    r"""The elementwise update of the diagonal :math:`\alpha` by a pair :math:`(s, y)`
    (Gilbert & Lemaréchal's (4.9)); :math:`\alpha` unchanged if that is not positive."""

    a = torch.dot(y * alpha, y)
    b = torch.dot(s, y)
    c = torch.dot(s / alpha, s)
    share = (s * s / alpha) / c  # of c, in [0, 1]
    updated = b / ((a / alpha) * (1.0 - share) + y * y)
    if torch.isfinite(updated).all() and (updated > 0).all():
        return updated
    return alpha


def _low_rank(
    alpha: Tensor, pairs: Sequence[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor | None]:
    r"""The basis :math:`U` and Cholesky factor :math:`L` of the covariance
    :math:`\operatorname{diag}(\alpha) + \beta \gamma \beta^\top` (see
    :class:`PathfinderResult`); :math:`L` is :py:`None` if the covariance is degenerate."""

    if not pairs:
        return alpha.new_zeros(len(alpha), 0), alpha.new_zeros(0, 0)
    s = torch.stack([pair[0] for pair in pairs], dim=1)  # (D, m), oldest first
    y = torch.stack([pair[1] for pair in pairs], dim=1)
    sy = s.mT @ y
    eye = torch.eye(len(pairs), dtype=sy.dtype, device=sy.device)
    r_inverse = torch.linalg.solve_triangular(sy.triu(), eye, upper=True)
    corner = r_inverse.mT @ (torch.diag(sy.diagonal()) + y.mT @ (alpha[:, None] * y)) @ r_inverse
    gamma = torch.cat(
        [
            torch.cat([torch.zeros_like(corner), -r_inverse], dim=1),
            torch.cat([-r_inverse.mT, corner], dim=1),
        ]
    )
    root = alpha.sqrt()[:, None]
    basis, r = torch.linalg.qr(torch.cat([root * y, s / root], dim=1))  # A^-1 beta
    inner = r @ gamma @ r.mT
    inner = 0.5 * (inner + inner.mT) + torch.eye(len(r), dtype=r.dtype, device=r.device)
    tril, info = torch.linalg.cholesky_ex(inner)
    if info != 0 or not torch.isfinite(tril).all():
        return basis, None
    return basis, tril


def _elbo(
    density: _Density, gaussian: _Gaussian, u: Tensor, dtype: torch.dtype
) -> tuple[float, float]:
    r"""The ELBO estimate of a Gaussian from the standard normal draws `u`, and its
    standard error."""

    root = gaussian.root()
    draws = gaussian.loc + root.apply(u)
    log_q = _standard_log_prob(u) - root.log_abs_det
    log_p = density.values(draws.to(dtype)).to(u.dtype)
    if not (torch.isfinite(draws).all() and torch.isfinite(log_p).all()):
        return -math.inf, math.inf
    ratios = log_p - log_q
    error = float(ratios.std()) / math.sqrt(len(u)) if len(u) > 1 else 0.0
    return float(ratios.mean()), error


def _standard_log_prob(u: Tensor) -> Tensor:
    return -0.5 * (u * u).sum(-1) - 0.5 * u.shape[-1] * math.log(2 * math.pi)
