r"""Fitting a guide: :func:`fit`, its record :class:`FitResult`, and its checkpoints.

The loop (:mod:`pyro_flows._loop`) takes guarded steps (:mod:`pyro_flows._guard`) and writes
checkpoints (:mod:`pyro_flows._checkpoint`); this module is what a user calls.
"""

__all__ = [
    "FitResult",
    "fit",
    "load_checkpoint",
]

import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch
import tqdm
import tqdm.auto
from pyro.infer import ELBO
from pyro.optim import PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler

from . import _checkpoint
from ._compiled import check_mode
from ._loop import Averager, FitLoop, Stopping

AVERAGE = 0.2  # the default fraction of the final steps whose parameters are averaged


@dataclass
class FitResult:
    r"""Creates the record of a :func:`fit` run.

    Arguments:
        losses: The loss (negative ELBO) of every step, as returned by Pyro's losses.
        stop_reason: Why the fit ended: :py:`"completed"`, :py:`"early_stopping"`,
            :py:`"callback"`, :py:`"interrupted"` or :py:`"error"`.
        num_failures: How many steps had a non-finite loss, gradient or update and were undone.
        lr_factor: The product of the learning-rate cuts made after those failures.
        checkpoint: The checkpoint file, if one was written.
        averaged_steps: The number of final steps whose parameters were averaged into the
            fitted ones (see :func:`fit`'s `average`); 0 for the last iterate.
        compiled: Whether the steps ran compiled (see :func:`fit`'s `compile`), rather than
            as the ordinary SVI step.

    Example:
        >>> result = FitResult(losses=[3.0, 2.0, 1.0])
        >>> result.num_steps, result.elbo()
        (3, -2.0)
    """

    losses: list[float] = field(default_factory=list)
    stop_reason: str = "completed"
    num_failures: int = 0
    lr_factor: float = 1.0
    checkpoint: str | None = None
    averaged_steps: int = 0
    compiled: bool = False

    @property
    def num_steps(self) -> int:
        r"""The number of steps taken, counting those of a resumed checkpoint."""

        return len(self.losses)

    @property
    def interrupted(self) -> bool:
        r"""Whether the fit was stopped by :py:`KeyboardInterrupt`."""

        return self.stop_reason == "interrupted"

    def elbo(self, window: int = 100) -> float:
        r"""Returns the mean ELBO (negated loss) over the last `window` steps."""

        if not self.losses:
            return math.nan
        tail = self.losses[-window:]
        return -sum(tail) / len(tail)

    def plot(self, ax: Any = None, window: int | None = None) -> Any:
        r"""Plots the ELBO trace; see :func:`pyro_flows.plots.plot_elbo`."""

        from .plots import plot_elbo

        return plot_elbo(self, ax=ax, window=window)

    def __str__(self) -> str:
        text = f"FitResult: {self.num_steps} steps ({self.stop_reason})"
        if self.losses:
            text += f", ELBO {self.elbo():.6g} (mean of the last {min(100, self.num_steps)})"
        if self.averaged_steps:
            text += f", parameters averaged over the last {self.averaged_steps} steps"
        if self.num_failures:
            text += f", {self.num_failures} non-finite steps undone"
            text += f" (learning rate x{self.lr_factor:.3g})"
        return text


