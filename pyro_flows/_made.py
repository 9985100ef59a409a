r"""zuko's masked autoregressive layers, built in :math:`O(D H)` instead of :math:`O(D^3)`.

zuko builds the hyper-network of a masked autoregressive layer from a :math:`D \times D`
adjacency matrix (repeated once per univariate parameter) and a product of it with its own
transpose: :math:`O(D^3)` time and :math:`O(D^2)` memory. At :math:`D = 10^4` building the
default flow took 197 s and 2.6 GB (measured). For the adjacency that an order defines (input
:math:`j` feeds output :math:`i` when :math:`o_j < o_i`), the masks that zuko derives have a
closed form, computed here from the order alone: the layers, their initial weights (the same
random draws in the same sequence) and their masks are zuko's, and the transformation is
zuko's :class:`~zuko.flows.autoregressive.MaskedAutoregressiveTransform`.
"""

from __future__ import annotations

__all__ = ["masked_autoregressive", "masks"]

from collections.abc import Callable, Sequence
from math import ceil, prod

import torch
import torch.nn as nn
from torch import BoolTensor, LongTensor, Size
from torch.distributions import Transform
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.lazy import LazyComposedTransform, LazyTransform
from zuko.nn import MaskedLinear
from zuko.transforms import MonotonicAffineTransform


def masks(order: LongTensor, total: int, hidden_features: Sequence[int]) -> list[BoolTensor]:
    r"""Returns the masks of a masked MLP whose outputs follow ``order``.

    Output :math:`(i, t)` (parameter :math:`t` of feature :math:`i`) may depend on input
    :math:`j` only if :math:`o_j < o_i`. Hidden unit :math:`k` of every layer gets the degree
    :math:`d_k = 1 + (k \bmod (V - 1))`, with :math:`V` the number of distinct values of
    the order (which must be :math:`0, \dots, V - 1`); it sees inputs with :math:`o_j < d_k`
    and hidden units of degree at most :math:`d_k`, and feeds outputs with :math:`o_i \ge d_k`.
    These are the masks that :class:`zuko.nn.MaskedMLP` derives from the adjacency matrix.

    Arguments:
        order: The order value :math:`o_i` of every feature, with shape :math:`(D,)`.
        total: The number of outputs per feature.
        hidden_features: The widths of the hidden layers.

    Returns:
        One mask per linear layer, of shape (outputs, inputs).

    Example:
        >>> [m.int().tolist() for m in masks(torch.tensor([0, 1, 2]), 1, [2])]
        [[[1, 0, 0], [1, 1, 0]], [[0, 0], [1, 0], [1, 1]]]
    """

    values = int(order.max()) + 1
    if values < 2:
        raise ValueError("An autoregressive order needs at least two distinct values.")
    result, degrees = [], None
    for width in hidden_features:
        new = 1 + torch.arange(width) % (values - 1)
        if degrees is None:
            result.append(order[None, :] < new[:, None])
        else:
            result.append(degrees[None, :] <= new[:, None])
        degrees = new
    result.append(degrees[None, :] <= torch.repeat_interleave(order, total)[:, None])
    return result


class _MaskedAutoregressiveTransform(MaskedAutoregressiveTransform):
    r"""zuko's masked autoregressive transformation, with its hyper-network built by
    :func:`masks` (features > 1; zuko returns an element-wise transformation for one)."""

    def __init__(
        self,
        features: int,
        order: LongTensor,
        passes: int | None = None,
        univariate: Callable[..., Transform] = MonotonicAffineTransform,
        shapes: Sequence[Size] = ((), ()),
        hidden_features: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] | None = None,
    ) -> None:
        LazyTransform.__init__(self)  # not zuko's own set-up, which is O(D^3)
        self.univariate = univariate
        self.shapes = shapes
        self.total = sum(prod(s) for s in shapes)
        self.passes = min(max(features if passes is None else passes, 1), features)
        order = torch.div(order, ceil(features / self.passes), rounding_mode="floor")
        self.register_buffer("order", order)
        activation = nn.ReLU if activation is None else activation
        layers = []
        for mask in masks(order, self.total, hidden_features):
            layers += [MaskedLinear(adjacency=mask), activation()]
        self.hyper = nn.Sequential(*layers[:-1])


def masked_autoregressive(
    features: int,
    *,
    transforms: int,
    randperm: bool,
    passes: int | None = None,
    **kwargs: object,
) -> LazyTransform:
    r"""Creates the transformation of zuko's ``MAF`` (or ``NSF``) in :math:`O(D H)`.

    As ``zuko.flows.MAF(features, transforms=..., randperm=..., passes=..., **kwargs)
    .transform``, with the same layers, masks and initial weights (given the same random
    state).

    Arguments:
        features: The number of features :math:`D`.
        transforms: The number of layers.
        randperm: Whether each layer's order is a random permutation (else orders
            alternate between :math:`0, \dots, D - 1` and its reverse).
        passes: The number of passes of the inverse (:py:`None`: :math:`D`,
            fully autoregressive; 2: coupling).
        kwargs: The univariate transformation, its parameter shapes, ``hidden_features``
            and ``activation``.

    Returns:
        A lazy composed transformation.

    Example:
        >>> t = masked_autoregressive(4, transforms=2, randperm=False, hidden_features=[8])
        >>> t().transforms[0].passes
        4
    """

    orders = [torch.arange(features), torch.flipud(torch.arange(features))]
    layers = [
        _MaskedAutoregressiveTransform(
            features=features,
            order=torch.randperm(features) if randperm else orders[i % 2],
            passes=passes,
            **kwargs,
        )
        for i in range(transforms)
    ]
    return LazyComposedTransform(*layers)
