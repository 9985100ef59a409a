"""Neal's funnel: a scale that depends exponentially on another coordinate."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from .base import Target

DEFAULT_DRAWS = 10_000


def funnel_model(dim: int = 10) -> None:
    r"""Neal's funnel: `y ~ N(0, 3)`, `x[i] ~ N(0, exp(y / 2))` for `dim - 1` coordinates."""
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    scale = torch.exp(y / 2).unsqueeze(-1)
    pyro.sample("x", dist.Normal(0.0, scale).expand(scale.shape[:-1] + (dim - 1,)).to_event(1))


def funnel_draws(num_draws: int | None, seed: int, dim: int = 10) -> dict[str, np.ndarray]:
    r"""Returns exact draws of Neal's funnel keyed by site name."""
    rng = np.random.default_rng(seed)
    n = DEFAULT_DRAWS if num_draws is None else num_draws
    y = rng.normal(0.0, 3.0, n)
    x = rng.normal(size=(n, dim - 1)) * np.exp(y / 2)[:, None]
    return {"y": y, "x": x}


def funnel(dim: int = 10) -> Target:
    r"""Returns Neal's funnel in `dim` dimensions, a normalised density (log evidence 0)."""
    return Target(
        name=f"funnel{dim}",
        description=f"Neal's funnel, {dim}-D: sd of x spans exp(+-4.5) across y ~ N(0, 3)",
        model=funnel_model,
        args=(dim,),
        draw_reference=lambda num_draws, seed: funnel_draws(num_draws, seed, dim),
        exact=True,
        log_evidence=0.0,
    )
