r"""The linear part of :class:`~pyro_flows.AutoFlowGuide`: :math:`z = \mu + S_0 T y`.

:math:`S_0` is the square root of the start's covariance, fixed (a
:class:`~pyro_flows._pathfinder.RootFactor`, :math:`\operatorname{diag}(s)(I + U C U^\top)`),
and :math:`T` is learned, starting at the identity: the guide's scale is trained in the
start's whitened coordinates, where a step of Adam moves every coordinate by about the same
fraction of its posterior sd whatever the posterior's scale. :math:`T` is dense
lower-triangular up to :data:`DENSE_MAX` coordinates (:math:`D (D - 1) / 2` parameters: any
linear correlation is learned at once), and above it diagonal plus rank :data:`RANK`
(:math:`T = \operatorname{diag}(t) + A B^\top`, parameters linear in :math:`D`).
"""

from __future__ import annotations

__all__ = ["DENSE_MAX", "RANK", "DiagonalScale", "LinearScale", "root_factor", "tril_speed"]

from dataclasses import dataclass

import torch
from torch import Tensor

from ._pathfinder import RootFactor

DENSE_MAX = 200  # up to this many coordinates T is dense lower-triangular
RANK = 8  # above it, T is diagonal plus this rank


def tril_speed(size: int) -> float:
    r"""Returns the multiplier of :math:`T`'s off-diagonal parameters, :math:`1 / D`.

    Adam moves every parameter by about the learning rate at each step, signal or noise: a
    row of a dense :math:`T` sums :math:`D - 1` of them, so with one particle its noise grew
    with :math:`D` (on a 100-dimensional hierarchical Gaussian, sds 0.91-1.39 times the exact
    ones after 2,000 steps at lr 0.01, against 0.85-1.13 for ``AutoNormal``). Multiplied by
    :math:`1 / D`, each entry moves :math:`D` times slower (0.89-1.13; with STL 0.95-1.07,
    measured in one run). The start has the correlations already.

    Example:
        >>> tril_speed(50)
        0.02
    """
    return 1.0 / size


def root_factor(
    scale: Tensor, basis: Tensor | None = None, core: Tensor | None = None
) -> RootFactor:
    r"""Returns :math:`S = \operatorname{diag}(s)(I + U C U^\top)` with its log-determinant.

    Arguments:
        scale: :math:`s`, with shape :py:`(D,)`.
        basis: :math:`U`, orthonormal columns, with shape :py:`(D, r)`; none for
            :math:`S = \operatorname{diag}(s)`.
        core: :math:`C`, lower-triangular with :math:`I + C` invertible, :py:`(r, r)`.

    Example:
        >>> root_factor(torch.tensor([2.0, 3.0])).log_abs_det
        tensor(1.7918)
    """
    if basis is None:
        basis = scale.new_zeros(len(scale), 0)
        core = scale.new_zeros(0, 0)
    log_abs_det = scale.log().sum() + torch.diagonal(core).log1p().sum()
    return RootFactor(scale, basis, core, log_abs_det)


@dataclass(frozen=True)
class DiagonalScale:
    r"""The scale :math:`\operatorname{diag}(s)` as a linear map.

    Example:
        >>> DiagonalScale(torch.tensor([2.0, 4.0])).solve(torch.ones(1, 2))
        tensor([[0.5000, 0.2500]])
    """

    scale: Tensor

    def apply(self, y: Tensor) -> Tensor:
        r"""Returns :math:`S y` for every row of `y`."""
        return self.scale * y

    def solve(self, z: Tensor) -> Tensor:
        r"""Returns :math:`S^{-1} z` for every row of `z`."""
        return z / self.scale

    def log_abs_det(self) -> Tensor:
        r"""Returns :math:`\log |\det S|`."""
        return self.scale.log().sum(-1)

    def variances(self) -> Tensor:
        r"""Returns the diagonal of :math:`S S^\top`."""
        return self.scale.square()


