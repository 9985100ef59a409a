"""The two-component normal mixture with ordered means (`low_dim_gauss_mix`)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from .base import Target, as_tensor
from .refdata import load_data, posteriordb_target

POSTERIOR = "low_dim_gauss_mix-low_dim_gauss_mix"


def gauss_mix_model(y: torch.Tensor) -> None:
    r"""Mixture `theta N(mu[0], sigma[0]) + (1 - theta) N(mu[1], sigma[1])`, `mu` ordered.

    The prior on `mu` is `N(0, 2)` per component restricted to `mu[0] < mu[1]`: a flat density
    on the ordered vectors plus a factor, as in Stan's `ordered[2] mu; mu ~ normal(0, 2)`.
    """
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum(-1))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
    weights = torch.stack([theta, 1 - theta], dim=-1).unsqueeze(-2)
    components = dist.Normal(mu.unsqueeze(-2), sigma.unsqueeze(-2))
    mixture = dist.MixtureSameFamily(dist.Categorical(probs=weights), components)
    mixture = mixture.expand(mixture.batch_shape[:-1] + y.shape[-1:])
    pyro.sample("y", mixture.to_event(1), obs=y)


def gauss_mix() -> Target:
    r"""Returns the ordered two-component mixture target (posteriordb)."""
    description = "two-component normal mixture, ordered means, N = 1000, 5-D"
    args = (as_tensor(load_data(POSTERIOR)["y"]),)
    return posteriordb_target(POSTERIOR, description, gauss_mix_model, args)
