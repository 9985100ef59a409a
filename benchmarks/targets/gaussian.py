"""A correlated multivariate Gaussian with scales spanning two orders of magnitude."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from .base import Target, as_tensor

DEFAULT_DRAWS = 10_000


def ar1_covariance(sds: np.ndarray, rho: float) -> np.ndarray:
    r"""Returns the covariance with the given sds and correlation `rho ** |i - j|`."""
    index = np.arange(len(sds))
    corr = rho ** np.abs(index[:, None] - index[None, :])
    return corr * np.outer(sds, sds)


def gaussian_parameters(dim: int, rho: float) -> tuple[np.ndarray, np.ndarray]:
    r"""Returns the mean (from -2 to 2) and covariance (sds 0.1 to 10, AR(1) correlation)."""
    return np.linspace(-2.0, 2.0, dim), ar1_covariance(np.logspace(-1, 1, dim), rho)


def gaussian_model(loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
    r"""A single multivariate normal site `x`."""
    pyro.sample("x", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def gaussian(dim: int = 50, rho: float = 0.9) -> Target:
    r"""Returns the `dim`-dimensional correlated Gaussian target (log evidence 0)."""
    loc, cov = gaussian_parameters(dim, rho)
    tril = np.linalg.cholesky(cov)

    def draw(num_draws: int | None, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        n = DEFAULT_DRAWS if num_draws is None else num_draws
        return {"x": loc + rng.normal(size=(n, dim)) @ tril.T}

    return Target(
        name=f"gaussian{dim}",
        description=f"Gaussian, {dim}-D: sds 0.1 to 10, correlation {rho}^|i-j|",
        model=gaussian_model,
        args=(as_tensor(loc), as_tensor(tril)),
        draw_reference=draw,
        exact=True,
        log_evidence=0.0,
    )
