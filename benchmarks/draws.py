"""Runs a target's model on batches of draws: every site's value and each draw's log density.

The model is conditioned on the draws under a plate over draws placed left of its own plates
(as Pyro's vectorized particles are), with Pyro's public handlers only.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger

from .targets.base import Target, init_to_uniform_unconstrained

DRAWS = "_benchmark_draws"


def is_reported(site: dict) -> bool:
    r"""Whether a trace node is a latent sample site or a deterministic site."""
    if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
        return False
    return not site["is_observed"] or bool(site["infer"].get("_deterministic"))


def latent_names(target: Target) -> list[str]:
    r"""Returns the names of the model's latent sample sites, in the order the model draws them.

    Example:
        >>> from benchmarks.targets import load_target
        >>> latent_names(load_target("banana"))
        ['x1', 'x2']
    """
    model = InitMessenger(init_to_uniform_unconstrained)(target.model)
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(*target.args)
    return [
        name for name, site in trace.nodes.items() if is_reported(site) and not site["is_observed"]
    ]


def _tensors(draws: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.get_default_dtype()) for k, v in draws.items()}


def _one_draw_trace(target: Target, draws: dict[str, torch.Tensor]) -> poutine.Trace:
    """The model's trace at the first draw: its sites' shapes and event dimensions."""
    first = {name: value[0] for name, value in draws.items()}
    with torch.no_grad():
        return poutine.trace(poutine.condition(target.model, first)).get_trace(*target.args)


def batch_draws(target: Target, draws: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    r"""Reshapes draws `(S, *value_shape)` of latent sites to the model's vectorized shapes.

    Sites outside some of the model's plates get singleton dimensions, as under
    `pyro.plate(..., S, dim=-(max_plate_nesting + 1))`.
    """
    tensors = _tensors(draws)
    trace = _one_draw_trace(target, tensors)
    batched = {}
    for name, value in tensors.items():
        site = trace.nodes[name]
        batch_ndim = site["value"].dim() - site["fn"].event_dim
        pad = target.max_plate_nesting - batch_ndim
        batched[name] = value.reshape(len(value), *(1,) * pad, *site["value"].shape)
    return batched


def trace_on_draws(target: Target, batched: dict[str, torch.Tensor]) -> poutine.Trace:
    r"""Traces the model vectorized over batched draws (see `batch_draws`) of its latents."""
    num = len(next(iter(batched.values())))
    with pyro.plate(DRAWS, num, dim=-(target.max_plate_nesting + 1)):
        return poutine.trace(poutine.condition(target.model, batched)).get_trace(*target.args)


def _per_draw(log_prob: torch.Tensor, num: int, batch_ndim: int) -> torch.Tensor:
    """Sums a site's log-density over every dimension but the draws."""
    if log_prob.dim() < batch_ndim:  # the site does not depend on the draws
        return log_prob.sum().expand(num)
    log_prob = log_prob.movedim(log_prob.dim() - batch_ndim, 0)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(num)


def _log_joint(trace: poutine.Trace, num: int, max_plate_nesting: int) -> torch.Tensor:
    trace.compute_log_prob()
    total = torch.zeros(num)
    for site in trace.nodes.values():
        if site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample":
            total = total + _per_draw(site["log_prob"], num, max_plate_nesting + 1)
    return total


def log_density(target: Target, batched: dict[str, torch.Tensor]) -> torch.Tensor:
    r"""Returns each draw's unnormalised log density in the constrained space (differentiable).

    Arguments:
        target: The target whose model to evaluate.
        batched: Values of every latent site, shaped by `batch_draws`.
    """
    num = len(next(iter(batched.values())))
    return _log_joint(trace_on_draws(target, batched), num, target.max_plate_nesting)


def run_on_draws(
    target: Target, draws: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    r"""Runs the model once, vectorized over draws of its latent sites.

    Arguments:
        target: The target whose model to run.
        draws: Values of every latent sample site in the constrained space, keyed by site
            name, with the draws along the first axis.

    Returns:
        The values of every latent and deterministic site, keyed by name, with the draws along
        the first axis; and each draw's unnormalised log density (no Jacobian: constrained
        space).

    Example:
        >>> from benchmarks.targets import load_target
        >>> banana = load_target("banana")
        >>> sites, log_p = run_on_draws(banana, banana.reference(4))
        >>> log_p.shape
        (4,)
    """
    tensors = _tensors(draws)
    num, one = len(next(iter(tensors.values()))), _one_draw_trace(target, tensors)
    with torch.no_grad():
        trace = trace_on_draws(target, batch_draws(target, draws))
        log_p = _log_joint(trace, num, target.max_plate_nesting)
    sites = {}
    for name, site in trace.nodes.items():
        if name in tensors or (site["type"] == "sample" and site["infer"].get("_deterministic")):
            shape = one.nodes[name]["value"].shape
            value = site["value"]
            extra = value.dim() - len(shape)
            if extra > 0:
                value = value.reshape(math.prod(value.shape[:extra]), *value.shape[extra:])
            sites[name] = value.expand(num, *shape).numpy()
    return sites, log_p.numpy()


def scalar_columns(draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    r"""Splits draws into one column per scalar, named like Stan (`beta[1]`, 1-based).

    Example:
        >>> cols = scalar_columns({"beta": np.zeros((3, 2)), "sigma": np.ones(3)})
        >>> list(cols)
        ['beta[1]', 'beta[2]', 'sigma']
    """
    columns = {}
    for name, value in draws.items():
        flat = np.asarray(value).reshape(len(value), -1)
        if np.ndim(value) == 1:
            columns[name] = flat[:, 0]
            continue
        shape = np.shape(value)[1:]
        for j, index in enumerate(np.ndindex(*shape)):
            columns[f"{name}[{','.join(str(i + 1) for i in index)}]"] = flat[:, j]
    return columns
