r"""Data-parallel SVI on PyTorch Lightning: :class:`SVIModule`.

Lightning is an optional dependency (``pip install "pyro-flows[lightning]"``): this module
imports without it, and :class:`SVIModule` raises an :py:`ImportError` that says what to
install when it is built. Nothing else in the package imports this module.

Each process of a data-parallel run (``Trainer(strategy="ddp", devices=2)``) draws its own
minibatches (Lightning gives the data loader a distributed sampler) and computes the ELBO
loss on them; DDP averages the gradients. With the model's plate given its full size and the
batch (``pyro.plate("data", size, subsample=index)``), each process's loss is an unbiased
estimate of the full-data loss, and so is their average: two processes with batches of ``B``
take the steps of one process with batches of ``2 B``.
"""

from __future__ import annotations

__all__ = ["SVIModule"]

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoGuide, AutoGuideList
from torch import Tensor

from .guides import AutoFlowGuide

INSTALL = 'pip install "pyro-flows[lightning]"'  # or: pip install "lightning>=2.2"


class _LightningMissing(torch.nn.Module):
    r"""Stands in for ``LightningModule`` where Lightning is not installed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError(f"SVIModule needs PyTorch Lightning, which is not installed: {INSTALL}.")


try:
    from lightning.pytorch import LightningModule
except ImportError:  # pragma: no cover - tested with Lightning installed
    LightningModule = _LightningMissing


def call_args(batch: object) -> tuple[tuple, dict]:
    r"""Returns the model's positional and keyword arguments for one batch of a data loader.

    A tuple or list is passed as positional arguments (``model(*batch)``, as a
    :class:`~torch.utils.data.TensorDataset` gives), a mapping as keyword arguments
    (``model(**batch)``), anything else as the one argument.

    Arguments:
        batch: A batch of the training data loader.

    Returns:
        The positional and keyword arguments.

    Example:
        >>> call_args([torch.zeros(2), torch.ones(2)])
        ((tensor([0., 0.]), tensor([1., 1.])), {})
        >>> call_args({"y": torch.ones(1)})
        ((), {'y': tensor([1.])})
    """

    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return tuple(batch), {}
    return (batch,), {}


def is_set_up(guide: object) -> bool:
    r"""Returns whether a guide's parameters exist: Pyro's autoguides create them at their
    first call (for :class:`~pyro.infer.autoguide.AutoGuideList`, that of every part).

    Arguments:
        guide: A guide.

    Returns:
        :py:`False` for an autoguide that has not been called yet, else :py:`True`.

    Example:
        >>> from pyro.infer.autoguide import AutoNormal
        >>> is_set_up(AutoNormal(lambda: None))
        False
    """

    if isinstance(guide, AutoGuideList):
        return guide.prototype_trace is not None and all(is_set_up(part) for part in guide)
    if isinstance(guide, AutoGuide):
        return guide.prototype_trace is not None
    return True


class SVIModule(LightningModule):
    r"""Creates a Lightning module that fits a guide to a Pyro model by SVI.

    ``training_step`` returns the ELBO loss of one batch (the model's plates scale it to the
    full data) and logs it as ``"train_loss"`` (each step, process 0's, in the progress bar).
    ``configure_optimizers`` gives ``optimizer(self.parameters(), lr=lr)``, and
    `lr_schedule` as a scheduler stepped every step.
    Lightning does the rest: devices, DDP, progress, logging, checkpoints
    (``Trainer(...).fit(module, loader, ckpt_path=...)`` resumes).

    The guide's parameters must exist before Lightning builds the optimizer and DDP wraps
    the module, and Pyro's autoguides create theirs at their first call: pass one batch of
    the training data as `example_batch`, and the module calls the loss on it here. Under
    ``strategy="ddp"`` Lightning runs the script again in each process, which builds the
    module there the same way; DDP then copies process 0's parameters to the others.

    Every parameter that the model and guide use must be a parameter of this module (of a
    :class:`~pyro.nn.PyroModule` model, or of the guide): Lightning's optimizer and DDP see
    only those. A ``pyro.param`` statement in a model function is refused at set-up.

    Pyro indexes the parameters of local latent sites (inside a subsampled plate) by a
    subsample only when it is smaller than the plate's full size, so with Pyro's guides a
    shuffled batch of all its elements would give each element another's parameters: such a
    set-up batch is refused. :class:`~pyro_flows.AutoFlowGuide` indexes such a batch itself.

    Arguments:
        model: A Pyro model, called as ``model(*batch)`` for a batch that is a tuple or list
            (as a :class:`~torch.utils.data.TensorDataset` gives), ``model(**batch)`` for a
            mapping. A subsampled plate takes its full size and the batch's indices:
            ``pyro.plate("data", size, subsample=index)``.
        guide: A guide of `model` that is a torch module: an autoguide such as
            :class:`~pyro_flows.AutoFlowGuide`, or a :class:`~pyro.nn.PyroModule`. For
            local latent sites of a subsampled plate, give the autoguide the model's plates
            (``create_plates=``), so that it draws the batch's elements.
        example_batch: One batch of the training data loader, to set the guide up on. May
            be left out when the guide has been called already.
        loss: A Pyro ELBO. If :py:`None`, :class:`~pyro.infer.Trace_ELBO`.
        lr: The learning rate.
        optimizer: A torch optimizer class, or a function of the parameters and `lr` that
            returns an optimizer.
        lr_schedule: A factor on the learning rate as a function of the step, e.g.
            :py:`lambda step: 0.1 ** (step / num_steps)` (a
            :class:`~torch.optim.lr_scheduler.LambdaLR` stepped after every step), as in
            :func:`~pyro_flows.fit`. If :py:`None`, a constant learning rate.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> import lightning  # doctest: +SKIP
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from pyro_flows import AutoFlowGuide
        >>> def model(index, y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", 1000, subsample=index):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = 3.0 + torch.randn(1000)
        >>> loader = DataLoader(TensorDataset(torch.arange(1000), y), batch_size=100)
        >>> guide = AutoFlowGuide(model, init="prior")
        >>> module = SVIModule(model, guide, next(iter(loader)), lr=0.05)  # doctest: +SKIP
        >>> trainer = lightning.Trainer(
        ...     max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False
        ... )  # doctest: +SKIP
        >>> trainer.fit(module, loader)  # doctest: +SKIP
        >>> mu = guide.median(*next(iter(loader)))["mu"]
        >>> bool(abs(mu - y.mean()) < 0.1)  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        model: Callable[..., object],
        guide: torch.nn.Module,
        example_batch: object = None,
        *,
        loss: ELBO | None = None,
        lr: float = 0.01,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        lr_schedule: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(guide, torch.nn.Module):
            raise TypeError(
                f"SVIModule's guide must be a torch module, got {type(guide).__name__}: "
                "Lightning's optimizer and DDP train a module's parameters only. Use an "
                "autoguide (e.g. pyro_flows.AutoFlowGuide(model)) or a pyro.nn.PyroModule."
            )
        self.model = model
        self.guide = guide
        self.elbo = Trace_ELBO() if loss is None else loss
        self.lr = lr
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        if example_batch is not None:
            self._set_up(example_batch)

    def _set_up(self, batch: object) -> None:
        args, kwargs = call_args(batch)
        with poutine.trace(param_only=True) as capture:
            self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)
        if not isinstance(self.guide, AutoFlowGuide):  # which indexes a full subsample itself
            _check_full_subsample(poutine.trace(self.model).get_trace(*args, **kwargs))
        own = {id(p) for p in self.parameters()}
        outside = [
            name
            for name, site in capture.trace.nodes.items()
            if id(_unconstrained(site["value"])) not in own
        ]
        if outside:
            raise ValueError(
                f"Parameters {outside} (pyro.param) are used by the model or guide but are "
                "not parameters of this module, so Lightning's optimizer and DDP would leave "
                "them untrained. Declare them in a pyro.nn.PyroModule model "
                "(self.w = PyroParam(...)) or in the guide."
            )

    def setup(self, stage: str) -> None:
        r"""Checks, in every process before DDP wraps the module, that the guide is set up.

        Arguments:
            stage: Lightning's stage (``"fit"``, ...).

        Example:
            >>> import pyro
            >>> from pyro.infer.autoguide import AutoNormal
            >>> model = lambda: pyro.sample("mu", pyro.distributions.Normal(0.0, 1.0))
            >>> SVIModule(model, AutoNormal(model)).setup("fit")  # doctest: +SKIP
            Traceback (most recent call last):
            RuntimeError: The guide's parameters do not exist yet (AutoNormal creates ...
        """

        if not is_set_up(self.guide):
            raise RuntimeError(
                f"The guide's parameters do not exist yet ({type(self.guide).__name__} "
                "creates them at its first call), and Lightning is about to build the "
                "optimizer and wrap the module for DDP without them. Pass one batch of the "
                "training data to set it up first: "
                "SVIModule(model, guide, example_batch=next(iter(loader)))."
            )

    def training_step(self, batch: object, batch_idx: int) -> Tensor:
        r"""Returns the ELBO loss (negative ELBO estimate) of one batch, and logs it.

        Arguments:
            batch: A batch of the training data loader.
            batch_idx: Its index in the epoch.

        Returns:
            The loss, which Lightning differentiates.

        Example:
            >>> import pyro
            >>> from pyro.infer.autoguide import AutoNormal
            >>> def model(y):
            ...     mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 1.0))
            ...     pyro.sample("y", pyro.distributions.Normal(mu, 1.0), obs=y)
            >>> batch = (torch.tensor(0.5),)
            >>> module = SVIModule(model, AutoNormal(model), batch)  # doctest: +SKIP
            >>> module.training_step(batch, 0).requires_grad  # doctest: +SKIP
            True
        """

        args, kwargs = call_args(batch)
        loss = self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)
        self.log("train_loss", loss, prog_bar=True, batch_size=1)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        r"""Returns the optimizer of the model's and guide's parameters, with the learning-rate
        schedule if there is one.

        Returns:
            The optimizer, or Lightning's dictionary of the optimizer and its scheduler.

        Example:
            >>> import pyro
            >>> from pyro.infer.autoguide import AutoNormal
            >>> model = lambda: pyro.sample("mu", pyro.distributions.Normal(0.0, 1.0))
            >>> module = SVIModule(model, AutoNormal(model), ())  # doctest: +SKIP
            >>> type(module.configure_optimizers()).__name__  # doctest: +SKIP
            'Adam'
        """

        optimizer = self.optimizer(self.parameters(), lr=self.lr)
        if self.lr_schedule is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _check_full_subsample(trace: poutine.Trace) -> None:
    # Pyro indexes parameters by a plate's subsample only when it is smaller than the plate:
    # a batch of all its elements in another order would pair each element's local parameters
    # with another element's data.
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or _is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            index = trace.nodes.get(frame.name, {}).get("value")
            if frame.size != frame.full_size or not isinstance(index, Tensor):
                continue
            if not torch.equal(index.cpu(), torch.arange(frame.full_size)):
                raise ValueError(
                    f"The batch holds all {frame.full_size} elements of plate "
                    f"'{frame.name}' (of local latent site '{name}') in another order than "
                    "0, 1, ...: Pyro does not index the guide's local parameters by a "
                    "subsample as large as the plate, so they would meet other elements' "
                    "data. Use batches smaller than the plate (batch_size < "
                    f"{frame.full_size}), or shuffle=False."
                )


def _is_subsample(site: dict) -> bool:
    # The sample site of a plate's subsample indices.
    return type(site["fn"]).__name__ == "_Subsample"


def _unconstrained(value: Tensor) -> Tensor:
    # Pyro's param sites hold the constrained value, with a reference to the leaf tensor.
    unconstrained = getattr(value, "unconstrained", None)
    return value if unconstrained is None else unconstrained()
