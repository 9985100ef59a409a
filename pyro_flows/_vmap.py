r"""Runs a model once per particle or draw under :func:`torch.func.vmap`, and names the layer
to blame when a model does not broadcast over particles.

Pyro vectorizes particles and draws with an extra :class:`pyro.plate` to the left of the
model's plates: every site gets a leading dimension, and the model must broadcast over it. A
torch layer with sampled weights, such as ``PyroModule[nn.Linear]`` with ``PyroSample``
weights (Pyro's Bayesian regression tutorial), does not: ``F.linear`` takes one weight
matrix, not a batch of them. :func:`torch.func.vmap` runs such a model on one particle's
values at a time, as written, in one vectorized pass.

Under :func:`torch.func.vmap`, Pyro's validation is off (it calls :py:`bool` on tensors), and
the model's own draws (posterior predictive, prior) need :class:`FunctionalRandom`.
"""

__all__ = [
    "SAMPLING_ERRORS",
    "Culprit",
    "FunctionalRandom",
    "culprit",
    "layer_advice",
    "log_joint",
    "reason",
    "replay_draws",
    "resample_draws",
    "vmapped",
]

import math
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine import Trace
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._replay import ResampleObserved, SetValues, samples, trace

# What torch.func.vmap raises on what it cannot run (.item(), data-dependent control flow,
# in-place writes of batched into unbatched tensors, autograd.Functions without vmap rules).
SAMPLING_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError)

LINEAR = (
    "(weight @ x.unsqueeze(-1)).squeeze(-1) + bias, or torch.einsum('...i,...oi->...o', x, "
    "weight) + bias (not x @ weight.transpose(-1, -2) + bias: it runs, but mixes the draws "
    "or particles, silently)"
)


class FunctionalRandom(TorchFunctionMode):
    r"""Turns in-place random fills into out-of-place draws of the same shape.

    Under :py:`torch.func.vmap(..., randomness="different")`, an in-place fill of a tensor
    made inside the function (``torch.empty(shape).normal_()``, how torch's ``Normal``,
    ``Cauchy``, ``Exponential``, ``Laplace``... sample) cannot differ between draws, and
    vmap refuses it. Drawn out of place (``torch.randn(shape)``), the numbers do differ.
    Every sampler in torch and Pyro uses the returned tensor, not the filled one.

    Example:
        >>> def draw(loc):
        ...     with FunctionalRandom():
        ...         return pyro.distributions.Normal(loc, 1.0).sample()
        >>> torch.func.vmap(draw, randomness="different")(torch.zeros(3)).shape
        torch.Size([3])
    """

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        fill = _FILLS.get(getattr(func, "__name__", ""))
        if fill is None or not args or not isinstance(args[0], Tensor):
            return func(*args, **kwargs)
        return fill(args[0], *args[1:], **kwargs)


def _uniform(t: Tensor) -> Tensor:
    return torch.rand(t.shape, dtype=t.dtype, device=t.device)


def _normal(t: Tensor, mean: float = 0.0, std: float = 1.0, **_: Any) -> Tensor:
    return torch.randn(t.shape, dtype=t.dtype, device=t.device) * std + mean


def _fill_uniform(t: Tensor, low: float = 0.0, high: float = 1.0, **kwargs: Any) -> Tensor:
    low, high = kwargs.get("from", low), kwargs.get("to", high)
    return _uniform(t) * (high - low) + low


def _exponential(t: Tensor, lambd: float = 1.0, **_: Any) -> Tensor:
    return -torch.log1p(-_uniform(t)) / lambd


def _cauchy(t: Tensor, median: float = 0.0, sigma: float = 1.0, **_: Any) -> Tensor:
    return median + sigma * torch.tan(math.pi * (_uniform(t) - 0.5))


def _log_normal(t: Tensor, mean: float = 1.0, std: float = 2.0, **_: Any) -> Tensor:
    return _normal(t, mean, std).exp()


_FILLS: dict[str, Callable[..., Tensor]] = {
    "normal_": _normal,
    "uniform_": _fill_uniform,
    "exponential_": _exponential,
    "cauchy_": _cauchy,
    "log_normal_": _log_normal,
}


