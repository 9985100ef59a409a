"""Linear regressions from posteriordb: `sblri-blr`, `sblrc-blr`, earnings and kidiq."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from .base import Target, as_tensor
from .refdata import load_data, posteriordb_target

SBLRI = "sblri-blr"
SBLRC = "sblrc-blr"
EARNINGS = "earnings-logearn_interaction"
KIDIQ = "kidiq-kidscore_interaction"


def _likelihood(design: torch.Tensor, beta: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor):
    mean = beta @ design.T
    pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=y)


def blr_model(X: torch.Tensor, y: torch.Tensor) -> None:
    r"""Regression without intercept: `beta ~ N(0, 10)`, `sigma ~ HalfNormal(10)`."""
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
    _likelihood(X, beta, sigma, y)


def _flat_beta(size: int) -> torch.Tensor:
    support = constraints.independent(constraints.real, 1)
    return pyro.sample("beta", dist.ImproperUniform(support, (), (size,)))


def earnings_model(design: torch.Tensor, log_earn: torch.Tensor) -> None:
    r"""Log earnings on height, sex and their interaction; flat priors on `beta` and `sigma`."""
    beta = _flat_beta(design.shape[-1])
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    _likelihood(design, beta, sigma, log_earn)


def kidiq_model(design: torch.Tensor, kid_score: torch.Tensor) -> None:
    r"""Kid scores on mother's high school, IQ and interaction; flat `beta`, half-Cauchy sigma."""
    beta = _flat_beta(design.shape[-1])
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    _likelihood(design, beta, sigma, kid_score)


def _blr(posterior: str, description: str) -> Target:
    data = load_data(posterior)
    args = (as_tensor(data["X"]), as_tensor(data["y"]))
    return posteriordb_target(posterior, description, blr_model, args)


def sblri() -> Target:
    r"""Returns the regression with near-independent coefficients (posteriordb `sblri-blr`)."""
    return _blr(SBLRI, "linear regression, independent predictors: near-Gaussian, 6-D")


def sblrc() -> Target:
    r"""Returns the regression with correlated coefficients (posteriordb `sblrc-blr`)."""
    return _blr(SBLRC, "linear regression, correlated predictors (corr 0.8), sd 1e-3, 6-D")


def _design(*columns: np.ndarray) -> torch.Tensor:
    """Stacks an intercept column and the given columns into a design matrix."""
    return as_tensor(np.stack([np.ones_like(columns[0]), *columns], axis=-1))


def earnings() -> Target:
    r"""Returns the log-earnings regression with flat improper priors (posteriordb)."""
    data = load_data(EARNINGS)
    height, male = np.asarray(data["height"], float), np.asarray(data["male"], float)
    log_earn = np.log(np.asarray(data["earn"], float))
    args = (_design(height, male, height * male), as_tensor(log_earn))
    description = "log earnings regression, flat improper priors, corr 0.999, 5-D"
    return posteriordb_target(EARNINGS, description, earnings_model, args)


def kidiq() -> Target:
    r"""Returns the kid-score regression with an interaction (posteriordb)."""
    data = load_data(KIDIQ)
    mom_hs, mom_iq = np.asarray(data["mom_hs"], float), np.asarray(data["mom_iq"], float)
    args = (_design(mom_hs, mom_iq, mom_hs * mom_iq), as_tensor(data["kid_score"]))
    description = "kid score regression, flat prior on beta, corr 0.99, 5-D"
    return posteriordb_target(KIDIQ, description, kidiq_model, args)
