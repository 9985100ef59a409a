r"""The "sticking the landing" log-density: parameters detached, the draw live.

For a draw :math:`z = \mu + \sigma \odot f(\epsilon)` the estimator scores :math:`z` under
the guide with stopped-gradient parameters, so that the gradient of the ELBO keeps only its
path term, which vanishes when the guide equals the posterior. Scoring :math:`z` needs
:math:`\epsilon = f^{-1}(y)`, :math:`y = (z - \mu) / \sigma`, as a differentiable function of
:math:`z`. Coupling layers invert in one pass; for autoregressive layers, whose inverse is
sequential, the known :math:`\epsilon` is used as the value and the gradient is mapped
through :math:`J_f(\epsilon)^{-\top}` (implicit differentiation), at :math:`O(D^2)` memory
per draw; under ``JitTrace_ELBO`` the sequential inverse is compiled instead.
"""

from __future__ import annotations

__all__ = ["detached_log_prob", "implicit_inverse"]

import math

import torch
from torch import Tensor
from torch.distributions import Transform
from zuko.transforms import (
    AutoregressiveTransform,
    ComposedTransform,
    CouplingTransform,
    DependentTransform,
    MonotonicAffineTransform,
    MonotonicRQSTransform,
)

from .distributions import call_and_ladj

_ONE_PASS = (
    CouplingTransform,
    DependentTransform,
    MonotonicAffineTransform,
    MonotonicRQSTransform,
)


def _inverse_is_cheap(transform: Transform) -> bool:
    if isinstance(transform, ComposedTransform):
        return all(_inverse_is_cheap(t) for t in transform.transforms)
    if isinstance(transform, AutoregressiveTransform):
        return transform.passes <= 2
    return isinstance(transform, _ONE_PASS)


class _ImplicitInverse(torch.autograd.Function):
    @staticmethod
    def forward(y: Tensor, eps: Tensor, jacobian: Tensor) -> Tensor:
        return eps.detach().clone()

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None, None]:
        (jacobian,) = ctx.saved_tensors
        grad_y = torch.linalg.solve(jacobian.mT, grad.unsqueeze(-1)).squeeze(-1)
        return grad_y, None, None


def implicit_inverse(transform: Transform, y: Tensor, eps: Tensor) -> Tensor:
    r"""Returns :math:`f^{-1}(y)`, known to equal ``eps``, differentiable in :math:`y`.

    The value is ``eps``; the gradient with respect to :math:`y` is
    :math:`J_f(\epsilon)^{-\top}` times the incoming gradient, with the Jacobian computed by
    one batched backward pass. The transform must act on each vector independently.

    Arguments:
        transform: The bijection :math:`f` of vectors (parameters detached).
        y: The output :math:`f(\epsilon)`, with shape :math:`(*, D)`.
        eps: The input :math:`\epsilon`, with shape :math:`(*, D)`.

    Returns:
        :math:`\epsilon`, with a gradient path to :math:`y`.

    Example:
        >>> from torch.distributions import AffineTransform
        >>> f = AffineTransform(0.0, 2.0, event_dim=1)
        >>> y = torch.ones(3, requires_grad=True)
        >>> implicit_inverse(f, y, torch.full((3,), 0.5)).sum().backward()
        >>> y.grad
        tensor([0.5000, 0.5000, 0.5000])
    """

    return _ImplicitInverse.apply(y, eps, _jacobian(transform, eps))


def _jacobian(transform: Transform, eps: Tensor) -> Tensor:
    # One batched pass: copy i of every draw carries the gradient of output i, which gives
    # row i of each draw's Jacobian (draws and copies do not interact).
    features = eps.shape[-1]
    flat = eps.detach().reshape(-1, features)
    copies = flat.expand(features, *flat.shape).clone().requires_grad_()
    with torch.enable_grad():
        outputs = transform(copies).diagonal(dim1=0, dim2=2)
        (rows,) = torch.autograd.grad(outputs.sum(), copies)
    return rows.transpose(0, 1).reshape(*eps.shape, features)


def detached_log_prob(
    transform: Transform, loc: Tensor, scale: Tensor, z: Tensor, eps: Tensor
) -> Tensor:
    r"""Returns :math:`\log q(z)` for :math:`z = \mu + \sigma \odot f(\epsilon)`.

    Meant to be called with detached parameters (``transform``, ``loc``, ``scale``) and a
    live draw ``z``: the result then carries the path gradient only.

    Arguments:
        transform: The bijection :math:`f` of vectors.
        loc: The location :math:`\mu`.
        scale: The scale :math:`\sigma`.
        z: The draw, with shape :math:`(*, D)`.
        eps: The noise that produced it.

    Returns:
        The log-density, with shape :math:`(*,)`.

    Example:
        >>> from torch.distributions import AffineTransform
        >>> f = AffineTransform(0.0, 1.0, event_dim=1)
        >>> z = torch.zeros(2, requires_grad=True)
        >>> detached_log_prob(f, torch.zeros(2), torch.ones(2), z, torch.zeros(2))
        tensor(-1.8379, grad_fn=<SubBackward0>)
    """

    y = (z - loc) / scale
    if _inverse_is_cheap(transform) or torch.jit.is_tracing():
        # (The JIT tracer cannot record the inner backward pass; it compiles the inverse.)
        eps = transform.inv(y)
    else:
        eps = implicit_inverse(transform, y, eps)
    _, ladj = call_and_ladj(transform, eps)
    normal = -0.5 * (eps.square().sum(-1) + eps.shape[-1] * math.log(2 * math.pi))
    return normal - ladj - scale.log().sum(-1)
