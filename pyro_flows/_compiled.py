r"""The compiled training path of :func:`pyro_flows.fit` (``compile=True``).

One ``Trace_ELBO`` step of an :class:`~pyro_flows.AutoFlowGuide` as a function of tensors
only: the guide's few parameter tensors, the model's tensor arguments and the noise
:math:`\epsilon` of every particle. It draws :math:`z = \mu + S f(\epsilon)`, scores it under
the guide (with "sticking the landing" as the guide does it) and under the model (the packed
latent's log density, batched over particles), and returns the loss and its gradients.

The function is captured once per argument shape as a graph of torch operations
(:func:`torch.fx.experimental.proxy_tensor.make_fx` in fake mode: no tensor holds a value
while it is traced, so a graph cannot bake in a branch taken on a value; a model that reads
values in Python is refused), optionally compiled with Inductor, checked against the ordinary
SVI step on two draws, and then run without Pyro's per-step tracing. The optimizer, the
non-finite guard, averaging and checkpoints are :func:`~pyro_flows.fit`'s own: the
parameters are the param store's own tensors, so nothing needs writing back.

For autoregressive flows, STL solves :math:`J^{-\top} g` by a fixed number of Jacobi
iterations per layer (the guide's own solve stops when the residual is within rounding,
which a graph cannot do); the graph returns the residual, and a step whose residual is not
within rounding is redone without the graph, as the guide's own solve does it.
"""

from __future__ import annotations

__all__ = ["MODES", "CompiledStep", "capture", "check_mode"]

import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
import torch.nn as nn
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from torch import Tensor
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _checkpoint as ckpt
from ._guard import is_invalid_value_error
from .distributions import _call_and_ladj, _inverse_is_cheap, _layers, _log_q, _transposed_solve
from .elbo import VmapTrace_ELBO
from .guides import AutoFlowGuide

MODES = (False, True, "inductor")
# Jacobi iterations per layer of a graph, by latent dimension: those the guide's own solve
# used at most over 1,000-3,000 training steps (D = 10: 5; 100: 3; 1,000: 2), plus one.
ITERATIONS = ((50, 6), (500, 4))  # (up to D, iterations); above: 3
MISSES = 5  # steps redone exactly, within the last WINDOW, before a graph with more iterations
WINDOW = 100
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # guide -> {key: graph}


class Unsupported(Exception):
    r"""Why a step cannot be compiled; fit runs the ordinary step instead.

    Example:
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("x", pyro.distributions.Normal(0.0, 1.0))
        >>> capture(model, AutoNormal(model), Trace_ELBO(), (), {}, True)
        'the guide is AutoNormal, not an AutoFlowGuide'
    """


def check_mode(mode: object) -> None:
    r"""Raises a :py:`ValueError` unless `mode` is one of :data:`MODES`.

    Example:
        >>> check_mode("inductor")
        >>> check_mode("fast")
        Traceback (most recent call last):
        ...
        ValueError: compile='fast': use False (the ordinary SVI step), True ...
    """

    if not any(mode is m or (isinstance(m, str) and mode == m) for m in MODES):
        raise ValueError(
            f"compile={mode!r}: use False (the ordinary SVI step), True (the step captured as "
            "a graph) or 'inductor' (that graph compiled by Inductor: fastest per step, "
            "after tens of seconds of compilation)"
        )


def capture(
    model: Callable, guide: Callable, loss: ELBO, args: tuple, kwargs: dict, mode: bool | str
) -> CompiledStep | str:
    r"""Captures and checks the compiled step, or says why it cannot be used.

    The guide is set up first if it has not been (as its first call would, with the same
    random draws); the checks run on a forked random stream, so the fit's draws are those
    the ordinary path would make.

    Arguments:
        model: The model.
        guide: The guide.
        loss: The ELBO of the fit.
        args: The model's positional arguments.
        kwargs: The model's keyword arguments.
        mode: :py:`True` for the captured graph, :py:`"inductor"` to compile it.

    Returns:
        The step, or the reason for running the ordinary one, in a few words.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import Trace_ELBO
        >>> from pyro_flows import AutoFlowGuide
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> step = capture(model, AutoFlowGuide(model), Trace_ELBO(), (), {}, True)
        >>> sorted(step.params)[:2]
        ['AutoFlowGuide.flow_params', 'AutoFlowGuide.scale_diag']
    """

    try:
        return CompiledStep(model, guide, loss, args, kwargs, mode)
    except Unsupported as reason:
        return str(reason)


