import functools
import json
import math
import warnings

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalMessenger,
    init_to_value,
)

import pyro_flows.arviz
from benchmarks.arviz_conversion import model as regression
from pyro_flows import AutoFlowGuide, diagnose
from pyro_flows.arviz import to_inference_data

torch.set_num_threads(1)

# Models ----------------------------------------------------------------------------------

SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def nested(y):
    """Groups of members (nested plates), a matrix-valued latent and an event-dim deterministic."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    chol = pyro.sample("chol", dist.LKJCholesky(2, 1.0))
    pyro.deterministic("corr", chol @ chol.transpose(-1, -2), event_dim=2)
    with pyro.plate("group", y.shape[0], dim=-2):
        a = pyro.sample("a", dist.Normal(mu, 1.0))
        with pyro.plate("member", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(a, 0.5), obs=y)


def improper(y):
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


X, NOISE = torch.randn(2, 30, 2, generator=torch.Generator().manual_seed(0))
Y_REG = 0.5 + X @ torch.tensor([1.0, -2.0]) + 0.5 * NOISE[:, 0]
Y_NESTED = torch.arange(12.0).reshape(3, 4) / 6
DATA = {
    "eight_schools": (eight_schools, (SIGMA, Y)),
    "regression": (regression, (X, Y_REG)),
    "nested": (nested, (Y_NESTED,)),
    "improper": (improper, (Y[:4] / 10,)),
}
LATENT = {
    "eight_schools": (["mu", "tau", "eta"], "obs"),
    "regression": (["alpha", "sigma", "beta"], "y"),
    "nested": (["mu", "chol", "a"], "y"),
}
GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal,
    "AutoIAFNormal": functools.partial(AutoIAFNormal, hidden_dim=[8]),
    "AutoNormalMessenger": AutoNormalMessenger,
    "AutoFlowGuide": functools.partial(AutoFlowGuide, hidden_features=(16, 16)),
}


@functools.cache
def fitted(model_name, guide_name, num_steps=200):
    """A guide fitted with a fixed seed (cached: fits are shared between tests)."""
    model, args = DATA[model_name]
    pyro.set_rng_seed(0)
    options = {}
    if model_name == "improper":
        options["init_loc_fn"] = init_to_value(values={"mu": torch.tensor(0.0)})
    guide = GUIDES[guide_name](model, **options)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(num_steps):
        svi.step(*args)
    return guide, args


def condition_on_draw(model, args, idata, draw, names):
    """A plain (unvectorized) model trace conditioned on one posterior draw."""
    data = {name: torch.as_tensor(idata.posterior[name].values[0, draw]) for name in names}
    trace = poutine.trace(poutine.condition(model, data=data)).get_trace(*args)
    trace.compute_log_prob()
    return trace


# Groups, dims and shapes -------------------------------------------------------------------


def test_eight_schools_groups_dims_shapes():
    guide, args = fitted("eight_schools", "AutoNormal")
    idata = to_inference_data(guide, *args, num_samples=50)
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
    }
    post = idata.posterior
    assert set(post.data_vars) == {"mu", "tau", "eta", "theta"}
    assert post["mu"].dims == ("chain", "draw")
    assert post["theta"].dims == ("chain", "draw", "school")
    assert post["eta"].shape == (1, 50, 8)
    assert list(post["school"].values) == list(range(8))
    assert idata.posterior_predictive["obs"].dims == ("chain", "draw", "school")
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "school")
    np.testing.assert_array_equal(idata.observed_data["obs"].values, Y.numpy())
    assert set(idata.sample_stats.data_vars) == {"log_q", "lp", "log_weight"}
    assert idata.sample_stats["lp"].shape == (1, 50)
    attrs = idata.sample_stats.attrs
    assert attrs["guide"] == "AutoNormal"
    assert attrs["pyro_flows_version"] == pyro_flows.__version__
    assert math.isfinite(attrs["elbo"]) and attrs["pareto_k"] > -1


def test_regression_groups_dims_shapes():
    guide, args = fitted("regression", "AutoMultivariateNormal")
    idata = to_inference_data(guide, *args, num_samples=40, prior=True, constant_data={"x": X})
    assert idata.posterior["beta"].dims == ("chain", "draw", "feature")
    assert idata.posterior["mu"].dims == ("chain", "draw", "data")
    assert idata.posterior["mu"].shape == (1, 40, 30)
    assert idata.log_likelihood["y"].shape == (1, 40, 30)
    assert idata.prior["beta"].dims == ("chain", "draw", "feature")
    assert idata.prior_predictive["y"].dims == ("chain", "draw", "data")
    np.testing.assert_array_equal(idata.constant_data["x"].values, X.numpy())


def test_nested_plates_and_event_dims():
    guide, args = fitted("nested", "AutoNormal")
    idata = to_inference_data(guide, *args, num_samples=30)
    post = idata.posterior
    # "a" lives in plate "group" (dim -2) only: its value has shape (3, 1)
    assert post["a"].dims == ("chain", "draw", "group", "a_dim_1")
    assert post["chol"].dims == ("chain", "draw", "chol_dim_0", "chol_dim_1")
    assert post["corr"].dims == ("chain", "draw", "corr_dim_0", "corr_dim_1")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "group", "member")
    assert idata.posterior_predictive["y"].shape == (1, 30, 3, 4)
    chol = post["chol"].values
    np.testing.assert_allclose(post["corr"].values, chol @ np.swapaxes(chol, -1, -2), atol=1e-6)


def test_user_dims_and_coords_override():
    guide, args = fitted("eight_schools", "AutoNormal")
    names = [f"school {i}" for i in "ABCDEFGH"]
    idata = to_inference_data(
        guide,
        *args,
        num_samples=10,
        coords={"school": names, "pupil": np.arange(8) + 100},
        dims={"eta": ["pupil"]},
    )
    assert list(idata.posterior["theta"].school.values) == names
    assert idata.posterior["eta"].dims == ("chain", "draw", "pupil")
    assert idata.posterior["eta"].pupil.values[0] == 100


def test_plate_named_like_an_arviz_dimension_is_renamed():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("draw", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    guide = AutoNormal(model)
    guide(Y)
    idata = to_inference_data(guide, Y, num_samples=5)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "draw_plate")


# Values -------------------------------------------------------------------------------------


def test_posterior_is_the_guide_draws_with_the_same_seed():
    guide, args = fitted("eight_schools", "AutoNormal")
    pyro.set_rng_seed(3)
    idata = to_inference_data(guide, *args, num_samples=64)
    pyro.set_rng_seed(3)
    with torch.no_grad(), pyro.plate("draws", 64, dim=-2):
        draws = guide(*args)
    for name in ("mu", "tau"):
        np.testing.assert_allclose(idata.posterior[name].values[0], draws[name].squeeze(-1))
    np.testing.assert_allclose(idata.posterior["eta"].values[0], draws["eta"], rtol=1e-6)


def test_posterior_moments_match_the_guide():
    # AutoNormal's q(mu) is Normal(loc, scale): the mean of n draws has sd scale / sqrt(n),
    # and the sample sd has relative sd about 1 / sqrt(2 n); both checked at 4.5 sd.
    guide, args = fitted("eight_schools", "AutoNormal")
    n = 2000
    idata = to_inference_data(guide, *args, num_samples=n)
    loc, scale = guide.locs.mu.item(), guide.scales.mu.item()
    mu = idata.posterior["mu"].values[0]
    assert abs(mu.mean() - loc) < 4.5 * scale / math.sqrt(n)
    assert abs(mu.std() / scale - 1) < 4.5 / math.sqrt(2 * n)


def test_posterior_predictive_is_drawn_under_each_draw():
    # (obs_rep - theta) / sigma is standard normal and independent across draws and schools.
    guide, args = fitted("eight_schools", "AutoNormal")
    idata = to_inference_data(guide, *args, num_samples=500)
    z = (idata.posterior_predictive["obs"] - idata.posterior["theta"]).values / SIGMA.numpy()
    assert abs(z.mean()) < 4.5 / math.sqrt(z.size)
    assert abs(z.std() - 1) < 4.5 / math.sqrt(2 * z.size)


@pytest.mark.parametrize("model_name", ["eight_schools", "regression", "nested"])
@pytest.mark.parametrize("options", [{}, {"chunk_size": 3}, {"vectorize": False}], ids=str)
def test_log_likelihood_and_lp_match_a_per_draw_trace(model_name, options):
    guide, args = fitted(model_name, "AutoNormal")
    model = DATA[model_name][0]
    idata = to_inference_data(guide, *args, num_samples=8, **options)
    latent, observed = LATENT[model_name]
    for draw in range(8):
        trace = condition_on_draw(model, args, idata, draw, latent)
        site = trace.nodes[observed]
        pointwise = site["fn"].log_prob(site["value"]).detach().numpy()
        ll = idata.log_likelihood[site["name"]].values[0, draw]
        np.testing.assert_allclose(ll, pointwise, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ll.sum(), site["log_prob"].sum().item(), rtol=1e-5)
        lp = idata.sample_stats["lp"].values[0, draw]
        np.testing.assert_allclose(lp, trace.log_prob_sum().item(), rtol=1e-5)


def test_masked_observations_have_zero_log_likelihood():
    mask = torch.tensor([True, False, True, True])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    guide = AutoNormal(model)
    guide(Y[:4])
    idata = to_inference_data(guide, Y[:4], num_samples=6)
    ll = idata.log_likelihood["y"].values[0]
    assert (ll[:, 1] == 0).all() and (ll[:, mask.numpy()] < 0).all()
    for draw in range(6):
        trace = condition_on_draw(model, (Y[:4],), idata, draw, ["mu"])
        assert ll[draw].sum() == pytest.approx(trace.nodes["y"]["log_prob"].sum().item())


def test_latent_site_with_masked_entries_is_named():
    # obs_mask makes "y_unobserved" latent in every entry, with no density where y is
    # observed: AutoNormal's scale there grows with the steps and the weights see it
    mask = torch.tensor([True, False, True, True])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)

    guide = AutoNormal(model)
    guide(Y[:4])
    match = "masks out 3 of 4 entries of latent site 'y_unobserved'"
    with pytest.warns(UserWarning, match=match):
        idata = to_inference_data(guide, Y[:4], num_samples=6)
    assert idata.log_likelihood["y_observed"].shape == (1, 6, 4)
    with pytest.warns(UserWarning, match=match):
        diagnose(model, guide, Y[:4], num_samples=6)
    guide = AutoFlowGuide(model)  # holds those entries at the data: no warning
    guide(Y[:4])
    to_inference_data(guide, Y[:4], num_samples=6)


def test_log_q_is_the_guide_density_in_the_constrained_space():
    # For AutoMultivariateNormal, q(mu, tau, eta) = N(mu, log tau, eta) / tau.
    guide, args = fitted("eight_schools", "AutoMultivariateNormal")
    idata = to_inference_data(guide, *args, num_samples=20)
    post = idata.posterior
    latent = torch.cat(
        [
            torch.as_tensor(post["mu"].values[0])[:, None],
            torch.as_tensor(post["tau"].values[0]).log()[:, None],
            torch.as_tensor(post["eta"].values[0]),
        ],
        dim=-1,
    )
    with torch.no_grad():
        expected = guide.get_posterior().log_prob(latent) - latent[:, 1]
    stats = idata.sample_stats
    np.testing.assert_allclose(stats["log_q"].values[0], expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        stats["log_weight"].values, stats["lp"].values - stats["log_q"].values, rtol=1e-6
    )


def test_elbo_and_pareto_k_attributes():
    # The ELBO attribute estimates what Trace_ELBO estimates; compared at 4.5 combined sd.
    guide, args = fitted("eight_schools", "AutoNormal")
    n = 1000
    idata = to_inference_data(guide, *args, num_samples=n)
    log_weight = idata.sample_stats["log_weight"].values[0]
    attrs = idata.sample_stats.attrs
    assert attrs["elbo"] == pytest.approx(log_weight.mean())
    assert attrs["pareto_k"] == pytest.approx(az.psislw(log_weight.astype(np.float64))[1])
    loss = Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1)
    elbo = -loss.loss(eight_schools, guide, *args)
    assert abs(attrs["elbo"] - elbo) < 4.5 * math.sqrt(2) * log_weight.std() / math.sqrt(n)


def test_sample_stats_attributes_are_the_diagnosis():
    # the same seed gives the same draws: every number of diagnose, to the last bit
    guide, args = fitted("eight_schools", "AutoNormal")
    pyro.set_rng_seed(5)
    idata = to_inference_data(guide, *args, num_samples=500)
    pyro.set_rng_seed(5)
    d = diagnose(eight_schools, guide, *args, num_samples=500)
    np.testing.assert_array_equal(idata.sample_stats["log_weight"].values[0], d.log_weights)
    attrs, expected = idata.sample_stats.attrs, d.to_dict()
    assert {name: attrs[name] for name in expected} == expected
    assert set(expected) >= {"khat", "khat_threshold", "ess", "elbo", "iwelbo_100", "verdict"}
    assert attrs["pareto_k"] == d.khat


def test_exact_guide_has_bounded_weights():
    # q = the exact posterior: every weight is p(x) up to float32 rounding. ArviZ's PSIS
    # finds no tail (k-hat = inf); diagnose's rule reports bounded weights (-inf), "trust".
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(x.sum() / (len(x) + 1), (len(x) + 1) ** -0.5))

    x = Y[:4] / 10
    idata = to_inference_data(guide, x, num_samples=1000, model=model)
    attrs = idata.sample_stats.attrs
    assert attrs["pareto_k"] == attrs["khat"] == -math.inf and attrs["verdict"] == "trust"


def test_prior_groups_sample_the_prior_not_the_initial_values():
    # mu ~ Normal(0, 5): the mean of n draws has sd 5 / sqrt(n); the sd is checked at 4.5 sd.
    guide, args = fitted("eight_schools", "AutoNormal")
    n = 1000
    idata = to_inference_data(guide, *args, num_samples=n, prior=True)
    mu = idata.prior["mu"].values[0]
    assert abs(mu.mean()) < 4.5 * 5 / math.sqrt(n)
    assert abs(mu.std() / 5 - 1) < 4.5 / math.sqrt(2 * n)
    assert idata.prior_predictive["obs"].dims == ("chain", "draw", "school")


def test_improper_prior_model():
    guide, args = fitted("improper", "AutoMultivariateNormal")
    idata = to_inference_data(guide, *args, num_samples=20)
    assert np.isfinite(idata.sample_stats["lp"].values).all()
    assert idata.log_likelihood["y"].shape == (1, 20, 4)
    with pytest.raises(ValueError, match="'mu'.*improper prior"):
        to_inference_data(guide, *args, num_samples=20, prior=True)


# Every guide ----------------------------------------------------------------------------------


@pytest.mark.parametrize("guide_name", GUIDES)
def test_every_autoguide(guide_name):
    guide, args = fitted("nested", guide_name, num_steps=20)
    idata = to_inference_data(guide, *args, num_samples=12, chunk_size=5)
    assert idata.posterior["a"].shape == (1, 12, 3, 1)
    assert idata.posterior["chol"].shape == (1, 12, 2, 2)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "group", "member")
    for name in ("log_q", "lp", "log_weight"):
        assert np.isfinite(idata.sample_stats[name].values).all()
    assert idata.sample_stats.attrs["guide"] == type(guide).__name__


def test_flow_config_attribute():
    guide, args = fitted("nested", "AutoFlowGuide", num_steps=20)
    idata = to_inference_data(guide, *args, num_samples=5)
    config = json.loads(idata.sample_stats.attrs["flow_config"])
    assert config == json.loads(json.dumps(guide.flow_config, default=str))


# ArviZ functions ------------------------------------------------------------------------------


@pytest.mark.filterwarnings(  # ArviZ 0.23's plots call a matplotlib 3.11 deprecated API
    "ignore:Passing a dict or None as alias_mapping:matplotlib.MatplotlibDeprecationWarning"
)
def test_arviz_functions_on_eight_schools():
    guide, args = fitted("eight_schools", "AutoNormal")
    idata = to_inference_data(guide, *args, num_samples=200)
    summary = az.summary(idata, var_names=["mu", "tau", "theta"])
    assert np.isfinite(summary["mean"].values).all() and len(summary) == 10
    az.plot_posterior(idata, var_names=["mu", "tau"])
    az.plot_pair(idata, var_names=["mu", "tau"])
    plt.close("all")


@pytest.mark.filterwarnings(  # LOO's k-hat judges the fit (VI draws have light tails), not us
    "ignore:Estimated shape parameter of Pareto distribution:UserWarning"
)
@pytest.mark.filterwarnings(  # ArviZ 0.23's compare uses an API that pandas 3.1 deprecates
    "ignore:The inplace keyword in DataFrame.sort_values:pandas.errors.Pandas4Warning"
)
def test_loo_and_compare_autonormal_against_autoflowguide():
    fits = {name: fitted("regression", name, 500) for name in ("AutoNormal", "AutoFlowGuide")}
    idatas = {name: to_inference_data(g, *a, num_samples=400) for name, (g, a) in fits.items()}
    for idata in idatas.values():
        loo = az.loo(idata, pointwise=True)
        assert np.isfinite(loo.elpd_loo) and np.isfinite(loo.pareto_k.values).all()
        with warnings.catch_warnings():  # ArviZ's caution about WAIC itself, on 400 draws
            warnings.filterwarnings("ignore", "For one or more samples the posterior variance")
            assert np.isfinite(az.waic(idata).elpd_waic)
    comparison = az.compare(idatas)
    assert set(comparison.index) == set(idatas)
    assert np.isfinite(comparison["elpd_loo"].values).all()
    assert comparison["weight"].sum() == pytest.approx(1.0)


def test_benchmark_methods_make_the_same_groups():
    from benchmarks import arviz_conversion

    guide, x, y = arviz_conversion.fit(num_obs=20, num_steps=5)
    fast = arviz_conversion.vectorized(guide, x, y, num_draws=6)
    slow = arviz_conversion.naive(guide, x, y, num_draws=6)
    assert set(slow.groups()) == set(fast.groups()) - {"sample_stats"}
    for group in slow.groups():
        for name, array in slow[group].data_vars.items():
            assert array.dims == fast[group][name].dims, (group, name)
            assert array.shape == fast[group][name].shape, (group, name)


def test_arviz_1_calling_convention(monkeypatch):
    # ArviZ 1.x (arviz-base): from_dict(data, *, coords, dims, attrs={group: attrs}) and
    # arviz-stats' psislw negates its input. Neither is installable here: stand-ins check
    # that the same groups reach them in that convention.
    import sys
    import types

    calls, arviz_0_psislw = {}, az.psislw

    def from_dict(data, *, coords=None, dims=None, attrs=None):
        calls.update(data=data, coords=coords, dims=dims, attrs=attrs)
        return "datatree"

    def psislw(ary, r_eff=1.0):
        return arviz_0_psislw(-ary, r_eff)

    stats = types.ModuleType("arviz_stats.base")
    stats.array_stats = types.SimpleNamespace(psislw=psislw)
    monkeypatch.setitem(sys.modules, "arviz_stats", types.ModuleType("arviz_stats"))
    monkeypatch.setitem(sys.modules, "arviz_stats.base", stats)
    monkeypatch.setattr(az, "from_dict", from_dict)
    monkeypatch.delattr(az, "psislw")
    guide, args = fitted("eight_schools", "AutoNormal")
    assert to_inference_data(guide, *args, num_samples=30) == "datatree"
    assert set(calls["data"]) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
    }
    assert calls["data"]["posterior"]["theta"].shape == (1, 30, 8)
    assert calls["dims"]["theta"] == ["school"]
    attrs = calls["attrs"]["sample_stats"]
    assert attrs == calls["attrs"]["/"] and attrs["guide"] == "AutoNormal"
    log_weight = calls["data"]["sample_stats"]["log_weight"][0].astype(np.float64)
    monkeypatch.undo()
    assert attrs["pareto_k"] == pytest.approx(az.psislw(log_weight)[1])


# Bad input ------------------------------------------------------------------------------------


def test_model_that_does_not_broadcast_over_draws():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    guide = AutoNormal(model)
    guide(X, Y_REG)
    # x @ w fails under a plate over draws, and runs under torch.func.vmap: no fallback
    idata = to_inference_data(guide, X, Y_REG, num_samples=4, vectorize=True)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "data")


def test_model_that_vectorizes_neither_way():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        if w.sum().item() > 1e9:  # .item(): cannot run under torch.func.vmap either
            raise AssertionError
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    guide = AutoNormal(model)
    guide(X, Y_REG)
    with pytest.raises(ValueError, match="failed to run vectorized.*vectorize=False"):
        to_inference_data(guide, X, Y_REG, num_samples=4, vectorize=True)
    with pytest.warns(UserWarning, match="one draw at a time.*vectorize=False"):
        idata = to_inference_data(guide, X, Y_REG, num_samples=4)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "data")
    idata = to_inference_data(guide, X, Y_REG, num_samples=4, vectorize=False)  # no warning
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "data")


def test_model_that_mixes_draws_is_caught():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        # averages over draws when vectorized; .item() cannot run under torch.func.vmap
        mean = pyro.deterministic("mean", mu.mean() + 0 * mu.mean().item())
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mean, 1.0), obs=y)

    guide = AutoNormal(model)
    guide(Y)
    with pytest.raises(ValueError, match="'mean'.*does not broadcast"):
        to_inference_data(guide, Y, num_samples=4, vectorize=True)
    with pytest.warns(UserWarning, match="'mean'.*does not broadcast"):
        idata = to_inference_data(guide, Y, num_samples=4)
    post = idata.posterior  # one draw at a time: each draw's own mean
    np.testing.assert_array_equal(post["mean"].values, post["mu"].values)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"coords": [1, 2]}, TypeError, "coords"),
        ({"dims": "school"}, TypeError, "dims"),
    ],
)
def test_bad_options(options, error, match):
    guide, args = fitted("eight_schools", "AutoNormal")
    with pytest.raises(error, match=match):
        to_inference_data(guide, *args, **options)


def test_subsampled_plate_is_refused():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y), subsample_size=3) as index:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[index])

    guide = AutoNormal(model)
    guide(Y)
    with pytest.raises(ValueError, match="Plate 'data' subsamples 3 of 8"):
        to_inference_data(guide, Y, num_samples=4)


def test_observed_site_without_data_is_refused():
    # fitted with y; without it "obs" is latent, absent from the guide: drawn from its prior,
    # it gave a posterior with an "obs" variable, wrong weights, and a warning blaming the model
    guide, _ = fitted("eight_schools", "AutoNormal")
    with pytest.raises(ValueError, match="latent site 'obs' is not in the guide.*pass the data"):
        to_inference_data(guide, SIGMA, num_samples=4)
    with pytest.raises(ValueError, match="latent site 'obs' is not in the guide"):
        diagnose(eight_schools, guide, SIGMA, num_samples=4, iw_particles=1)


def test_model_keyword_arguments():
    guide, _ = fitted("eight_schools", "AutoNormal")
    idata = to_inference_data(guide, sigma=SIGMA, y=Y, num_samples=4)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, Y.numpy())


def test_unfitted_guide_and_missing_model():
    with pytest.raises(ValueError, match="fit it with SVI"):
        to_inference_data(AutoNormal(eight_schools), SIGMA, Y)

    def guide(sigma, y=None):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="model="):
        to_inference_data(guide, SIGMA, Y)


def test_custom_guide_with_model_argument():
    def guide(sigma, y=None):
        pyro.sample("mu", dist.Normal(1.0, 0.1))
        pyro.sample("tau", dist.LogNormal(0.0, 0.1))
        with pyro.plate("school", len(sigma)):
            pyro.sample("eta", dist.Normal(0.0, 1.0))

    idata = to_inference_data(guide, SIGMA, Y, num_samples=10, model=eight_schools)
    assert idata.posterior["theta"].dims == ("chain", "draw", "school")
    assert idata.sample_stats.attrs["guide"] == "function"
