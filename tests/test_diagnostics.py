import doctest
import importlib
import math
from contextlib import nullcontext

import matplotlib.pyplot as plt
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

from pyro_flows import AutoFlowGuide, Diagnosis, FitResult, diagnose, fit, log_importance_weights
from pyro_flows.plots import plot_elbo, plot_khat
from pyro_flows.weights import khat_threshold

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
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu.reshape(-1)[0], 1.0), obs=x)


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
    few = {"num_samples": 10, "num_particles": (1, 10)}
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


def pareto_log_weights(k, n=10**6):
    """Log weights whose right tail is generalized Pareto with shape k exactly."""

    generator = torch.Generator().manual_seed(1)
    return -k * torch.log(torch.rand(n, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize(
    "k,verdict", [(0.2, "trust"), (0.6, "use with care"), (0.9, "do not trust")]
)
def test_khat_of_known_tail(k, verdict):
    # With S = 1e6 PSIS fits the 3 sqrt(S) = 3000 largest weights; the standard error of
    # the shape estimate is about (1 + k) / sqrt(3000) < 0.035, so 0.1 is about 3 errors.
    d = Diagnosis.from_log_weights(pareto_log_weights(k), {})
    assert abs(d.khat - k) < 0.1
    assert d.verdict == verdict


def test_khat_threshold():
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(2 / 3)
    assert khat_threshold(4000) == 0.7
    # k = 0.6 is too heavy a tail for 100 draws (threshold 0.5), fine for 1e6
    d = Diagnosis.from_log_weights(pareto_log_weights(0.6, 100), {})
    assert d.khat_threshold == pytest.approx(0.5)


def test_tied_largest_weights_are_bounded():
    # an exact guide whose weights rounding made take three values, the largest shared by
    # more draws than PSIS fits: ArviZ finds no tail (k = inf); the weights are bounded
    log_weights = torch.zeros(4000)
    log_weights[:1000] = -0.05
    log_weights[:200] = -0.1
    d = Diagnosis.from_log_weights(log_weights, {})
    assert d.khat == -math.inf and d.verdict == "trust"
    # but a few finite weights among zero ones is no tail to trust
    log_weights = torch.full((4000,), -math.inf)
    log_weights[:10] = torch.arange(10.0)
    assert Diagnosis.from_log_weights(log_weights, {}).verdict == "do not trust"


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


def test_log_importance_weights_shapes_and_chunks():
    def model_plates(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("groups", 2, dim=-2):
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            with pyro.plate("data", len(x), dim=-1):
                # a[..., 0], not a[..., :1]: the latter lines a's event dimension up with
                # b's plates, which does not broadcast over draws (one draw at a time)
                pyro.sample("obs", dist.Normal(a[..., 0] + b, 1.0), obs=x)
        pyro.deterministic("c", a.sum(-1) * 2)

    guide = AutoNormal(model_plates)
    log_weights, samples = log_importance_weights(
        model_plates, guide, X, num_samples=25, chunk_size=7
    )
    assert log_weights.shape == (25,) and torch.isfinite(log_weights).all()
    assert {name: value.shape for name, value in samples.items()} == {
        "a": (25, 3),
        "b": (25, 2, 1),
        "c": (25,),
    }
    torch.testing.assert_close(samples["c"], samples["a"].sum(-1) * 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=10, num_particles=(1, 20)), "num_particles"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(max_plate_nesting=-1), "max_plate_nesting"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diagnose(model, hand_written_guide, X, **kwargs)


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


def test_plots():
    result = fit(model, AutoNormal(model), X, num_steps=50)
    assert result.plot().get_ylabel() == "ELBO"
    d = diagnose(model, hand_written_guide, X, num_samples=100)
    ax = d.plot()
    assert ax.get_xlabel() == "Pareto k-hat" and ax.get_title().startswith("trust")
    plot_khat(Diagnosis.from_log_weights(pareto_log_weights(0.9, 1000), {}))
    plot_elbo(FitResult(losses=[1.0]))
    plt.close("all")


@pytest.mark.parametrize("module", ["diagnostics", "importance", "plots", "weights"])
def test_docstring_examples(module):
    module = importlib.import_module(f"pyro_flows.{module}")
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0