class CompiledStep:
    r"""The loss-and-gradient step of :func:`pyro_flows.fit` as a captured graph.

    Arguments:
        model: The model.
        guide: An :class:`~pyro_flows.AutoFlowGuide`.
        loss: A :class:`~pyro.infer.Trace_ELBO` (or :class:`~pyro_flows.VmapTrace_ELBO`).
        args: The model's positional arguments.
        kwargs: The model's keyword arguments.
        mode: :py:`True` for the captured graph, :py:`"inductor"` to compile it.

    Raises:
        Unsupported: When the step cannot be captured, or differs from the ordinary one.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import Trace_ELBO
        >>> from pyro_flows import AutoFlowGuide
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> step = CompiledStep(model, AutoFlowGuide(model), Trace_ELBO(), (), {}, True)
        >>> isinstance(step.loss_and_grads(), float)
        True
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        loss: ELBO,
        args: tuple,
        kwargs: dict,
        mode: bool | str,
    ) -> None:
        check_mode(mode)
        _check_static(guide, loss)
        if guide.prototype_trace is None:
            _set_up_guide(guide, args, kwargs)
        _check_guide(guide)
        self.model, self.guide, self.loss, self.mode = model, guide, loss, mode
        self.data, self.spec = _split_data(args, kwargs)
        self.particles = loss.num_particles
        self.vectorized = bool(loss.vectorize_particles) or isinstance(loss, VmapTrace_ELBO)
        self.params: dict[str, Tensor] = {}
        self.iterations, self.graph = _initial_iterations(len(guide.start_loc)), None
        self.calls, self.misses = 0, []
        self.tolerance = 64 * torch.finfo(guide.start_loc.dtype).eps
        with _forked_rng():
            try:
                self._set_up(args, kwargs)
            except Unsupported:
                raise
            except Exception as error:  # noqa: BLE001 - left for the ordinary step to explain
                raise Unsupported(_capture_error(error)) from error

    def loss_and_grads(self) -> float:
        r"""Draws the noise, runs the graph, sets the parameters' ``.grad``, returns the loss.

        A step whose Jacobi residual is not within rounding is redone without the graph,
        iterating until it is (as the guide's own solve); after :data:`MISSES` such steps
        within :data:`WINDOW`, the graph is captured again with two more iterations.

        Raises:
            Unsupported: When a graph with more Jacobi iterations cannot be captured.
        """

        loss, grads = self._step(self._noise())
        for param, grad in zip(self.params.values(), grads, strict=True):
            param.grad = grad
        return loss

    def _step(self, eps: Tensor) -> tuple[float, list[Tensor]]:
        self.calls += 1
        loss, grads, residual = self._run(eps)
        if not residual <= self.tolerance and math.isfinite(loss):
            return self._exact(eps)
        return loss, grads

    def _exact(self, eps: Tensor) -> tuple[float, list[Tensor]]:
        found = self._eager(eps, None)
        self.misses = [call for call in self.misses if call > self.calls - WINDOW] + [self.calls]
        passes = self._max_iterations()
        if len(self.misses) >= MISSES and self.iterations < passes:
            self.iterations, self.misses = min(self.iterations + 2, passes), []
            self.graph = self._cached(eps)
        return found

    # Set-up ---------------------------------------------------------------------------------

    def _set_up(self, args: tuple, kwargs: dict) -> None:
        self._ordinary(args, kwargs)  # a first step may draw to set itself up
        draws = [self._ordinary(args, kwargs) for _ in range(2)]  # (rng, loss, grads) each
        state = ckpt.get_rng_state()
        rng, expected_loss, expected = draws[0]
        ckpt.set_rng_state(rng)
        eps = self._noise()
        found = self._eager(eps, None)
        _compare("the step without Pyro's tracing", found, (expected_loss, expected))
        self.graph = self._cached(eps)
        for rng, expected_loss, expected in draws:
            ckpt.set_rng_state(rng)
            _compare(_describe(self.mode), self._step(self._noise()), (expected_loss, expected))
        ckpt.set_rng_state(state)
        self.calls, self.misses = 0, []

    def _ordinary(self, args: tuple, kwargs: dict) -> tuple[dict, float, list[Tensor]]:
        # One ordinary step's loss and gradients (not applied), and the random state before it.
        rng = ckpt.get_rng_state()
        with poutine.trace(param_only=True) as capture:
            try:
                value = self.loss.loss_and_grads(self.model, self.guide, *args, **kwargs)
            except Exception as error:
                if not is_invalid_value_error(error):
                    raise
                raise Unsupported("the ordinary step failed its checks on a fresh draw") from error
        sites = capture.trace.nodes.values()
        params = ckpt.param_names(site["value"].unconstrained() for site in sites)
        self._check_params(params)
        grads = [_take_grad(p) for p in self.params.values()]
        return rng, float(value), grads

    def _check_params(self, params: dict[str, Tensor]) -> None:
        prefix = f"{self.guide._pyro_name}."
        names = {f"{prefix}{name}": name for name in self.guide._pyro_params}
        others = sorted(set(params) - set(names))
        if others:
            raise Unsupported(
                f"the model has parameters of its own ({', '.join(others)}); only the guide's "
                "parameters are compiled"
            )
        if not self.params:
            self.params = {name: params[name] for name in names if name in params}
            self.keys = [f"guide.{names[name]}_unconstrained" for name in self.params]

    def _cached(self, eps: Tensor) -> Callable:
        key = self._key(eps)
        graphs = _CACHE.setdefault(self.guide, {})
        if key not in graphs:
            graphs[key] = self._capture(eps)
        return graphs[key]

    def _key(self, eps: Tensor) -> tuple:
        shapes = tuple((t.shape, t.dtype, t.device) for t in self.data)
        return (
            self.model,
            self.mode,
            self.iterations,
            self.guide.stl,
            eps.shape,
            shapes,
            self.spec.key(),
        )

    def _capture(self, eps: Tensor) -> Callable:
        inputs = [*self.params.values(), *self.data, eps]
        latent = self.guide._latent
        ways = latent._way, latent._checked  # a failed trace must not change them
        try:
            with pyro.validation_enabled(False), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = make_fx(self._function(), tracing_mode="fake", _allow_non_fake_inputs=True)
                graph = _simplified(graph(*inputs))
        except Exception as error:  # noqa: BLE001 - any failure to capture means: fall back
            raise Unsupported(_capture_error(error)) from error
        finally:
            latent._way, latent._checked = ways
            self.guide.get_posterior()  # binds the flow to the live parameters again
        if self.mode == "inductor":
            return _inductor(graph, inputs)
        return graph

    def _function(self) -> Callable[..., tuple[Tensor, ...]]:
        return _StepFunction(self, self.iterations)

    # Stepping -------------------------------------------------------------------------------

    def _noise(self) -> Tensor:
        # The draws of the ordinary step, from the same random stream in the same order.
        start = self.guide.start_loc
        options = {"dtype": start.dtype, "device": start.device}
        shape = (self.particles, len(start))
        if self.vectorized or self.particles == 1:
            return torch.randn(shape, **options)
        return torch.stack([torch.randn(shape[1:], **options) for _ in range(self.particles)])

    def _eager(self, eps: Tensor, iterations: int | None) -> tuple[float, list[Tensor]]:
        loss, *grads, _ = _StepFunction(self, iterations)(*self._inputs(eps))
        return float(loss), [g.detach() for g in grads]

    def _run(self, eps: Tensor) -> tuple[float, list[Tensor], float]:
        with torch.no_grad():
            loss, *grads, residual = self.graph(*self._inputs(eps))
        return float(loss), grads, float(residual)

    def _inputs(self, eps: Tensor) -> list[Tensor]:
        return [*self.params.values(), *self.data, eps]

    def device_rng_state(self) -> Tensor | None:
        r"""The state of the generator of the noise, where it is not the CPU's."""
        device = self.guide.start_loc.device
        return torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def set_device_rng_state(self, state: Tensor | None) -> None:
        r"""Restores :meth:`device_rng_state`."""
        if state is not None:
            torch.cuda.set_rng_state(state, self.guide.start_loc.device)

    def _max_iterations(self) -> int:
        layers = _layers(self.guide.get_posterior().transform)
        return max(getattr(layer, "passes", 1) for layer in layers)


class _StepFunction:
    r"""The loss, its gradients and the Jacobi residual, as a function of tensors only."""

    def __init__(self, step: CompiledStep, iterations: int | None) -> None:
        self.step, self.iterations = step, iterations
        self.module = _PosteriorModule(step.guide)

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        step = self.step
        count = len(step.params)
        params, data, eps = inputs[:count], inputs[count:-1], inputs[-1]
        args, kwargs = step.spec.fill(data)
        residuals: list[Tensor] = []
        live = self._posterior(params)
        y, ladj = _call_and_ladj(live.transform, eps)
        z = live.loc + live.scale.apply(y)
        if step.guide.stl:
            stop = self._posterior([p.detach() for p in params])
            log_q = _stl_log_q(stop, z, eps, self.iterations, residuals)
        else:
            log_q = _log_q(eps, ladj, live.scale)
        log_p = step.guide._latent.log_densities(z, step.model, args, kwargs)
        loss = (log_q - log_p).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]
        residual = torch.stack(residuals).amax() if residuals else loss.new_zeros(())
        return (loss.detach(), *grads, residual.detach())

    def _posterior(self, params: Sequence[Tensor]) -> Any:
        values = dict(zip(self.step.keys, params, strict=True))
        return torch.func.functional_call(self.module, values, ())


