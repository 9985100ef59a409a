"""Runs a target's model on batches of draws: every site's value and each draw's log density.

The model is replayed on the draws under a plate over draws, by `pyro_flows`' own engine
(`pyro_flows._draws`, as `to_inference_data` and `diagnose` do).
"""

from __future__ import annotations

import numpy as np
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger

from pyro_flows import _draws

from .targets.base import Target, init_to_uniform_unconstrained


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


def _structure(target: Target, draws: dict[str, torch.Tensor]) -> _draws.Structure:
    """The model's sites at the first draw."""
    first = {name: value[0] for name, value in draws.items()}
    return _draws.inspect_values(
        target.model, first, target.args, {}, max_plate_nesting=target.max_plate_nesting
    )


def batch_draws(target: Target, draws: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    r"""Reshapes draws `(S, *value_shape)` of latent sites to the model's vectorized shapes.

    Sites outside some of the model's plates get singleton dimensions, as under
    `pyro.plate(..., S, dim=-(max_plate_nesting + 1))`.
    """
    tensors = _tensors(draws)
    return _draws.batch(tensors, _structure(target, tensors))


def trace_on_draws(target: Target, batched: dict[str, torch.Tensor]) -> poutine.Trace:
    r"""Traces the model vectorized over batched draws (see `batch_draws`) of its latents."""
    num = len(next(iter(batched.values())))
    return _draws.replay_values(
        target.model, batched, num, target.max_plate_nesting, target.args, {}
    )


def log_density(target: Target, batched: dict[str, torch.Tensor]) -> torch.Tensor:
    r"""Returns each draw's unnormalised log density in the constrained space (differentiable).

    Arguments:
        target: The target whose model to evaluate.
        batched: Values of every latent site, shaped by `batch_draws`.
    """
    num = len(next(iter(batched.values())))
    return _draws.log_joint(trace_on_draws(target, batched), num, target.max_plate_nesting)


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
    num, structure = len(next(iter(tensors.values()))), _structure(target, tensors)
    with torch.no_grad():
        trace = trace_on_draws(target, _draws.batch(tensors, structure))
        log_p = _draws.log_joint(trace, num, target.max_plate_nesting)
    names = structure.names("latent", "deterministic")
    sites = _draws.site_values(trace, names, structure, num)
    return {name: value.numpy() for name, value in sites.items()}, log_p.numpy()


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