def fit(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_steps: int = 1000,
    optim: PyroOptim | None = None,
    loss: ELBO | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    callback: Callable[[int, float], bool | None] | None = None,
    progress_bar: bool | None = None,
    file: IO[str] | None = None,
    max_failures: int = 10,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    average: float = AVERAGE,
    stl: bool | None = None,
    compile: bool | str = False,
    **kwargs: Any,
) -> FitResult:
    r"""Fits a guide to a model by stochastic variational inference.

    Each step is one :py:`loss.loss_and_grads` and one :py:`optim` update, as in
    :class:`pyro.infer.SVI`. The parameters live in Pyro's param store, as with SVI. The
    default optimizer is torch's fused Adam (one kernel per parameter tensor; foreach where
    a device has no fused kernel), at :py:`lr=0.01`.

    Compiled steps (`compile`): for an :class:`~pyro_flows.AutoFlowGuide` and
    :class:`~pyro.infer.Trace_ELBO`, the loss-and-gradient step (the guide's draws for all
    particles, its log-density with STL as the guide computes it, the model's log density
    batched over the particles, and the gradients) is captured once as a graph of torch
    operations and run without Pyro's per-step tracing; :py:`"inductor"` also compiles that
    graph with Inductor. At set-up the captured step is checked against the ordinary step on
    two fresh draws (on a forked random stream: the fit's draws are the ordinary path's).
    What it cannot capture runs the ordinary step, with a one-line warning saying why: a
    model that reads tensor values in Python (control flow on values, ``.item()``), supports
    that depend on other latents, ``obs_mask`` imputation, subsampled plates, local latent
    sites, parameters of the model's own, other ELBOs, other guides. The optimizer, the guard,
    averaging and checkpoints work as on the ordinary path, on the same param store tensors.
    The model must be a function of its arguments and latent values only (a graph replays
    the operations of the traced run: Python state such as a call counter is not re-read).

    Early stopping: every `patience` steps, the mean loss over those steps is compared with
    the lowest such mean of the earlier blocks; the fit stops when it is not lower by more
    than `min_delta`.

    Averaging: the fitted parameters are the mean of the parameters after each of the last
    `average` fraction of the steps (Polyak-Ruppert averaging; the losses are those of the
    iterates). With a constant learning rate and one particle, the last iterate lies where
    the last noisy step left it: on a 100-dimensional hierarchical Gaussian, one particle and
    Adam at 0.01, the last iterate of a flow guide without STL had sds 0.84-1.19 times the
    exact ones and means up to 0.29 sd off; the mean of the last 20% of 3,000 steps 0.92-1.07
    and 0.11 sd (with STL the last iterate was already within 0.95-1.05). A fit that stops
    early averages the steps it took within that fraction, if any.

    Non-finite guard: when the loss, a gradient or an updated parameter is not finite, the
    parameters and optimizer state are restored to those before the last update, the learning
    rate is halved and the step is retried. After `max_failures` failures in a row,
    :class:`NonFiniteLossError` is raised naming the site whose log-density is not finite,
    with the parameters left at the last good state.

    :py:`KeyboardInterrupt` ends the fit at the last completed step, and the result is
    returned. A checkpoint (written atomically every `checkpoint_every` steps, at the end,
    on interrupt and on error) holds the parameters, optimizer state, loss history, step
    counter and random generator states, so a resumed fit gives the same parameters as an
    uninterrupted one with the same seed.

    Arguments:
        model: A Pyro model.
        guide: A guide for `model`, e.g. an autoguide.
        args: Positional arguments of the model and guide.
        num_steps: The total number of steps, counting those of a resumed checkpoint.
        optim: A Pyro optimizer. If :py:`None`, torch's fused Adam at :py:`lr=0.01`
            (the same as :py:`pyro.optim.Adam({"lr": 0.01, "fused": True})`, with foreach
            where a device has no fused kernel). An optimizer given here is used as it is.
            A :class:`pyro.optim.lr_scheduler.PyroLRScheduler` is stepped after every step.
        loss: A Pyro ELBO. If :py:`None`, use :class:`pyro.infer.Trace_ELBO`.
        lr_schedule: A factor on the learning rate as a function of the step, e.g.
            :py:`lambda step: 0.1 ** (step / num_steps)` (turns `optim` into a
            :class:`torch.optim.lr_scheduler.LambdaLR` scheduler).
        patience: The length of the early-stopping blocks, in steps. If :py:`None`, never
            stop early.
        min_delta: The smallest decrease of the block-mean loss that counts as progress.
        callback: A function called as :py:`callback(step, loss)` after every step; if it
            returns :py:`True` the fit stops.
        progress_bar: Whether to show a progress bar with the running ELBO. If :py:`None`,
            show it when `file` is a terminal.
        file: The stream of the progress bar. If :py:`None`, use :py:`sys.stderr`.
        max_failures: The number of non-finite steps in a row after which to give up.
        checkpoint: A file to save the fit to, and to resume from if it exists.
        checkpoint_every: The number of steps between checkpoints.
        resume: Whether to resume from `checkpoint` when it exists (if :py:`False`, it is
            overwritten).
        average: The fraction of the final steps whose parameters are averaged into the
            fitted ones; 0 keeps the last iterate. A checkpoint holds the last iterate and the
            running mean, so that a resumed fit averages the same steps.
        stl: Deprecated: set it on the guide, ``AutoFlowGuide(model, stl=True)``. Accepted
            with a ``FutureWarning`` until the next release (it sets the guide's `stl`).
        compile: :py:`False` for the ordinary SVI step; :py:`True` to capture the step as a
            graph (measured 1.6-2x fewer CPU ms per step than the SVI step, from D = 10 to
            10,000; seconds to capture); or :py:`"inductor"` to compile that graph as well
            (measured 11x fewer on eight schools, 4x at D = 1,000, 3x at D = 10,000; tens
            of seconds of compilation the first time, less once Inductor's disk cache holds
            it): for long fits. Any other value raises a :py:`ValueError`. See
            :doc:`/scale`.
        kwargs: Keyword arguments of the model and guide.

    Returns:
        The loss history and why the fit ended.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(x):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)
        >>> x = torch.tensor([1.2, 0.8, 1.1])
        >>> guide = AutoNormal(model)
        >>> result = fit(model, guide, x, num_steps=200, optim=pyro.optim.Adam({"lr": 0.05}))
        >>> result.num_steps
        200

    References:
        | Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
        | Inference (Roeder et al., 2017)
        | https://arxiv.org/abs/1703.09194
    """

    _check(num_steps, patience, min_delta, max_failures, checkpoint_every, callback)
    if not isinstance(average, int | float) or isinstance(average, bool) or not 0 <= average < 1:
        raise ValueError(
            f"average must be a fraction of the steps in [0, 1), e.g. 0.2, got {average!r}"
        )
    if checkpoint is not None and not Path(checkpoint).absolute().parent.is_dir():
        raise ValueError(f"checkpoint={os.fspath(checkpoint)!r}: its folder does not exist")
    _set_stl(guide, stl)
    check_mode(compile)
    optim = _optimizer(optim, lr_schedule)
    result = FitResult(checkpoint=None if checkpoint is None else os.fspath(checkpoint))
    averaged = round(average * num_steps)
    averager = Averager(num_steps - averaged if averaged else None)
    run = FitLoop(
        model, guide, args, kwargs, optim, loss, checkpoint, result, max_failures, averager
    )
    if checkpoint is not None and resume and Path(checkpoint).exists():
        run.resume(load_checkpoint(checkpoint))
    run.compile(compile)
    file = sys.stderr if file is None else file
    show = _is_interactive(file) if progress_bar is None else progress_bar
    with _ProgressBar(num_steps, run.step, file, show) as bar, warnings.catch_warnings():
        # Pyro warns about NaN log-densities; the guard handles them and counts them instead.
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        stopping = Stopping(patience, min_delta, callback)
        run.loop(num_steps, stopping, checkpoint_every, bar)
    run.result.compiled = run.compiled is not None
    return run.result