class _PosteriorModule(nn.Module):
    r"""``guide.get_posterior()`` as a module call, so that ``functional_call`` can swap the
    guide's parameters for the step's inputs."""

    def __init__(self, guide: AutoFlowGuide) -> None:
        super().__init__()
        self.guide = guide

    def forward(self) -> Any:
        return self.guide.get_posterior()


def _stl_log_q(
    stop: Any, z: Tensor, eps: Tensor, iterations: int | None, residuals: list
) -> Tensor:
    r"""The guide's STL log-density of its own draw ``z`` (``detached_log_prob``), with a
    fixed number of Jacobi iterations for autoregressive layers."""

    y = stop.scale.solve(z - stop.loc)
    if _inverse_is_cheap(stop.transform):
        x = stop.transform.inv(y)
    else:
        layers = _layers(stop.transform)
        x = _FixedInverse.apply(y, eps, _solver(layers, eps, iterations, residuals))
    _, ladj = _call_and_ladj(stop.transform, x)
    return _log_q(x, ladj, stop.scale)


class _FixedInverse(torch.autograd.Function):
    @staticmethod
    def forward(y: Tensor, eps: Tensor, solve: Callable[[Tensor], Tensor]) -> Tensor:
        return eps.detach().clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.solve = inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return ctx.solve(grad), None, None


