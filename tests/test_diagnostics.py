"""diagnose and Diagnosis: the verdict on exact, wider and mismatched guides, point
estimates, non-finite weights, every autoguide, and bad arguments."""

import math
from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalMessenger,
)

from pyro_flows import AutoFlowGuide, Diagnosis, diagnose, fit

X = torch.tensor([1.3, 0.4, 2.1, 1.7, 0.9, 1.1, 0.2, 1.8])
N = len(X)
POST_VAR = 1.0 / (1.0 + N)  # mu ~ N(0, 1), x_i ~ N(mu, 1)
POST_MEAN = float(POST_VAR * X.sum())
POST_SD = math.sqrt(POST_VAR)
# x ~ N(0, I + 11^T) in closed form
LOG_Z = float(
    dist.MultivariateNormal(
        torch.zeros(N, dtype=torch.float64),
        torch.eye(N, dtype=torch.float64) + torch.ones(N, N, dtype=torch.float64),
    ).log_prob(X.double())
)


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def model_unvectorizable(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    if mu.item() > -100:  # python control flow on a sample value: one draw at a time
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def model_mixing(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    # runs vectorized without error, but mixes the draws: caught by the one-draw recheck
    # (and .item() cannot run under torch.func.vmap, the engine's other vectorized way)
    loc = mu.reshape(-1)[0]
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(loc + 0 * loc.item(), 1.0), obs=x)


def normal_guide(model, loc, scale):
    """An AutoNormal whose q(mu) is N(loc, scale)."""

    guide = AutoNormal(model)
    guide(X)
    with torch.no_grad():
        guide.locs.mu = torch.tensor(loc)
        guide.scales.mu = torch.tensor(scale)
    return guide


def hand_written_guide(x):
    pyro.sample("mu", dist.Normal(POST_MEAN, POST_SD))


@pytest.mark.parametrize(
    "model,guide",
    [
        (model, lambda: normal_guide(model, POST_MEAN, POST_SD)),
        (model, lambda: hand_written_guide),
        (model_unvectorizable, lambda: normal_guide(model_unvectorizable, POST_MEAN, POST_SD)),
        (model_mixing, lambda: normal_guide(model_mixing, POST_MEAN, POST_SD)),
    ],
    ids=["AutoNormal", "function", "unvectorizable", "mixing"],
)
def test_exact_guide(model, guide):
    vectorizes = model is globals()["model"]
    # a model that does not broadcast over draws is run one draw at a time, with a warning
    warns = pytest.warns(UserWarning, match="one draw at a time")
    with nullcontext() if vectorizes else warns:
        d = diagnose(model, guide(), X, num_samples=400)
    assert d.vectorized == vectorizes
    assert d.khat < 0.5 and d.verdict == "trust"
    # every weight is p(x) exactly: all estimates equal the log evidence up to rounding
    assert d.log_weights.shape == (400,)
    assert torch.allclose(d.log_weights.double(), torch.tensor(LOG_Z).double(), atol=1e-4)
    assert d.ess == pytest.approx(400)
    for value in [d.elbo, *d.iwelbo.values()]:
        assert value == pytest.approx(LOG_Z, abs=1e-4)


def guide_mixing(x):
    u = pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
    # averages u over the draws when vectorized: q(mu) is not what a single draw gives
    pyro.sample("mu", dist.Normal(POST_MEAN + 0.1 * u.mean(), POST_SD))


def test_vectorize_policy():
    guide = normal_guide(model_unvectorizable, POST_MEAN, POST_SD)
    few = {"num_samples": 10, "iw_particles": (1, 10)}
    with pytest.raises(ValueError, match="failed to run vectorized.*vectorize=False"):
        diagnose(model_unvectorizable, guide, X, **few, vectorize=True)
    d = diagnose(model_unvectorizable, guide, X, **few, vectorize=False)  # silent
    assert not d.vectorized and "one at a time" in str(d)
    with pytest.raises(ValueError, match="'obs' differs.*model does not broadcast"):
        diagnose(model_mixing, normal_guide(model_mixing, 0.0, 1.0), X, **few, vectorize=True)
    with pytest.raises(ValueError, match="guide does not broadcast"):
        diagnose(model, guide_mixing, X, **few, vectorize=True)
    with pytest.raises(TypeError, match="vectorize"):
        diagnose(model, hand_written_guide, X, vectorize="yes")


def test_wider_guide_bounded_weights():
    # q wider than the posterior: the weights are bounded (true k < 0)
    d = diagnose(model, normal_guide(model, POST_MEAN, 1.5 * POST_SD), X)
    assert d.khat < 0.5 and d.verdict == "trust"
    # PSIS-weighted draws recover the exact posterior, unlike the guide's own draws
    mu = d.samples["mu"]
    assert abs(mu.std() / POST_SD - 1.5) < 0.1
    draws = d.resample()["mu"]
    assert draws.shape == (4000,)
    error = POST_SD / math.sqrt(d.ess)  # Monte Carlo standard error of the mean
    assert abs(draws.mean() - POST_MEAN) < 4 * error
    assert abs(draws.std() / POST_SD - 1) < 4 * math.sqrt(1 / (2 * d.ess)) + 0.02


def test_mismatched_guide():
    # q narrow and shifted: p/q has a heavy tail (k = 1 - 0.2^2 = 0.96 and worse)
    d = diagnose(model, normal_guide(model, POST_MEAN + 3 * POST_SD, 0.2 * POST_SD), X)
    assert d.khat > 0.7 and d.verdict == "do not trust"
    assert "exceeds" in d.reason
    # IW-ELBO >= ELBO, increasing in K, and below the log evidence, within MC error
    bounds = [d.elbo] + [d.iwelbo[k] for k in (10, 100)]
    errors = [d.elbo_se] + [d.iwelbo_se[k] for k in (10, 100)]
    assert d.iwelbo[1] == d.elbo
    for i in range(2):
        assert bounds[i + 1] - bounds[i] > 3 * math.hypot(errors[i], errors[i + 1])
    for i in range(3):
        assert bounds[i] < LOG_Z + 3 * errors[i]


def test_few_effective_draws():
    log_weights = torch.zeros(1000)
    log_weights[:10] = 6.0  # 10 draws hold nearly all the weight, but the tail is bounded
    d = Diagnosis.from_log_weights(log_weights, {})
    assert d.ess < 100 and d.verdict == "use with care"


def test_nonfinite_weights_name_the_site():
    def model_nan(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("bad", torch.where(mu > POST_MEAN, mu * math.nan, mu * 0))

    with pyro.validation_enabled(False):
        d = diagnose(model_nan, hand_written_guide, X, num_samples=1000)
    assert math.isnan(d.khat) and d.verdict == "do not trust"
    assert "'bad'" in d.reason
    assert 400 < d.nonfinite["bad"] < 600  # half the draws, +- 6 standard deviations
    with pytest.raises(ValueError, match="not finite"):
        d.resample()


def test_zero_density_draws():
    def model_positive(x):
        mu = pyro.sample("mu", dist.HalfNormal(1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    def guide(x):  # puts mass on mu < 0, where the model's density is zero
        pyro.sample("mu", dist.Normal(POST_MEAN, 0.5))

    with pyro.validation_enabled(False):
        d = diagnose(model_positive, guide, X, num_samples=1000)
    assert torch.isneginf(d.log_weights).any()
    assert "density is zero" in d.reason
    assert (d.resample()["mu"] > 0).all()  # zero-weight draws are never resampled


def test_every_draw_of_zero_density():
    # the reason said "0 of 100 log weights are NaN or +inf"
    def model_positive(x):
        mu = pyro.sample("mu", dist.HalfNormal(1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    def guide(x):  # all its mass on mu < 0
        pyro.sample("mu", dist.Normal(-10.0, 0.1))

    with pyro.validation_enabled(False):
        d = diagnose(model_positive, guide, X, num_samples=100)
    assert d.verdict == "do not trust" and "all 100 log weights are -inf" in d.reason


GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal,
    "AutoIAFNormal": lambda m: AutoIAFNormal(m, hidden_dim=[8]),
    "AutoNormalMessenger": AutoNormalMessenger,
    "AutoFlowGuide": AutoFlowGuide,
}


COUNTS = torch.tensor([3.0, 1.0, 4.0, 2.0, 2.0])
A, B = 2.0, 1.0  # lam ~ Gamma(A, B), counts ~ Poisson(lam): the evidence is closed-form
LOG_Z_COUNTS = float(
    A * math.log(B)
    - math.lgamma(A)
    + math.lgamma(A + COUNTS.sum())
    - (A + COUNTS.sum()) * math.log(B + len(COUNTS))
    - torch.lgamma(COUNTS + 1).sum()
)


def model_two_sites(x, counts):
    model(x)
    lam = pyro.sample("lam", dist.Gamma(A, B))
    with pyro.plate("counts", len(counts)):
        pyro.sample("k", dist.Poisson(lam), obs=counts)


@pytest.mark.parametrize("guide", GUIDES.values(), ids=GUIDES.keys())
def test_any_autoguide(guide):
    guide = guide(model_two_sites)
    optim = pyro.optim.Adam({"lr": 0.05})
    fit(model_two_sites, guide, X, COUNTS, num_steps=100, optim=optim)
    d = diagnose(model_two_sites, guide, X, COUNTS, num_samples=1000)
    assert d.samples["mu"].shape == (1000,) and (d.samples["lam"] > 0).all()
    assert d.vectorized  # GuideMessenger guides too
    assert d.verdict in ("trust", "use with care", "do not trust")
    # every bound is below the log evidence (a wrong log q, e.g. a missing Jacobian, breaks it)
    for k, bound in d.iwelbo.items():
        assert bound < LOG_Z + LOG_Z_COUNTS + 3 * d.iwelbo_se[k]


def test_exact_guide_constrained_site():
    # q(lam) = Gamma(A + sum k, B + n), the exact posterior, through AutoNormal's log transform
    def guide(counts):
        pyro.sample("lam", dist.Gamma(A + COUNTS.sum(), B + len(COUNTS)))

    def gamma_poisson(counts):
        lam = pyro.sample("lam", dist.Gamma(A, B))
        with pyro.plate("counts", len(counts)):
            pyro.sample("k", dist.Poisson(lam), obs=counts)

    d = diagnose(gamma_poisson, guide, COUNTS, num_samples=500)
    assert d.verdict == "trust"
    assert d.elbo == pytest.approx(LOG_Z_COUNTS, abs=1e-4)


def test_point_estimate_is_not_trusted():
    guide = AutoDelta(model)
    fit(model, guide, X, num_steps=20)
    d = diagnose(model, guide, X, num_samples=100)
    assert d.khat == -math.inf  # constant weights, as for an exact guide...
    assert d.verdict == "do not trust" and "AutoDelta" in d.reason  # ...but no spread at all


def test_point_estimate_with_rounding_noise_is_not_trusted():
    # AutoLaplaceApproximation's simplex draws, computed in chunks of 7, differ in their last
    # bit between draws (vectorized kernels round a batch's tail differently): still a point.
    def simplex_model(counts):
        with pyro.plate("groups", len(counts)):
            p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
            pyro.sample("k", dist.Multinomial(10, p), obs=counts)

    counts = torch.tensor([[2.0, 3.0, 5.0], [6.0, 1.0, 3.0], [1.0, 1.0, 8.0], [4.0, 4.0, 2.0]])
    guide = AutoLaplaceApproximation(simplex_model)
    fit(simplex_model, guide, counts, num_steps=100, optim=pyro.optim.Adam({"lr": 0.05}))
    d = diagnose(simplex_model, guide, counts, num_samples=100, chunk_size=7)
    assert not (d.samples["p"] == d.samples["p"][:1]).all()  # the rounding noise is there
    assert d.verdict == "do not trust" and "AutoDelta" in d.reason


def test_swapped_model_and_guide():
    # diagnose(guide, model, ...) ran, warned that the model does not broadcast and gave a
    # verdict on the prior scored by the guide
    guide = AutoNormal(model)
    guide(X)
    with pytest.raises(TypeError, match="AutoNormal, a guide: the model and guide are swapped"):
        diagnose(guide, model, X, num_samples=10)


def test_subsampling_is_refused():
    def model_subsampled(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=3) as index:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x[index])

    with pytest.raises(ValueError, match="Plate 'data' subsamples 3 of 8 points at site 'obs'"):
        diagnose(model_subsampled, hand_written_guide, X)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=10, iw_particles=(1, 20)), "iw_particles"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(max_plate_nesting=-1), "max_plate_nesting"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diagnose(model, hand_written_guide, X, **kwargs)


def test_num_particles_is_the_old_name_of_iw_particles():
    # Pyro's psis_diagnostic calls its number of draws num_particles: ours was the IW-ELBO's K.
    with pytest.warns(FutureWarning, match="renamed iw_particles"):
        old = diagnose(model, hand_written_guide, X, num_samples=40, num_particles=(1, 4))
    assert sorted(old.iwelbo) == [1, 4]
    with pytest.warns(FutureWarning), pytest.raises(TypeError, match="iw_particles= only"):
        diagnose(model, hand_written_guide, X, num_samples=40, iw_particles=2, num_particles=2)
    log_weights = torch.zeros(10)
    with pytest.warns(FutureWarning):
        d = Diagnosis.from_log_weights(log_weights, {}, num_particles=5)
    assert list(d.iwelbo) == [5]


def test_fewer_draws_than_the_default_particles():
    # the default K = 100 needs 100 draws: num_samples=50 raised about num_particles, which
    # was not passed, and from_log_weights warned "Mean of empty slice" and gave NaN
    d = diagnose(model, hand_written_guide, X, num_samples=50)
    assert list(d.iwelbo) == [1, 10] and all(map(math.isfinite, d.iwelbo.values()))
    d = Diagnosis.from_log_weights(torch.randn(50), {"mu": torch.randn(50)})
    assert list(d.iwelbo) == [1, 10] and all(map(math.isfinite, d.iwelbo.values()))


def test_summary_and_dict():
    d = diagnose(model, normal_guide(model, POST_MEAN, 0.3 * POST_SD), X, num_samples=1000)
    text = str(d)
    assert text.startswith(f"Verdict: {d.verdict.upper()}.")
    assert "Pareto k-hat" in text and "IW-ELBO (K = 100)" in text
    assert repr(d).startswith("Diagnosis(verdict=")
    flat = d.to_dict()
    assert flat["khat"] == d.khat and flat["iwelbo_10"] == d.iwelbo[10]
    assert all(isinstance(v, int | float | str) for v in flat.values())
    with pytest.raises(ValueError, match="num_draws"):
        d.resample(0)