def _check(
    num_steps: int,
    patience: int | None,
    min_delta: float,
    max_failures: int,
    checkpoint_every: int,
    callback: Callable | None,
) -> None:
    for name, value, low in [
        ("num_steps", num_steps, 0),
        ("patience", 1 if patience is None else patience, 1),
        ("max_failures", max_failures, 1),
        ("checkpoint_every", checkpoint_every, 1),
    ]:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not min_delta >= 0:
        raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, loss), got {callback!r}")


def _set_stl(guide: Callable, stl: bool | None) -> None:
    if stl is None:
        return
    warnings.warn(
        "fit(stl=...) is deprecated: set it where the guide is made, "
        "AutoFlowGuide(model, stl=True); fit's option will be removed in the next release.",
        FutureWarning,
        stacklevel=3,
    )
    if hasattr(guide, "stl"):
        guide.stl = bool(stl)
    elif stl:
        raise TypeError(
            f"stl=True needs a guide with an `stl` attribute, such as pyro_flows.AutoFlowGuide; "
            f"{type(guide).__name__} has none (pass stl=None to leave the guide as it is)"
        )


def _fused_adam(params: Iterable[torch.Tensor], **options: Any) -> torch.optim.Adam:
    r"""Creates torch's Adam with its fused kernel, or foreach where the parameters' device
    has no fused kernel: fit's default optimizer, as ``PyroOptim(_fused_adam, {"lr": 0.01})``.

    The same numbers as the plain Adam to rounding, in one kernel per parameter tensor; at
    D = 10,000 it took an SVI step of the default guide from 156 to 89 ms. With plain SVI the
    same is :py:`pyro.optim.Adam({"lr": 0.01, "fused": True})`.

    Arguments:
        params: The parameters.
        options: Options of :class:`torch.optim.Adam` (``lr``, ``betas``, ...).

    Example:
        >>> x = torch.zeros(3, requires_grad=True)
        >>> adam = _fused_adam([x], lr=0.1)
        >>> adam.defaults["fused"]
        True
    """

    params = list(params)
    try:
        return torch.optim.Adam(params, **{"fused": True, **options})
    except RuntimeError:  # e.g. "`fused=True` requires all the params to be ... supported devices"
        return torch.optim.Adam(params, **{"foreach": True, **options})