def _solver(
    layers: list, eps: Tensor, iterations: int | None, residuals: list
) -> Callable[[Tensor], Tensor]:
    def solve(grad: Tensor) -> Tensor:
        return _transposed_solve(layers, eps.detach(), grad.detach(), iterations, residuals)

    return solve


# Checks ------------------------------------------------------------------------------------


def _set_up_guide(guide: AutoFlowGuide, args: tuple, kwargs: dict) -> None:
    # As its first call does; an error is left for the ordinary step to raise and explain.
    try:
        guide._setup_prototype(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        guide.prototype_trace = None
        raise Unsupported(f"the set-up of the guide failed ({type(error).__name__})") from error


def _initial_iterations(dim: int) -> int:
    return next((iterations for up_to, iterations in ITERATIONS if dim <= up_to), 3)


def _check_static(guide: Callable, loss: ELBO) -> None:
    if not isinstance(guide, AutoFlowGuide):
        raise Unsupported(f"the guide is {type(guide).__name__}, not an AutoFlowGuide")
    if type(loss) not in (Trace_ELBO, VmapTrace_ELBO):
        raise Unsupported(
            f"the loss is {type(loss).__name__}; only Trace_ELBO (and VmapTrace_ELBO) compile"
        )
    if getattr(loss, "tail_adaptive_beta", -1.0) != -1.0:
        raise Unsupported("Trace_ELBO with tail_adaptive_beta does not compile")


def _check_guide(guide: AutoFlowGuide) -> None:
    latent = guide._latent
    if getattr(guide, "_local", None) is not None:
        raise Unsupported("the model has local latent sites in subsampled plates")
    if latent.subsampled is not None:
        name, frame = latent.subsampled
        raise Unsupported(f"site {name!r} is in plate {frame.name!r}, which is subsampled")
    if latent.dependent:
        sites = ", ".join(sorted(latent.dependent))
        raise Unsupported(f"the supports of {sites} depend on other latents")
    imputed = [name for name in latent.sites if name.endswith("_unobserved")]
    if latent.live or imputed:
        raise Unsupported(f"the model imputes data (obs_mask): {', '.join(imputed)}")
    layers = _layers(guide.get_posterior().transform)
    autoregressive = all(hasattr(layer, "meta") for layer in layers)
    if guide.stl and not autoregressive and not _inverse_is_cheap(guide.get_posterior().transform):
        raise Unsupported(
            "STL on this flow needs its Jacobian (neither coupling nor autoregressive)"
        )


def _compare(
    what: str, found: tuple[float, list[Tensor]], expected: tuple[float, list[Tensor]]
) -> None:
    r"""Raises :class:`Unsupported` unless loss and gradients agree to rounding."""

    (loss, grads), (loss_0, grads_0) = found, expected
    dtype = grads_0[0].dtype if grads_0 else torch.float32
    rtol = math.sqrt(torch.finfo(dtype).eps)
    if not math.isfinite(loss_0):
        raise Unsupported("the ordinary step's loss was not finite on a fresh draw")
    bad = abs(loss - loss_0) > rtol * (1 + abs(loss_0))
    for grad, grad_0 in zip(grads, grads_0, strict=True):
        bad = bad or bool(
            torch.linalg.norm(grad - grad_0) > rtol * (1 + torch.linalg.norm(grad_0))
        )
    if bad:
        raise Unsupported(
            f"{what} differs from the ordinary SVI step on a fresh draw (loss {loss:.6g} vs "
            f"{loss_0:.6g}): the model's result depends on something a graph cannot hold"
        )


def _describe(mode: bool | str) -> str:
    return "the Inductor-compiled step" if mode == "inductor" else "the captured graph"


def _capture_error(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".split("\n")[0][:200]
    if "data-dependent" in text.lower() or "DataDependent" in text or "DynamicOutput" in text:
        return (
            "the model reads tensor values in Python (control flow on values, .item(), "
            f"a mask's nonzero count), which a graph cannot hold ({text})"
        )
    return f"the step could not be captured ({text})"


# Tensors in, tensors out ---------------------------------------------------------------------


def _split_data(args: tuple, kwargs: dict) -> tuple[list[Tensor], _Arguments]:
    r"""The model's tensor arguments (the graph's inputs), and the rest of the arguments."""

    leaves, treespec = tree_flatten((args, kwargs))
    data = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    return data, _Arguments(leaves, treespec)


class _Arguments:
    r"""The model's arguments with their tensors left out, and a way to put others in."""

    def __init__(self, leaves: list, treespec: Any) -> None:
        self.leaves, self.treespec = leaves, treespec
        self.tensor = [isinstance(leaf, Tensor) for leaf in leaves]

    def fill(self, data: Sequence[Tensor]) -> tuple[tuple, dict]:
        r"""Returns ``(args, kwargs)`` with `data` in the places of the tensors."""
        it = iter(data)
        leaves = [
            next(it) if t else leaf for leaf, t in zip(self.leaves, self.tensor, strict=True)
        ]
        return tree_unflatten(leaves, self.treespec)

    def key(self) -> tuple:
        r"""What besides tensor shapes may change the graph: the other arguments' values."""
        static = [leaf for leaf, t in zip(self.leaves, self.tensor, strict=True) if not t]
        return (str(self.treespec), tuple(_hashable(leaf) for leaf in static))


def _hashable(value: object) -> object:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _take_grad(param: Tensor) -> Tensor:
    grad = torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
    param.grad = None
    return grad


def _simplified(graph: GraphModule) -> GraphModule:
    r"""Drops ``detach`` nodes (the graph runs without autograd, where they do nothing), then
    merges repeated computations (STL's detached copy of the guide's affine part, which is
    then the live one) and drops unused ones: 12% fewer operations on eight schools."""

    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    if not any(_mutates(node) for node in graph.graph.nodes):
        graph = CSEPass()(graph).graph_module  # (it would merge repeated in-place updates)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _inductor(graph: GraphModule, inputs: list[Tensor]) -> Callable:
    compiled = torch.compile(graph, fullgraph=True, dynamic=False)
    try:
        # with the inputs of the steps (parameters that require grad, under no_grad): other
        # inputs would fail Dynamo's guards and compile again at the first step
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Inductor's own deprecation warnings
            compiled(*inputs)
    except Exception as error:  # noqa: BLE001 - a failed compile means: fall back
        raise Unsupported(_inductor_error(error)) from error
    return _Quiet(compiled)


def _inductor_error(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".split("\n")[0][:200]
    return f"Inductor could not compile the graph ({text})"


class _Quiet:
    r"""An Inductor-compiled graph whose calls silence Inductor's own warnings (a change of
    the inputs' device or layout compiles it again) and report a failure as
    :class:`Unsupported`, so that the fit goes on with the ordinary step."""

    def __init__(self, compiled: Callable) -> None:
        self.compiled = compiled

    def __call__(self, *inputs: Tensor) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self.compiled(*inputs)
        except Exception as error:  # noqa: BLE001
            raise Unsupported(_inductor_error(error)) from error


class _forked_rng:
    r"""Restores the random states on exit: the set-up's draws leave the fit's stream alone."""

    def __enter__(self) -> None:
        self.state = ckpt.get_rng_state()

    def __exit__(self, *exc: object) -> None:
        ckpt.set_rng_state(self.state)
