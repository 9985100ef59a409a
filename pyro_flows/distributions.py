r"""The distribution that :class:`~pyro_flows.AutoFlowGuide` places on its packed latent."""

from __future__ import annotations

__all__ = ["FlowPosterior", "call_and_ladj"]

import math
from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Size, Tensor
from torch.distributions import Transform


def call_and_ladj(transform: Transform, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Applies a vector transformation and returns its log-Jacobian in the same pass.

    zuko's transformations compute both at once; for any other
    :class:`~torch.distributions.Transform` the log-Jacobian is computed after the call and
    summed over the last dimension when the transform is elementwise.

    Arguments:
        transform: A transformation of vectors (the last dimension).
        x: The input, with shape :math:`(*, D)`.

    Returns:
        The output, with shape :math:`(*, D)`, and :math:`\log |\det J|`, with shape
        :math:`(*,)`.

    Example:
        >>> from torch.distributions import ExpTransform
        >>> y, ladj = call_and_ladj(ExpTransform(), torch.zeros(2, 3))
        >>> ladj
        tensor([0., 0.])
    """

    method = getattr(type(transform), "call_and_ladj", None)
    if method is not None and method is not getattr(Transform, "call_and_ladj", None):
        y, ladj = transform.call_and_ladj(x)
    else:
        y = transform(x)
        ladj = transform.log_abs_det_jacobian(x, y)
    if ladj.dim() == y.dim():
        ladj = ladj.sum(-1)
    return y, ladj


def _standard_normal_log_prob(eps: Tensor) -> Tensor:
    return -0.5 * (eps.square().sum(-1) + eps.shape[-1] * math.log(2 * math.pi))


class FlowPosterior(TorchDistribution):
    r"""Creates the flow distribution :math:`z = \mu + \sigma \odot f(\epsilon)`,
    :math:`\epsilon \sim \mathcal{N}(0, I)`.

    :math:`f` is a bijection of :math:`\mathbb{R}^D` (the identity at initialization), used in
    its one-pass direction. A draw is scored from the values computed while drawing it, so
    :meth:`rsample` followed by :meth:`log_prob` of the same tensor costs one pass through
    each layer. Scoring any other point inverts :math:`f` (sequential for autoregressive
    layers, one pass for coupling layers).

    Arguments:
        transform: The bijection :math:`f` in its sampling direction.
        loc: The location :math:`\mu`, with shape :math:`(D,)`.
        scale: The scale :math:`\sigma > 0`, with shape :math:`(D,)`.
        batch_shape: The batch shape.
        stl_log_prob: If given, the function ``(z, eps) -> log q(z)`` with stopped-gradient
            parameters that scores this distribution's own draws ("sticking the landing",
            see :mod:`pyro_flows.stl`).

    Example:
        >>> from torch.distributions import AffineTransform
        >>> f = AffineTransform(0.0, 1.0, event_dim=1)
        >>> q = FlowPosterior(f, torch.zeros(2), torch.ones(2))
        >>> z = q.rsample((3,))
        >>> q.log_prob(z).shape
        torch.Size([3])
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        transform: Transform,
        loc: Tensor,
        scale: Tensor,
        batch_shape: Size | tuple[int, ...] = (),
        *,
        stl_log_prob: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.transform = transform
        self.loc = loc
        self.scale = scale
        self.stl_log_prob = stl_log_prob
        self._last_draw: tuple[Tensor, Tensor, Tensor] | None = None
        super().__init__(Size(batch_shape), loc.shape[-1:], validate_args=False)

    def expand(
        self, batch_shape: Size | tuple[int, ...], _instance: object = None
    ) -> FlowPosterior:
        return FlowPosterior(
            self.transform,
            self.loc,
            self.scale,
            batch_shape,
            stl_log_prob=self.stl_log_prob,
        )

    def rsample(self, sample_shape: Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        y, ladj = call_and_ladj(self.transform, eps)
        z = self.loc + self.scale * y
        self._last_draw = (z, eps, ladj)
        return z

    def log_prob(self, value: Tensor) -> Tensor:
        if self._last_draw is not None and self._last_draw[0] is value:
            _, eps, ladj = self._last_draw
            if self.stl_log_prob is not None:
                return self.stl_log_prob(value, eps)
        else:
            eps = self.transform.inv((value - self.loc) / self.scale)
            _, ladj = call_and_ladj(self.transform, eps)
        return _standard_normal_log_prob(eps) - ladj - self.scale.log().sum(-1)