@dataclass(frozen=True)
class LinearScale:
    r"""The map :math:`y \mapsto S_0 T y`, :math:`S_0` fixed, :math:`T` learned.

    Arguments:
        root: :math:`S_0`.
        diag: :math:`T`'s diagonal :math:`t > 0`, with shape :py:`(D,)`.
        tril: :math:`T`'s entries below the diagonal, row by row, with shape
            :py:`(D (D - 1) / 2,)` (dense :math:`T`), or :py:`None`.
        left: :math:`A` of :math:`T = \operatorname{diag}(t) + A B^\top`, :py:`(D, r)`, or
            :py:`None`.
        right: :math:`B`, :py:`(D, r)`, or :py:`None`.

    Example:
        >>> root = root_factor(torch.tensor([2.0, 2.0]))
        >>> S = LinearScale(root, torch.ones(2), tril=torch.tensor([0.5]))
        >>> S.apply(torch.tensor([[1.0, 1.0]])), S.log_abs_det()
        (tensor([[2., 3.]]), tensor(1.3863))
    """

    root: RootFactor
    diag: Tensor
    tril: Tensor | None = None
    left: Tensor | None = None
    right: Tensor | None = None

    def matrix(self) -> Tensor:
        r"""Returns the dense lower-triangular :math:`T` (dense case only)."""
        size = len(self.diag)
        rows, cols = torch.tril_indices(size, size, -1, device=self.diag.device)
        matrix = torch.diag_embed(self.diag)
        return matrix.index_put((rows, cols), self.tril)

    def _t(self, y: Tensor) -> Tensor:
        if self.tril is not None:
            return y @ self.matrix().mT
        y_t = y * self.diag
        if self.left is None:
            return y_t
        return y_t + (y @ self.right) @ self.left.mT

    def _t_solve(self, w: Tensor) -> Tensor:
        if self.tril is not None:
            flat = w.reshape(-1, w.shape[-1])
            solved = torch.linalg.solve_triangular(self.matrix(), flat.mT, upper=False).mT
            return solved.reshape(w.shape)
        a = w / self.diag
        if self.left is None:
            return a
        inner = self._woodbury_core()
        b = (a @ self.right).reshape(-1, self.right.shape[-1])
        c = torch.linalg.solve(inner, b.mT).mT.reshape(*a.shape[:-1], -1)
        return a - (c @ self.left.mT) / self.diag

    def _woodbury_core(self) -> Tensor:
        # I + B^T diag(t)^{-1} A: T^{-1} and log|det T| through the matrix determinant lemma.
        eye = torch.eye(self.left.shape[-1], dtype=self.diag.dtype, device=self.diag.device)
        return eye + self.right.mT @ (self.left / self.diag[:, None])

    def apply(self, y: Tensor) -> Tensor:
        r"""Returns :math:`S_0 T y` for every row of `y`, with shape :py:`(*, D)`."""
        return _root_apply(self.root, self._t(y))

    def solve(self, z: Tensor) -> Tensor:
        r"""Returns :math:`(S_0 T)^{-1} z` for every row of `z`, with shape :py:`(*, D)`."""
        return self._t_solve(_root_solve(self.root, z))

    def log_abs_det(self) -> Tensor:
        r"""Returns :math:`\log |\det S_0 T|`."""
        log_det = self.root.log_abs_det + self.diag.log().sum()
        if self.left is not None and self.tril is None:
            log_det = log_det + torch.linalg.slogdet(self._woodbury_core())[1]
        return log_det

    def variances(self) -> Tensor:
        r"""Returns the diagonal of :math:`S S^\top`, :math:`S = S_0 T`: the marginal
        variances of :math:`z` when :math:`y` is standard normal."""
        if self.tril is not None:
            columns = _root_apply(self.root, self.matrix().mT)  # row j: S_0 T e_j
            return columns.square().sum(0)
        # S = diag(a t) + X Y^T, X = [a U C, a (A + U C U^T A)], Y = [t U, B] (a, t vectors)
        a, u, core = self.root.scale, self.root.basis, self.root.core
        x_parts, y_parts = [a[:, None] * (u @ core)], [self.diag[:, None] * u]
        if self.left is not None:
            left = self.left + u @ (core @ (u.mT @ self.left))
            x_parts.append(a[:, None] * left)
            y_parts.append(self.right)
        x, y = torch.cat(x_parts, -1), torch.cat(y_parts, -1)
        p = a * self.diag
        return p.square() + 2 * p * (x * y).sum(-1) + ((x @ (y.mT @ y)) * x).sum(-1)


def _root_apply(root: RootFactor, u: Tensor) -> Tensor:
    if root.basis.shape[-1] == 0:
        return u * root.scale
    flat = u.reshape(-1, u.shape[-1])
    return root.apply(flat).reshape(u.shape)


def _root_solve(root: RootFactor, z: Tensor) -> Tensor:
    if root.basis.shape[-1] == 0:
        return z / root.scale
    flat = z.reshape(-1, z.shape[-1])
    return root.solve(flat).reshape(z.shape)
