"""A heavy-tailed multivariate Student-t target."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from .base import Target, as_tensor
from .gaussian import ar1_covariance

DEFAULT_DRAWS = 10_000


def student_t_model(df: float, scale_tril: torch.Tensor) -> None:
    r"""A single multivariate Student-t site `x` centred at the origin."""
    loc = torch.zeros(scale_tril.shape[-1], dtype=scale_tril.dtype)
    pyro.sample("x", dist.MultivariateStudentT(df, loc, scale_tril))


def student_t(dim: int = 5, df: float = 5.0, rho: float = 0.5) -> Target:
    r"""Returns a `dim`-D Student-t with `df` degrees of freedom (log evidence 0).

    The scale matrix has unit diagonal and correlation `rho ** |i - j|`, so each coordinate
    has sd `sqrt(df / (df - 2))`.
    """
    tril = np.linalg.cholesky(ar1_covariance(np.ones(dim), rho))

    def draw(num_draws: int | None, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        n = DEFAULT_DRAWS if num_draws is None else num_draws
        normal = rng.normal(size=(n, dim)) @ tril.T
        return {"x": normal / np.sqrt(rng.chisquare(df, size=(n, 1)) / df)}

    return Target(
        name="student_t",
        description=f"Student-t, {dim}-D, {df:g} degrees of freedom, correlation {rho}^|i-j|",
        model=student_t_model,
        args=(df, as_tensor(tril)),
        draw_reference=draw,
        exact=True,
        log_evidence=0.0,
    )
