"""The autoregressive AR(5) model of posteriordb (`arK-arK`)."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from .base import Target, as_tensor
from .refdata import load_data, posteriordb_target

POSTERIOR = "arK-arK"


def lag_matrix(y: np.ndarray, order: int) -> np.ndarray:
    r"""Returns the `(T - order) x order` matrix whose column `k` holds `y` lagged `k + 1` steps.

    Example:
        >>> lag_matrix(np.arange(5.0), 2)
        array([[1., 0.],
               [2., 1.],
               [3., 2.]])
    """
    rows = len(y) - order
    return np.stack([y[order - k - 1 : order - k - 1 + rows] for k in range(order)], axis=-1)


def ark_model(lags: torch.Tensor, y: torch.Tensor) -> None:
    r"""AR(K) regression of `y[K:]` on its lags, with an intercept."""
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([lags.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    mean = alpha.unsqueeze(-1) + beta @ lags.T
    pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=y)


def ark() -> Target:
    r"""Returns the AR(5) target (posteriordb `arK-arK`)."""
    data = load_data(POSTERIOR)
    y, order = np.asarray(data["y"], float), int(data["K"])
    args = (as_tensor(lag_matrix(y, order)), as_tensor(y[order:]))
    description = "AR(5) time series regression, moderate correlation, 7-D"
    return posteriordb_target(POSTERIOR, description, ark_model, args)