def _optimizer(optim: PyroOptim | None, lr_schedule: Callable[[int], float] | None) -> PyroOptim:
    if optim is None:
        optim = PyroOptim(_fused_adam, {"lr": 0.01})
    if not isinstance(optim, PyroOptim):
        raise TypeError(
            f"optim must be a Pyro optimizer such as pyro.optim.Adam({{'lr': 0.01}}), "
            f"got {type(optim).__name__}"
        )
    if lr_schedule is None:
        return optim
    if isinstance(optim, PyroLRScheduler):
        raise ValueError("give either a PyroLRScheduler as optim or lr_schedule, not both")
    if not callable(lr_schedule):
        raise TypeError(f"lr_schedule must be callable as lr_schedule(step), got {lr_schedule!r}")
    args = {
        "optimizer": optim.pt_optim_constructor,
        "optim_args": optim.pt_optim_args,
        "lr_lambda": lr_schedule,
    }
    return PyroLRScheduler(torch.optim.lr_scheduler.LambdaLR, args, optim.pt_clip_args or None)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    r"""Loads a checkpoint written by :func:`pyro_flows.fit`, without unpickling any code.

    Arguments:
        path: The checkpoint file.

    Returns:
        A dict with the step counter (:py:`"step"`), the loss history (:py:`"losses"`), the
        unconstrained parameters (:py:`"params"`), the optimizer state (:py:`"optim"`) and the
        random generator states (:py:`"rng"`).

    Example:
        >>> import os, tempfile, pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> path = os.path.join(tempfile.mkdtemp(), "fit.pt")
        >>> result = fit(model, AutoNormal(model), num_steps=5, checkpoint=path)
        >>> load_checkpoint(path)["step"]
        5
    """

    return _checkpoint.read_checkpoint(path)


def _is_interactive(file: IO[str]) -> bool:
    r"""Whether `file` is a terminal, or the standard error of a Jupyter kernel."""

    if file is sys.stderr and "ipykernel" in sys.modules:
        return True
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _ProgressBar:
    r"""A tqdm bar over steps, with the mean ELBO of the last 100 steps as postfix."""

    def __init__(self, total: int, initial: int, file: IO[str], show: bool) -> None:
        self.bar = None
        if show:
            auto = file is sys.stderr and "ipykernel" in sys.modules
            cls = tqdm.auto.tqdm if auto else tqdm.tqdm
            self.bar = cls(total=total, initial=initial, file=file, unit="step", desc="fit")

    def advance(self, step: int, result: Any) -> None:
        r"""Moves the bar to `step` (backwards after a roll-back) and updates the ELBO."""

        if self.bar is None:
            return
        if step < self.bar.n or step % 10 == 0 or result.num_failures:
            postfix = {"elbo": f"{result.elbo():.5g}"}
            if result.num_failures:
                postfix["undone"] = result.num_failures
            self.bar.set_postfix(postfix, refresh=False)
        if step >= self.bar.n:
            self.bar.update(step - self.bar.n)
        else:
            self.bar.n = step
            self.bar.refresh()

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.close()
