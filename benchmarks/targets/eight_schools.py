"""Eight schools (Rubin 1981), centred and non-centred: ports of the posteriordb posteriors."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .base import Target, as_tensor
from .refdata import load_data, posteriordb_target

CENTERED = "eight_schools-eight_schools_centered"
NONCENTERED = "eight_schools-eight_schools_noncentered"


def centered_model(y: torch.Tensor, sigma: torch.Tensor) -> None:
    r"""Eight schools with the school effects `theta` sampled around `mu` (a funnel)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[-1], dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def noncentered_model(y: torch.Tensor, sigma: torch.Tensor) -> None:
    r"""Eight schools with standardised offsets `theta_trans`; `theta` is deterministic."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[-1], dim=-1):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans, event_dim=0)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _args(posterior: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data(posterior)
    return as_tensor(data["y"]), as_tensor(data["sigma"])


def eight_schools_centered() -> Target:
    r"""Returns the centred eight schools target (posteriordb reference)."""
    description = "eight schools, centred: a funnel in (theta, mu, log tau), 10-D"
    return posteriordb_target(CENTERED, description, centered_model, _args(CENTERED), 1)


def eight_schools_noncentered() -> Target:
    r"""Returns the non-centred eight schools target (posteriordb reference)."""
    description = "eight schools, non-centred: near-independent, heavy tail in tau, 10-D"
    return posteriordb_target(NONCENTERED, description, noncentered_model, _args(NONCENTERED), 1)
