r"""Named flow factories for :class:`~pyro_flows.AutoFlowGuide`.

Each factory builds a stack of zuko layers over ``features`` coordinates and returns it as a
lazy transformation used in its *sampling* direction: noise :math:`\epsilon` goes in, the
standardized draw :math:`f(\epsilon)` comes out, in one pass through each layer. Every layer
starts as the identity, so a fresh guide is exactly its diagonal Normal.
"""

from __future__ import annotations

__all__ = [
    "FLOWS",
    "as_lazy_transform",
    "check_flow",
    "fan_in_multipliers",
    "flow_speed",
    "iaf",
    "identity_init_",
    "nsf",
    "nsf_coupling",
    "realnvp",
]

import inspect
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributions import Transform
from zuko.flows.gaussianization import ElementWiseTransform
from zuko.lazy import Flow, LazyTransform
from zuko.transforms import MonotonicRQSTransform

from ._made import masked_autoregressive
from ._zuko import zuko


def _check_options(transforms: int, hidden_features: Sequence[int], bins: int = 2) -> None:
    if not isinstance(transforms, int) or transforms < 1:
        raise ValueError(f"transforms={transforms!r}: a flow needs at least one layer (int >= 1).")
    hidden = tuple(hidden_features)
    if not hidden or any(not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(
            f"hidden_features={hidden_features!r}: give one positive int per hidden layer, "
            "e.g. (64, 64)."
        )
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins={bins!r}: a spline needs at least 2 bins.")


def _autoregressive(
    features: int,
    *,
    transforms: int,
    hidden_features: Sequence[int],
    randperm: bool,
    activation: Callable[[], nn.Module] | None,
    bins: int | None = None,
    passes: int | None = None,
) -> LazyTransform:
    # The body of every masked autoregressive family: affine layers, or zuko's NSF spline
    # (with its default slope) when `bins` is given; `passes=2` makes coupling layers.
    _check_options(transforms, hidden_features, 2 if bins is None else bins)
    spline = {}
    if bins is not None:
        univariate = partial(MonotonicRQSTransform, slope=1e-3)
        spline = {"univariate": univariate, "shapes": [(bins,), (bins,), (bins - 1,)]}
    transform = masked_autoregressive(
        features,
        transforms=transforms,
        randperm=randperm,
        passes=passes,
        hidden_features=tuple(hidden_features),
        activation=activation,
        **spline,
    )
    return identity_init_(transform)


def identity_init_(transform: nn.Module) -> nn.Module:
    r"""Sets the last layer of every zuko hyper-network to zero, in place.

    A zuko autoregressive or coupling layer whose hyper-network outputs zeros is the identity
    (zero shift and log-scale for affine layers; uniform bins with unit knot slopes for
    splines).

    Arguments:
        transform: A module holding zuko layers.

    Returns:
        The same module.

    Example:
        >>> t = identity_init_(zuko.flows.MAF(3, transforms=2).transform)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(t()(x), x)
        True
    """

    with torch.no_grad():
        for layers in _hyper_layers(transform):
            last = layers[-1]
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()
        for module in transform.modules():
            if isinstance(module, ElementWiseTransform) and hasattr(module, "phi"):
                for p in module.phi:
                    p.zero_()
    return transform


def _hyper_layers(transform: nn.Module) -> list[list[nn.Module]]:
    networks = []
    for module in transform.modules():
        hyper = getattr(module, "hyper", None)
        if isinstance(hyper, nn.Sequential):
            networks.append([m for m in hyper if isinstance(getattr(m, "weight", None), Tensor)])
    return networks


def fan_in_multipliers(transform: nn.Module) -> dict[Tensor, float]:
    r"""Returns a multiplier of ``1 / fan_in`` for every weight of every hyper-network.

    With Adam, every weight moves by about the learning rate at each step, so a unit that
    sums ``fan_in`` inputs moves ``fan_in`` times faster than the guide's location and scale;
    on sharp posteriors the affine layers then overshoot into overflow within tens of steps.
    Multiplying each weight matrix by ``1 / fan_in`` (see
    :class:`~pyro_flows._packing.ParameterPacking`) keeps the function the same at
    initialization and makes each unit move at about the learning rate per step.

    Arguments:
        transform: A module holding zuko layers.

    Returns:
        A dict from weight to multiplier.

    Example:
        >>> t = iaf(3, hidden_features=(16, 32))
        >>> sorted(set(fan_in_multipliers(t).values()))
        [0.03125, 0.0625, 0.3333333333333333]
    """

    return {
        layer.weight: 1.0 / layer.weight.shape[-1]
        for layers in _hyper_layers(transform)
        for layer in layers
    }


def flow_speed(features: int) -> float:
    r"""Returns the multiplier of every parameter of a named flow over ``features``
    coordinates, on top of :func:`fan_in_multipliers`: :math:`\min(1, 3 / \sqrt{D})`.

    With one particle, Adam's steps of about the learning rate on every parameter make the
    flow's networks wander around the optimum: on a 1,000-dimensional hierarchical Gaussian,
    2,000 steps of ``iaf`` with STL at lr 0.01 left sds 0.74-1.15 times the exact ones at
    full speed and 0.92-1.10 at 0.1 (``AutoNormal``: 0.83-1.22); at 100 dimensions the speed
    did not matter (0.94-1.09 and 0.95-1.07), and at 10 (eight schools) the full speed fitted
    better (sd ratios 0.95-1.07 against 0.93-1.12). So the flow moves at full speed up to 9
    coordinates and more slowly, as :math:`1 / \sqrt{D}`, above.

    Example:
        >>> flow_speed(4), flow_speed(900)
        (1.0, 0.1)
    """
    return min(1.0, 3.0 / features**0.5)


def iaf(
    features: int,
    *,
    transforms: int = 3,
    hidden_features: Sequence[int] = (64, 64),
    randperm: bool = False,
    activation: Callable[[], nn.Module] | None = None,
) -> LazyTransform:
    r"""Creates an inverse autoregressive flow (IAF) of affine layers.

    Each layer is a zuko masked autoregressive affine transform used in its cheap direction,
    :math:`y_i = \mu_i(\epsilon_{<i}) + \sigma_i(\epsilon_{<i}) \epsilon_i`, so drawing and
    scoring a draw cost one pass; scoring an arbitrary point needs ``features`` passes.
    Orders alternate between layers (or are random with ``randperm``).

    References:
        | Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)
        | https://arxiv.org/abs/1606.04934

    Arguments:
        features: The number of features.
        transforms: The number of autoregressive layers.
        hidden_features: The widths of each layer's masked hidden network.
        randperm: Whether features are randomly permuted between layers.
        activation: The activation constructor of the hidden networks (default ReLU).

    Returns:
        A lazy transformation, the identity at initialization.

    Example:
        >>> t = iaf(4, transforms=2)
        >>> y, ladj = t().call_and_ladj(torch.randn(4))
        >>> ladj
        tensor(0., grad_fn=<AddBackward0>)
    """

    options = {"hidden_features": hidden_features, "randperm": randperm, "activation": activation}
    return _autoregressive(features, transforms=transforms, **options)


def nsf(
    features: int,
    *,
    transforms: int = 3,
    hidden_features: Sequence[int] = (64, 64),
    bins: int = 8,
    randperm: bool = False,
    activation: Callable[[], nn.Module] | None = None,
) -> LazyTransform:
    r"""Creates an autoregressive neural spline flow (NSF).

    Each layer is a zuko masked autoregressive monotonic rational-quadratic spline on
    :math:`[-5, 5]` (identity outside), used in its one-pass direction. The guide feeds it
    standardized coordinates, so the spline window covers the posterior whatever its scale.

    References:
        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032

    Arguments:
        features: The number of features.
        transforms: The number of autoregressive layers.
        hidden_features: The widths of each layer's masked hidden network.
        bins: The number of spline bins.
        randperm: Whether features are randomly permuted between layers.
        activation: The activation constructor of the hidden networks (default ReLU).

    Returns:
        A lazy transformation, the identity at initialization.

    Example:
        >>> t = nsf(3, bins=4)
        >>> x = torch.randn(3)
        >>> torch.allclose(t()(x), x, atol=1e-6)
        True
    """

    options = {"hidden_features": hidden_features, "randperm": randperm, "activation": activation}
    return _autoregressive(features, transforms=transforms, bins=bins, **options)


def nsf_coupling(
    features: int,
    *,
    transforms: int = 3,
    hidden_features: Sequence[int] = (64, 64),
    bins: int = 8,
    randperm: bool = False,
    activation: Callable[[], nn.Module] | None = None,
) -> LazyTransform:
    r"""Creates a neural spline flow of coupling layers.

    As :func:`nsf`, but each layer transforms one half of the features given the other half
    (zuko's masked network with two passes), so both directions cost one pass: scoring an
    arbitrary point is as cheap as drawing one, which suits large latent dimensions.

    References:
        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032

    Arguments:
        features: The number of features.
        transforms: The number of coupling layers.
        hidden_features, bins, randperm, activation: As in :func:`nsf`.

    Returns:
        A lazy transformation, the identity at initialization.

    Example:
        >>> t = nsf_coupling(4)
        >>> x = torch.randn(4)
        >>> torch.allclose(t().inv(t()(x)), x, atol=1e-5)
        True
    """

    options = {"hidden_features": hidden_features, "randperm": randperm, "activation": activation}
    return _autoregressive(features, transforms=transforms, bins=bins, passes=2, **options)


def realnvp(
    features: int,
    *,
    transforms: int = 3,
    hidden_features: Sequence[int] = (64, 64),
    randmask: bool = False,
    activation: Callable[[], nn.Module] | None = None,
) -> LazyTransform:
    r"""Creates a RealNVP flow of affine coupling layers.

    Each layer scales and shifts one half of the features given the other half; masks
    alternate between layers (or are random with ``randmask``), so every feature is
    transformed. Both directions cost one pass.

    References:
        | Density estimation using Real NVP (Dinh et al., 2016)
        | https://arxiv.org/abs/1605.08803

    Arguments:
        features: The number of features.
        transforms: The number of coupling layers.
        hidden_features: The widths of each layer's hidden network.
        randmask: Whether random coupling masks are used.
        activation: The activation constructor of the hidden networks (default ReLU).

    Returns:
        A lazy transformation, the identity at initialization.

    Example:
        >>> t = realnvp(4)
        >>> x = torch.randn(4)
        >>> torch.equal(t()(x), x)
        True
    """

    _check_options(transforms, hidden_features)
    flow = zuko.flows.RealNVP(
        features,
        transforms=transforms,
        randmask=randmask,
        hidden_features=tuple(hidden_features),
        activation=activation,
    )
    return identity_init_(flow.transform)


FLOWS: dict[str, Callable[..., LazyTransform]] = {
    "iaf": iaf,
    "nsf": nsf,
    "nsf_coupling": nsf_coupling,
    "realnvp": realnvp,
}
r"""The flow families that :class:`~pyro_flows.AutoFlowGuide` knows by name."""


def check_flow(flow: object, options: dict[str, object]) -> None:
    r"""Raises a clear error unless ``flow`` and ``options`` can build a flow.

    Named families are built once on two features, so that a bad option value fails when the
    guide is created, before any model is traced.

    Arguments:
        flow: A name in :data:`FLOWS`, or a callable of the number of features.
        options: The named family's options (none for a callable).

    Example:
        >>> check_flow("iaf", {"layers": 3})
        Traceback (most recent call last):
        ...
        TypeError: Unknown option(s) ['layers'] for flow 'iaf'; valid: ...
    """

    if isinstance(flow, str):
        if flow not in FLOWS:
            raise ValueError(
                f"Unknown flow {flow!r}: use one of {sorted(FLOWS)} or pass a callable that "
                "returns a flow for a given number of features."
            )
        factory = FLOWS[flow]
        valid = sorted(set(inspect.signature(factory).parameters) - {"features"})
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown} for flow {flow!r}; valid: {valid}.")
        try:
            factory(2, **options)
        except TypeError as error:
            raise TypeError(
                f"Flow {flow!r} cannot be built with options {options} ({error}). Use zuko's "
                "types, e.g. hidden_features=(64, 64), transforms=3, bins=8, "
                "activation=torch.nn.ELU."
            ) from error
    elif callable(flow):
        if options:
            raise TypeError(
                f"Options {sorted(options)} apply to named flows only; configure your flow "
                "callable instead, e.g. flow=functools.partial(my_flow, ...)."
            )
    else:
        raise TypeError(f"flow must be a name in {sorted(FLOWS)} or a callable, got {flow!r}.")


class _FixedTransform(LazyTransform):
    r"""Wraps a :class:`~torch.distributions.Transform` (possibly a module) as lazy."""

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, c: Tensor | None = None) -> Transform:
        return self.transform


def as_lazy_transform(flow: object, features: int) -> LazyTransform:
    r"""Returns what a flow callable built as a zuko lazy transformation.

    Arguments:
        flow: A zuko ``Flow`` (its transform is used), a zuko ``LazyTransform`` or a torch
            ``Transform`` of vectors.
        features: The number of features it was built for (for the error message).

    Example:
        >>> from torch.distributions import AffineTransform
        >>> lazy = as_lazy_transform(AffineTransform(0.0, 2.0, event_dim=1), 3)
        >>> lazy()(torch.ones(3))
        tensor([2., 2., 2.])
    """

    if isinstance(flow, Flow):
        return flow.transform
    if isinstance(flow, LazyTransform):
        return flow
    if isinstance(flow, Transform):
        return _FixedTransform(flow)
    raise TypeError(
        f"flow({features}) returned {type(flow).__name__}; expected a zuko Flow, a zuko "
        "LazyTransform or a torch Transform of vectors."
    )