def reason(error: BaseException) -> str:
    r"""The first sentence of an error's message, to quote in another one.

    Example:
        >>> reason(RuntimeError("vmap: It looks like you're calling .item(). We don't..."))
        "vmap: It looks like you're calling .item()"
    """
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return text.split(". ")[0].removesuffix(".")


def vmapped(
    fn: Callable[[dict[str, Tensor]], Any],
    values: Mapping[str, Tensor],
    num_draws: int,
    *,
    sample: bool = False,
) -> Any:
    r"""Calls ``fn`` on row :math:`i` of every tensor of ``values`` for each draw :math:`i`,
    in one pass of :func:`torch.func.vmap`, with Pyro's validation off.

    Arguments:
        fn: A function of one draw's values, returning tensors (in dicts, lists, ...).
        values: Tensors with the draws as leading dimension (may be empty).
        num_draws: The number of draws.
        sample: Whether ``fn`` draws random numbers (then with :class:`FunctionalRandom`).

    Returns:
        What ``fn`` returns, each tensor with the draws as leading dimension.

    Example:
        >>> vmapped(lambda v: v["x"].sum(), {"x": torch.ones(4, 3)}, 4)
        tensor([3., 3., 3., 3.])
    """

    def one(row: dict[str, Tensor], _: Tensor) -> Any:
        with FunctionalRandom() if sample else nullcontext():
            return fn(row)

    with pyro.validation_enabled(False), warnings.catch_warnings():
        # Ops without a batching rule run in a loop, with a warning: still right.
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        run = torch.func.vmap(one, randomness="different")
        return run(dict(values), torch.zeros(num_draws))


def log_joint(
    model: Callable,
    values: Mapping[str, Tensor],
    num_draws: int,
    args: tuple,
    kwargs: dict,
    subsample: Trace | None = None,
) -> Tensor:
    r"""Returns the model's log-joint density at each draw of its latent sites' values.

    Arguments:
        model: The model.
        values: Every latent site's values, shaped ``(num_draws, *shape)``.
        num_draws: The number of draws.
        args: The model's positional arguments.
        kwargs: The model's keyword arguments.
        subsample: A trace of the subsample sites to replay (the guide's plate indices).
    """

    def one(row: dict[str, Tensor]) -> Tensor:
        fn = SetValues(row)(model)
        if subsample is not None:
            fn = poutine.replay(fn, trace=subsample)
        return torch.as_tensor(trace(fn, args, kwargs).log_prob_sum())

    return vmapped(one, values, num_draws)


