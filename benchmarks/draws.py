"""Runs a target's model on batches of draws: every site's value and each draw's log density."""

from __future__ import annotations

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger

from .targets.base import Target, init_to_uniform_unconstrained


def is_reported(site: dict) -> bool:
    r"""Whether a trace node is a latent sample site or a deterministic site."""
    if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
        return False
    return not site["is_observed"] or bool(site["infer"].get("_deterministic"))


def per_draw(log_prob: torch.Tensor, num_draws: int, max_plate_nesting: int) -> torch.Tensor:
    r"""Sums a site's log density over its plate dimensions, one value per draw.

    Arguments:
        log_prob: A log density with the draws at dimension `-(max_plate_nesting + 1)`.
        num_draws: The number of draws.
        max_plate_nesting: The model's number of plate dimensions.
    """
    if max_plate_nesting:
        log_prob = log_prob.sum(dim=tuple(range(-max_plate_nesting, 0)))
    return log_prob.expand(num_draws)


def trace_log_density(trace: poutine.Trace, num_draws: int, max_plate_nesting: int):
    r"""Returns each draw's log density summed over the sample sites of a vectorized trace."""
    trace.compute_log_prob()
    total = torch.zeros(num_draws)
    for site in trace.nodes.values():
        if "log_prob" in site and not site["infer"].get("_deterministic"):
            total = total + per_draw(site["log_prob"], num_draws, max_plate_nesting)
    return total


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


def _first_draw_trace(target: Target, draws: dict[str, np.ndarray]) -> poutine.Trace:
    """Traces the model, not vectorized, at the first draw."""
    first = {k: torch.as_tensor(v[0], dtype=torch.get_default_dtype()) for k, v in draws.items()}
    with torch.no_grad():
        return poutine.trace(poutine.condition(target.model, first)).get_trace(*target.args)


def batch_draws(target: Target, draws: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    r"""Reshapes draws `(S, *value_shape)` of latent sites to the model's vectorized shapes.

    Sites outside some of the model's plates get singleton dimensions, as under
    `pyro.plate(..., S, dim=-(max_plate_nesting + 1))`.
    """
    num = len(next(iter(draws.values())))
    dtype = torch.get_default_dtype()
    proto = _first_draw_trace(target, draws)
    batched = {}
    for name, value in draws.items():
        site = proto.nodes[name]
        pad = (1,) * (target.max_plate_nesting - len(site["fn"].batch_shape))
        shape = (num,) + pad + tuple(site["value"].shape)
        batched[name] = torch.as_tensor(value, dtype=dtype).reshape(shape)
    return batched


def trace_on_draws(target: Target, batched: dict[str, torch.Tensor]) -> poutine.Trace:
    r"""Traces the model vectorized over batched draws (see `batch_draws`) of its latents."""
    num = len(next(iter(batched.values())))
    with pyro.plate("_draws", num, dim=-target.max_plate_nesting - 1):
        return poutine.trace(poutine.condition(target.model, batched)).get_trace(*target.args)


def log_density(target: Target, batched: dict[str, torch.Tensor]) -> torch.Tensor:
    r"""Returns each draw's unnormalised log density in the constrained space (differentiable).

    Arguments:
        target: The target whose model to evaluate.
        batched: Values of every latent site, shaped by `batch_draws`.
    """
    num = len(next(iter(batched.values())))
    trace = trace_on_draws(target, batched)
    return trace_log_density(trace, num, target.max_plate_nesting)


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
    num = len(next(iter(draws.values())))
    with torch.no_grad():
        trace = trace_on_draws(target, batch_draws(target, draws))
        log_p = trace_log_density(trace, num, target.max_plate_nesting)
    proto = _first_draw_trace(target, draws)
    sites = {
        name: site["value"].reshape((num,) + proto.nodes[name]["value"].shape).numpy()
        for name, site in trace.nodes.items()
        if is_reported(site) or name in draws
    }
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
