"""A banana (twisted Gaussian, Rosenbrock-type) density in two dimensions."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist

from .base import Target

DEFAULT_DRAWS = 10_000
SCALE = 10.0


def banana_model(curvature: float = 0.03) -> None:
    r"""`x1 ~ N(0, 10)`, `x2 ~ N(curvature * (x1**2 - 100), 1)`: a curved ridge."""
    x1 = pyro.sample("x1", dist.Normal(0.0, SCALE))
    pyro.sample("x2", dist.Normal(curvature * (x1**2 - SCALE**2), 1.0))


def banana_draws(num_draws: int | None, seed: int, curvature: float) -> dict[str, np.ndarray]:
    r"""Returns exact draws of the banana keyed by site name."""
    rng = np.random.default_rng(seed)
    n = DEFAULT_DRAWS if num_draws is None else num_draws
    x1 = rng.normal(0.0, SCALE, n)
    x2 = rng.normal(curvature * (x1**2 - SCALE**2), 1.0)
    return {"x1": x1, "x2": x2}


def banana(curvature: float = 0.03) -> Target:
    r"""Returns the 2-D banana; `x2` has mean 0 and variance `1 + 2 curvature² 10⁴`."""
    return Target(
        name="banana",
        description=f"banana, 2-D: x1 ~ N(0, 10^2), x2 | x1 ~ N({curvature} (x1^2 - 100), 1)",
        model=banana_model,
        args=(curvature,),
        draw_reference=lambda num_draws, seed: banana_draws(num_draws, seed, curvature),
        exact=True,
        log_evidence=0.0,
    )