def replay_draws(
    model: Callable,
    values: Mapping[str, Tensor],
    num_draws: int,
    args: tuple,
    kwargs: dict,
    *,
    observed: list[str],
    deterministic: list[str],
) -> dict[str, dict[str, Tensor]]:
    r"""Replays the model on each draw of its latent sites' values.

    Returns:
        Per draw: every site's log-density, summed (``"log_prob"``), and its number of NaN
        or :math:`+\infty` values (``"nonfinite"``); the pointwise log-densities of the
        ``observed`` sites, unscaled with masked points zero (``"log_likelihood"``); the
        values of the ``deterministic`` sites (``"value"``).
    """

    def one(row: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        model_trace = trace(SetValues(row)(model), args, kwargs)
        model_trace.compute_log_prob()
        out: dict[str, dict[str, Tensor]] = {}
        out["log_prob"], out["nonfinite"] = {}, {}
        for name, site in samples(model_trace):
            log_prob = torch.as_tensor(site["log_prob"])
            out["log_prob"][name] = log_prob.sum()
            out["nonfinite"][name] = (torch.isnan(log_prob) | torch.isposinf(log_prob)).sum()
        nodes = model_trace.nodes
        out["log_likelihood"] = {
            name: scale_and_mask(nodes[name]["unscaled_log_prob"], mask=nodes[name]["mask"])
            for name in observed
        }
        out["value"] = {name: nodes[name]["value"] for name in deterministic}
        return out

    return vmapped(one, values, num_draws)


def resample_draws(
    model: Callable,
    values: Mapping[str, Tensor],
    num_draws: int,
    names: list[str],
    args: tuple,
    kwargs: dict,
) -> dict[str, Tensor]:
    r"""Draws the model's observed sites anew (and its latent sites not in ``values``) given
    each draw of ``values``; returns the named sites' values, the draws leading.

    With empty ``values``, these are ``num_draws`` draws from the model alone (the prior).
    """

    def one(row: dict[str, Tensor]) -> dict[str, Tensor]:
        resampled = trace(ResampleObserved()(SetValues(row)(model)), args, kwargs)
        return {name: resampled.nodes[name]["value"] for name in names}

    return vmapped(one, values, num_draws, sample=True)


@dataclass(frozen=True)
class Culprit:
    r"""A torch layer of the model whose weights are sampled (``PyroSample``).

    Arguments:
        layer: The torch class, e.g. ``"nn.Linear"``.
        name: The module's name in the model, e.g. ``"linear"``.
        sites: The sample sites of its weights, e.g. ``("linear.weight", "linear.bias")``.
        raised: Whether the error was raised in the layer's code (else the layer is only
            the likely cause).
    """

    layer: str
    name: str
    sites: tuple[str, ...]
    raised: bool = True

    def __str__(self) -> str:
        sites = ", ".join(repr(site) for site in self.sites)
        if self.raised:
            return (
                f"The {self.layer} module {self.name!r} has sampled weights ({sites}): "
                "torch's layers take one weight, not a batch of them, so they do not "
                "broadcast over a leading dimension."
            )
        return (
            f"The likely cause: the {self.layer} module {self.name!r} has sampled weights "
            f"({sites}), and the layer, or a product written by hand with them, does not "
            "broadcast over a leading dimension."
        )


def culprit(error: BaseException | None, model: object) -> Culprit | None:
    r"""Returns the torch layer with sampled weights in whose code ``error`` was raised (or,
    failing that, the first such layer among the model's modules), if any.

    Example:
        >>> from pyro.nn import PyroModule, PyroSample
        >>> layer = PyroModule[nn.Linear](3, 1)
        >>> layer.weight = PyroSample(pyro.distributions.Normal(0.0, 1.0).expand([1, 3]))
        >>> culprit(None, layer)
        Culprit(layer='nn.Linear', name='PyroLinear', sites=('weight',), raised=False)
    """
    for module in _raised_in(error):
        found = _as_culprit(module, raised=True)
        if found is not None:
            return found
    for module in _modules(model):
        found = _as_culprit(module, raised=False)
        if found is not None:
            return found
    return None


def _raised_in(error: BaseException | None) -> Iterator[nn.Module]:
    r"""The modules whose methods are on the traceback of ``error`` (and the errors that
    caused it), innermost first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
        for frame in reversed(frames):
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module):
                yield module
        error = error.__cause__ or error.__context__


def _modules(model: object) -> Iterator[nn.Module]:
    if isinstance(model, nn.Module):
        yield from model.modules()


def _as_culprit(module: nn.Module, raised: bool) -> Culprit | None:
    sampled = module.__dict__.get("_pyro_samples") or {}
    layer = _torch_layer(type(module))
    if not sampled or layer is None:
        return None
    prefix = module.__dict__.get("_pyro_name") or ""
    sites = tuple(f"{prefix}.{name}" if prefix else name for name in sampled)
    return Culprit(f"nn.{layer.__name__}", prefix or type(module).__name__, sites, raised)


def _torch_layer(cls: type) -> type | None:
    r"""The torch layer class (``nn.Linear``, ``nn.Conv1d``...) that ``cls`` derives from."""
    for base in cls.__mro__:
        module = base.__module__
        if module.startswith("torch.nn.modules.") and base is not nn.Module:
            return base
    return None


def layer_advice(found: Culprit) -> str:
    r"""How to write the layer so that it broadcasts, or :py:`""` if no simple form is known.

    Example:
        >>> print(layer_advice(Culprit("nn.Linear", "linear", ("linear.weight",))))
        write the layer so that it broadcasts: (weight @ x.unsqueeze(-1)).squeeze(-1) + ...
    """
    if found.layer != "nn.Linear":
        return ""
    return f"write the layer so that it broadcasts: {LINEAR}"
