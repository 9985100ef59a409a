"""Accuracy against exact posteriors and evidences (conjugate models)."""

import contextlib
import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_flows import AutoFlowGuide, StartWarning
from pyro_flows.importance import log_importance_weights

# A stated margin on KL(q || p) = log p(y) - ELBO after fitting. For a Gaussian posterior,
# KL <= 0.005 bounds any mean error by sd * sqrt(2 * 0.005) = 0.1 sd.
KL_MARGIN = 0.005
SEED = int(os.environ.get("PYRO_FLOWS_SEED", "0"))  # see conftest.py
NUM_DRAWS = 20000


def fit(model, guide, *args, num_steps, lr=0.01, num_particles=8):
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo)
    for _ in range(num_steps):
        svi.step(*args)


def elbo_and_mcse(model, guide, *args):
    log_weights = log_importance_weights(model, guide, *args, num_samples=NUM_DRAWS).log_weights
    return log_weights.mean().item(), log_weights.std().item() / math.sqrt(NUM_DRAWS)


def normal_normal(y):
    # z_j ~ N(1, 2^2), y_ij ~ N(z_j, 1) for i < n, j < 3.
    z = pyro.sample("z", dist.Normal(torch.ones(3), 2.0).to_event(1))
    with pyro.plate("obs", y.shape[0]):
        pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)


@pytest.mark.parametrize("flow", ["iaf", "realnvp"])
def test_normal_normal(flow):
    generator = torch.Generator().manual_seed(1)
    y = torch.tensor([0.5, -1.0, 3.0]) + torch.randn(4, 3, generator=generator)
    n = y.shape[0]
    precision = 1 / 4 + n
    post_mean = (1 / 4 + y.sum(0)) / precision
    post_sd = precision**-0.5
    # Evidence: each column of y is N(1, I + 4 11^T).
    covariance = torch.eye(n) + 4 * torch.ones(n, n)
    log_evidence = dist.MultivariateNormal(torch.ones(n), covariance).log_prob(y.T).sum().item()

    guide = AutoFlowGuide(normal_normal, flow=flow, stl=True)
    fit(normal_normal, guide, y, num_steps=1500)
    elbo, mcse = elbo_and_mcse(normal_normal, guide, y)
    assert elbo < log_evidence + 4 * mcse  # an ELBO never exceeds the evidence
    assert log_evidence - elbo < KL_MARGIN + 4 * mcse

    with pyro.plate("draws", NUM_DRAWS), torch.no_grad():
        z = guide(y)["z"]
    # Monte Carlo: the mean of 20,000 draws has sd post_sd / 141; the sd estimate has
    # relative sd 1 / sqrt(2 * 20,000) = 0.005. Allow 4 of those plus what KL_MARGIN allows.
    mean_tolerance = 4 * post_sd / NUM_DRAWS**0.5 + post_sd * (2 * KL_MARGIN) ** 0.5
    torch.testing.assert_close(z.mean(0), post_mean, atol=mean_tolerance, rtol=0)
    torch.testing.assert_close(
        z.std(0), torch.full((3,), post_sd), rtol=4 * (2 * NUM_DRAWS) ** -0.5 + 0.1, atol=0
    )


def gamma_poisson(y):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Poisson(rate), obs=y)


def best_lognormal_kl(a, b):
    """min over (m, s) of KL(N(m, s) || law of log(rate)) for rate ~ Gamma(a, b), the best that
    AutoNormal's family can do, by Gauss-Hermite-like quadrature on a fine grid and L-BFGS."""
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    weights = dist.Normal(0.0, 1.0).log_prob(x).exp() * (x[1] - x[0])
    loc = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    target = dist.Gamma(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    optimizer = torch.optim.LBFGS([loc, log_scale], max_iter=200)

    def kl():
        u = loc + log_scale.exp() * x
        log_q = dist.Normal(loc, log_scale.exp()).log_prob(u)
        return ((log_q - target.log_prob(u.exp()) - u) * weights).sum()

    def closure():
        optimizer.zero_grad()
        value = kl()
        value.backward()
        return value

    optimizer.step(closure)
    return kl().item()


def test_gamma_poisson_skewed_posterior():
    """Posterior Gamma(3, 4): skewed in log space, where AutoNormal can only be Gaussian."""
    y = torch.tensor([0.0, 1.0, 0.0])
    a, b = 2.0 + y.sum().item(), 1.0 + len(y)
    log_evidence = (
        math.lgamma(a) - math.lgamma(2.0) - torch.lgamma(y + 1).sum().item() - a * math.log(b)
    )
    margin = 0.01
    assert best_lognormal_kl(a, b) > 2.5 * margin  # 0.0277 nats

    # A spline flow can bend the one-dimensional marginal; an affine flow (iaf) cannot.
    guide = AutoFlowGuide(gamma_poisson, flow="nsf", stl=True)
    fit(gamma_poisson, guide, y, num_steps=1500)
    elbo, mcse = elbo_and_mcse(gamma_poisson, guide, y)
    assert elbo < log_evidence + 4 * mcse
    assert log_evidence - elbo < margin + 4 * mcse

    # The guide's quantiles against the exact posterior, with what the fit guarantees: with
    # KL(q || p) <= kl (the ELBO check above, at 4 MCSE), Pinsker's inequality bounds every
    # |F_q(x) - F_p(x)| by sqrt(kl / 2), so F_p at the guide's u-quantile lies within that of u,
    # up to the Monte Carlo error of quantiles() (4,096 draws: 4 sds of a binomial proportion).
    # (A fixed 5% band on the median, as before, is 0.1 posterior sd: inside what a KL of 0.01
    # allows, so a passing run was luck of the trajectory: it failed on machines whose floating
    # point took another path.)
    kl = max(log_evidence - elbo, 0.0) + 4 * mcse
    probs = torch.tensor([0.05, 0.5, 0.95])
    q = guide.quantiles(probs, y)["rate"].double()
    exact_cdf = torch.special.gammainc(torch.tensor(a, dtype=torch.float64), b * q)
    tolerance = math.sqrt(kl / 2) + 4 * (probs * (1 - probs) / guide.num_quantile_samples).sqrt()
    assert ((exact_cdf - probs).abs() <= tolerance).all(), (exact_cdf, tolerance)


def eight_schools_noncentered(sigma, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", 8):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_trans, sigma), obs=y)


def eight_schools_centered(sigma, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


@pytest.mark.parametrize("model", [eight_schools_noncentered, eight_schools_centered])
def test_eight_schools_elbo_at_least_autonormal(model):
    from pyro.infer.autoguide import AutoNormal

    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    results = {}
    for name, make in {
        "AutoNormal": AutoNormal,
        "flow": lambda m: AutoFlowGuide(m, stl=True),
    }.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(SEED)  # both guides from the same seed (conftest's, by default 0)
        guide = make(model)
        with contextlib.ExitStack() as stack:
            if name == "flow" and model is eight_schools_centered:
                # Pathfinder's path runs into the funnel's neck: the guide says so and starts
                # from init_loc_fn's point (a start in the neck stayed there: ELBO -40.5).
                stack.enter_context(pytest.warns(StartWarning, match="ran away"))
            fit(model, guide, sigma, y, num_steps=1000)  # the same budget: steps, particles, lr
        results[name] = elbo_and_mcse(model, guide, sigma, y)
    (flow, flow_se), (normal, normal_se) = results["flow"], results["AutoNormal"]
    assert flow + 3 * (flow_se**2 + normal_se**2) ** 0.5 >= normal, results
