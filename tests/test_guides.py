"""AutoFlowGuide: the guide contract (every ELBO, Predictive, median/quantiles, save/load,
copies, dtypes, devices, NeuTra), its set-up errors, and data of other shapes."""

import copy
import io
import math
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import (
    MCMC,
    NUTS,
    SVI,
    JitTrace_ELBO,
    Predictive,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
)
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.infer.reparam import NeuTraReparam
from torch.distributions import biject_to

from pyro_flows import FLOWS, AutoFlowGuide, StartWarning


def model(x, y):
    """Constrained, vector-valued, simplex and plated latents."""
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("groups", 3):
        b = pyro.sample("b", dist.Normal(0.0, sigma))
    group = torch.arange(len(y)) % 3
    with pyro.plate("data", len(y)):
        mean = (x * w).sum(-1) + b[..., group] + p[..., :1]
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def data(n=12):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=generator)
    y = x @ torch.tensor([1.0, -0.5]) + 0.3 * torch.randn(n, generator=generator)
    return x, y


ELBOS = {
    "Trace": lambda: Trace_ELBO(),
    "Trace-vectorized": lambda: Trace_ELBO(num_particles=3, vectorize_particles=True),
    "JitTrace": lambda: JitTrace_ELBO(ignore_jit_warnings=True),
    "TraceGraph": lambda: TraceGraph_ELBO(),
    "Renyi": lambda: RenyiELBO(alpha=0.5, num_particles=2),
}


@pytest.mark.parametrize("loss", ELBOS)
@pytest.mark.parametrize("flow", FLOWS)
def test_contract(flow, loss):
    x, y = data()
    guide = AutoFlowGuide(model, flow=flow, hidden_features=(16, 16))
    elbo = ELBOS[loss]()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        losses = [svi.step(x, y) for _ in range(3)]
        assert all(torch.isfinite(torch.tensor(losses)))

        # A gradient on every parameter.
        params = list(guide.parameters())
        assert len(params) == 4  # shift, scale_diag, scale_tril, flow_params
        surrogate = Trace_ELBO().differentiable_loss(model, guide, x, y)
    grads = torch.autograd.grad(surrogate, params)
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().sum() > 0

    # Predictive: the same sites and shapes as with AutoNormal.
    samples = Predictive(model, guide=guide, num_samples=4)(x, y)
    reference = Predictive(model, guide=AutoNormal(model), num_samples=4)(x, y)
    assert {k: v.shape for k, v in samples.items()} == {k: v.shape for k, v in reference.items()}

    # median and quantiles: same shapes as AutoNormal's, values in the support.
    median = guide.median(x, y)
    quantiles = guide.quantiles([0.1, 0.5, 0.9], x, y)
    trace = poutine.trace(model).get_trace(x, y)
    for name in ("sigma", "w", "p", "b"):
        support = trace.nodes[name]["fn"].support
        assert median[name].shape == trace.nodes[name]["value"].shape
        assert quantiles[name].shape == (3, *trace.nodes[name]["value"].shape)
        assert support.check(median[name]).all()
        assert support.check(quantiles[name]).all()
        torch.testing.assert_close(quantiles[name][1], median[name])
    assert (quantiles["sigma"].diff(dim=0) > 0).all()

    # Save, then load into a freshly built guide: identical log-densities.
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    buffer.seek(0)
    fresh = AutoFlowGuide(model, flow=flow, hidden_features=(16, 16))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    z = torch.randn(5, guide.latent_dim)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.get_posterior().log_prob(z), guide.get_posterior().log_prob(z), rtol=0, atol=0
        )
    assert "AutoFlowGuide" in repr(guide)


@pytest.mark.parametrize("flow", FLOWS)
def test_step_zero_of_the_prior_start_is_the_diagonal_normal(flow):
    torch.set_default_dtype(torch.float64)
    x, y = data()
    values = {
        "sigma": torch.tensor(0.7),
        "w": torch.tensor([0.3, -1.0]),
        "p": torch.tensor([0.2, 0.3, 0.5]),
        "b": torch.tensor([-1.0, 0.0, 2.0]),
    }
    init = init_to_value(values=values)
    guide = AutoFlowGuide(model, flow=flow, init="prior", init_loc_fn=init, init_scale=0.2)
    trace = poutine.trace(guide).get_trace(x, y)
    loc = guide.loc.detach()
    assert loc[0] == torch.tensor(0.7).log()  # sigma, unconstrained
    torch.testing.assert_close(loc[1:3], torch.tensor([0.3, -1.0]))

    # log q of any point equals that of the diagonal Normal at init_loc with init_scale.
    z = loc + 3 * torch.randn(50, guide.latent_dim)
    expected = dist.Normal(loc, 0.2).log_prob(z).sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(guide.get_posterior().log_prob(z), expected, atol=1e-6, rtol=0)

    # The whole guide trace has the density of AutoNormal with the same initialization.
    autonormal = AutoNormal(model, init_loc_fn=init, init_scale=0.2)
    unconstrained = {
        f"{name}_unconstrained": biject_to(site["fn"].support).inv(trace.nodes[name]["value"])
        for name, site in guide.prototype_trace.iter_stochastic_nodes()
    }
    conditioned = poutine.condition(autonormal, data=unconstrained)
    replayed = poutine.trace(conditioned).get_trace(x, y)
    for name, _ in guide.prototype_trace.iter_stochastic_nodes():
        torch.testing.assert_close(replayed.nodes[name]["value"], trace.nodes[name]["value"])
    torch.testing.assert_close(trace.log_prob_sum(), replayed.log_prob_sum(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pathfinder", "laplace"])
@pytest.mark.parametrize("flow", FLOWS)
def test_step_zero_of_an_automatic_start_is_its_gaussian(flow, init):
    torch.set_default_dtype(torch.float64)
    x, y = data()
    guide = AutoFlowGuide(model, flow=flow, init=init)
    guide(x, y)
    start = guide.start
    assert start.how == init and math.isfinite(start.elbo)
    covariance = start.root.apply(torch.eye(guide.latent_dim)).mT  # columns S_0 e_j
    covariance = covariance @ covariance.mT
    gaussian = dist.MultivariateNormal(start.loc, covariance)
    z = start.loc + torch.randn(50, guide.latent_dim) @ torch.linalg.cholesky(covariance).mT
    with torch.no_grad():
        torch.testing.assert_close(guide.get_posterior().log_prob(z), gaussian.log_prob(z))
        torch.testing.assert_close(guide.loc, start.loc)
        torch.testing.assert_close(guide.scale, covariance.diagonal().sqrt())
    per_site = {name: getattr(guide.scales, name).reshape(-1) for name in ("sigma", "w")}
    torch.testing.assert_close(torch.cat(list(per_site.values())), guide.scale[:3])


def test_float64_follows_the_model():
    def model64():
        pyro.sample("z", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))

    guide = AutoFlowGuide(model64, flow="nsf")
    svi = SVI(model64, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step()))
    assert guide.loc.dtype == guide.flow_params.dtype == torch.float64
    assert guide()["z"].dtype == torch.float64


def test_sites_keep_their_dtypes():
    # A float64 site made the packed latent float64, and the float32 site came out float64
    # too: "addmv input tensors must have the same dtype" (AutoNormal keeps each site's).
    x, y = data()

    def mixed(x, y):
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)))
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(x @ w, sigma.float()), obs=y)

    guide = AutoFlowGuide(mixed)
    svi = SVI(mixed, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(x, y)))
    assert guide.loc.dtype == torch.float64
    draws = guide(x, y)
    assert (draws["sigma"].dtype, draws["w"].dtype) == (torch.float64, torch.float32)
    assert guide.median(x, y)["w"].dtype == torch.float32


def test_to_device_and_dtype():
    x, y = data()
    guide = AutoFlowGuide(model)
    guide(x, y)
    guide.to(torch.device("cpu"))
    assert guide(x, y)["w"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda():
    x, y = (t.cuda() for t in data())
    guide = AutoFlowGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(x, y)
    assert guide.flow_params.is_cuda and guide.median(x, y)["w"].is_cuda


def test_copy_and_pickle():
    x, y = data()
    guide = AutoFlowGuide(model)
    guide(x, y)
    z = torch.randn(3, guide.latent_dim)
    expected = guide.get_posterior().log_prob(z)
    for clone in (copy.deepcopy(guide), pickle.loads(pickle.dumps(guide))):
        torch.testing.assert_close(clone.get_posterior().log_prob(z), expected)


def test_copies_keep_the_model():
    # Pyro's guides drop their model when pickled or deep-copied, from the original too: the
    # check of data of another size then failed with "'NoneType' object is not subscriptable".
    x, y = data()
    guide = AutoFlowGuide(model)
    guide(x, y)
    copied, unpickled = copy.deepcopy(guide), pickle.loads(pickle.dumps(guide))
    for clone in (guide, copied, unpickled):
        samples = Predictive(model, guide=clone, num_samples=2)(*data(20))
        assert samples["y"].shape == (2, 20)


def test_copies_of_a_guide_with_dependent_supports():
    def triangle():  # a closure: deep copies share it, pickles cannot keep it
        a = pyro.sample("a", dist.Uniform(0.0, 1.0))
        pyro.sample("b", dist.Uniform(0.0, 1.0 - a))

    guide = AutoFlowGuide(triangle)
    guide()
    unpickled = pickle.loads(pickle.dumps(guide))
    for clone in (copy.deepcopy(guide), guide):
        draws = clone()
        assert 0 < draws["b"] < 1 - draws["a"]
    with pytest.raises(ValueError, match="unpickled without its model"):
        unpickled()


def test_get_transform_matches_sampling_and_runs_neutra():
    x, y = data()
    guide = AutoFlowGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(20):
        svi.step(x, y)
    posterior = guide.get_posterior()
    pyro.set_rng_seed(3)
    z = posterior.rsample((4,))
    pyro.set_rng_seed(3)
    eps = guide.get_base_dist().sample((4,))
    torch.testing.assert_close(guide.get_transform()(eps), z)

    neutra = NeuTraReparam(guide)
    reparam_model = poutine.reparam(model, config=lambda site: neutra)
    mcmc = MCMC(NUTS(reparam_model), num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(x, y)
    latent = mcmc.get_samples()["sigma_shared_latent"]
    samples = neutra.transform_sample(latent.unsqueeze(-2))  # batch left of the one plate dim
    assert samples["p"].shape == (5, 1, 3) and (samples["sigma"] > 0).all()


def test_obs_mask_discarded_elements_are_held_at_the_data():
    # obs_mask samples a latent of the data's full shape and throws away its observed
    # elements: they have no density, so the entropy alone drove them (to 1e9 within 1,500
    # steps), and the flow, conditioning on them, lost the other coordinates' sds.
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(20, generator=generator) + 1.0
    observed = torch.arange(20) % 2 == 0

    def imputation(y, mask):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)

    guide = AutoFlowGuide(imputation, stl=True)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
    svi = SVI(imputation, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    for _ in range(1000):
        svi.step(y, observed)
    assert guide.latent_dim == 1 + 10
    with torch.no_grad():
        draws = Predictive(imputation, guide=guide, num_samples=4000, parallel=True)(y, observed)
    imputed = draws["y_unobserved"].reshape(4000, 20)
    assert (imputed[:, observed] == y[observed]).all()
    # Exact: mu ~ N(sum(y_obs) / p, 1 / p) with p = 1/9 + 10; a missing y ~ N(E mu, 1 + 1/p).
    # Monte Carlo error of an sd from 4,000 draws: 1.1%.
    precision = 1 / 9 + 10
    assert draws["mu"].std() == pytest.approx(precision**-0.5, rel=0.08)
    sds = imputed[:, ~observed].std(0) / (1 + 1 / precision) ** 0.5
    assert ((sds > 0.92) & (sds < 1.08)).all(), sds


def test_stale_param_store_is_explained():
    x, y = data()
    AutoFlowGuide(model, hidden_features=(8,))(x, y)
    with pytest.raises(ValueError, match="clear_param_store"):
        AutoFlowGuide(model)(x, y)


def test_load_state_dict_of_another_configuration():
    x, y = data()
    guide = AutoFlowGuide(model)
    guide(x, y)
    with pytest.raises(ValueError, match="another model or flow configuration"):
        AutoFlowGuide(model, flow="realnvp").load_state_dict(guide.state_dict())


def test_load_state_dict_of_another_model():
    x, y = data()
    guide = AutoFlowGuide(model)
    guide(x, y)

    def other():
        pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))

    fresh = AutoFlowGuide(other)
    fresh.load_state_dict(guide.state_dict())
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="loaded for 8 latent dimensions, but the model has 4"):
        fresh()


def test_user_flows():
    import zuko

    from pyro_flows.flows import identity_init_

    x, y = data()
    for flow in (
        lambda d: zuko.flows.NICE(d, transforms=2),
        lambda d: identity_init_(zuko.flows.MAF(d).transform),
        lambda d: pyro.distributions.transforms.affine_autoregressive(d),
    ):
        pyro.clear_param_store()
        guide = AutoFlowGuide(model, flow=flow)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        assert torch.isfinite(torch.tensor([svi.step(x, y) for _ in range(3)])).all()
        assert guide.flow_params.numel() > 0


def test_flow_config():
    guide = AutoFlowGuide(model, flow="nsf", bins=4)
    expected = {"flow": "nsf", "bins": 4, "init": "pathfinder", "init_scale": 0.1, "stl": True}
    assert guide.flow_config == expected


def test_importing_keeps_distribution_validation():
    import subprocess
    import sys

    code = (
        "import torch; import pyro_flows; "
        "assert torch.distributions.Distribution._validate_args is True"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sharp_posterior_does_not_overflow():
    # A coefficient whose posterior sd is 1e-3 next to predictors of scale 200: before the
    # fan-in multipliers, the affine flows overflowed within 40 Adam steps here.
    generator = torch.Generator().manual_seed(0)
    x = 200 * torch.randn(100, 5, generator=generator)
    y = x @ torch.tensor([0.5, -1.0, 0.2, 0.0, 1.5]) + torch.randn(100, generator=generator)

    def regression(x, y):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(5), 10.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal((x * beta).sum(-1), sigma), obs=y)

    for flow in ("iaf", "realnvp"):
        pyro.clear_param_store()
        guide = AutoFlowGuide(regression, flow=flow)
        elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
        svi = SVI(regression, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
        losses = torch.tensor([svi.step(x, y) for _ in range(150)])
        assert torch.isfinite(losses).all(), flow


# Set-up errors and data of other shapes -------------------------------------------------------


def test_latent_sites_without_elements():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(0), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"no elements \(shapes \{'z': \(0,\)\}\)"):
        AutoFlowGuide(model)()


def test_a_size_given_as_an_int_is_checked_like_a_shape():
    def model(n):
        pyro.sample("z", dist.Normal(torch.zeros(n), 1.0).to_event(1))

    guide = AutoFlowGuide(model)
    guide(3)
    with pytest.raises(ValueError, match=r"'z' of shape \(3,\).*gives it shape \(4,\)"):
        guide(4)


def test_a_float_argument_does_not_retrace_the_model():
    calls = []

    def model(temperature):
        calls.append(temperature)
        pyro.sample("z", dist.Normal(0.0, temperature))

    guide = AutoFlowGuide(model)
    guide(1.0)
    before = len(calls)
    for t in (0.5, 0.25):
        guide(t)
    assert len(calls) == before


def test_discrete_latent_site_is_named():
    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("k", dist.Categorical(torch.ones(3)))

    with pytest.raises(ValueError, match=r"'k' is discrete.*Enumerate.*AutoGuideList"):
        AutoFlowGuide(model)()


def test_subsampled_observations_with_global_latents_are_fine():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    # The automatic start needs the full data: a warning, then AutoNormal's start.
    with pytest.warns(StartWarning, match=r"subsamples \(plate 'data', 10 of 100"):
        guide = AutoFlowGuide(model)
        assert set(guide(torch.zeros(100))) == {"mu"}
    assert guide.start.how == "prior"
    pyro.clear_param_store()
    assert set(AutoFlowGuide(model, init="prior")(torch.zeros(100))) == {"mu"}


def test_create_plates_as_in_autonormal():
    # AutoNormal(model, create_plates=...) took it; AutoFlowGuide raised "Unknown option(s)
    # ['create_plates'] for flow 'iaf'".
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 2):
            pyro.sample("b", dist.Normal(mu, 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    def create_plates(y):
        return [pyro.plate("data", 100, subsample_size=10), pyro.plate("groups", 2)]

    guide = AutoFlowGuide(model, init="prior", create_plates=create_plates)
    assert guide(torch.zeros(100))["b"].shape == (2,)
    assert set(guide.plates) == {"data", "groups"}


def test_no_latent_sites():
    def model(y):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ValueError, match="no latent sample sites"):
        AutoFlowGuide(model)(torch.tensor(0.0))


def test_unsupported_constraint_is_named():
    class OnSphere(dist.TorchDistribution):
        support = constraints.sphere
        arg_constraints = {}

        def __init__(self):
            super().__init__(torch.Size(), torch.Size([3]))

        def sample(self, sample_shape=()):
            x = torch.randn(sample_shape + (3,))
            return x / x.norm(dim=-1, keepdim=True)

        def log_prob(self, value):
            return torch.zeros(value.shape[:-1])

    def model():
        pyro.sample("direction", OnSphere())

    with pytest.raises((NotImplementedError, ValueError), match="direction"):
        AutoFlowGuide(model)()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"flow": "maf"}, ValueError, r"Unknown flow 'maf': use one of \['iaf', 'nsf'"),
        ({"flow": 3}, TypeError, "flow must be a name"),
        ({"flow": "iaf", "bins": 4}, TypeError, r"Unknown option\(s\) \['bins'\] for flow 'iaf'"),
        ({"flow": "iaf", "transforms": 0}, ValueError, "transforms=0"),
        ({"flow": "nsf", "hidden_features": (0,)}, ValueError, "hidden_features"),
        ({"flow": lambda d: None, "transforms": 2}, TypeError, "apply to named flows only"),
        ({"init_scale": 0.0}, ValueError, "init_scale=0.0"),
        ({"init_scale": -1}, ValueError, "init_scale=-1"),
        ({"init_scale": float("nan")}, ValueError, "init_scale=nan"),
        ({"init_scale": "0.1"}, TypeError, "init_scale must be a positive number"),
        ({"num_quantile_samples": 1}, ValueError, "num_quantile_samples=1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(error, match=message):
        AutoFlowGuide(model, **kwargs)


def test_flow_callable_returning_garbage():
    def model():
        pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(TypeError, match=r"flow\(2\) returned NoneType"):
        AutoFlowGuide(model, flow=lambda d: None)()


def test_init_outside_the_support():
    def model():
        pyro.sample("sigma", dist.HalfNormal(1.0))

    def bad_init(site):
        return torch.tensor(0.0)  # on the boundary: log(0) = -inf

    with pytest.raises(ValueError, match="'sigma' a value outside its support"):
        AutoFlowGuide(model, init_loc_fn=bad_init)()


def test_bad_quantiles():
    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    guide = AutoFlowGuide(model)
    with pytest.raises(ValueError, match="probabilities in"):
        guide.quantiles([0.5, 1.5])


def test_the_suggested_split_for_subsampled_local_latents_works():
    from pyro import poutine
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoGuideList, AutoNormal

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])

    guide = AutoGuideList(
        model, create_plates=lambda y: pyro.plate("data", 100, subsample_size=10)
    )
    guide.append(AutoFlowGuide(poutine.block(model, hide=["z"]), init="prior"))
    guide.append(AutoNormal(poutine.block(model, expose=["z"])))
    y = torch.randn(100) + 2.0
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step(y)
    # y_i | mu ~ N(mu, 2): mu | y ~ N(sum(y) / 102, 1 / 51), a posterior sd of 0.14.
    expected = y.sum().item() / 102
    assert abs(guide[0].median(y)["mu"].item() - expected) < 0.35
    assert guide[1].median(y)["z"].shape == (100,)


def test_data_of_another_shape():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    guide = AutoFlowGuide(model)
    guide(torch.zeros(5))
    with pytest.raises(
        ValueError, match=r"'z' of shape \(5,\) \(plates: 'data' \(5\)\).*shape \(3,\)"
    ):
        guide(torch.zeros(3))


def test_data_of_another_shape_with_global_latents_only_is_fine():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            return pyro.sample("y", dist.Normal(w * x, 1.0), obs=y)

    guide = AutoFlowGuide(model)
    guide(torch.zeros(5), torch.zeros(5))
    assert guide(torch.zeros(3))["w"].shape == ()  # e.g. Predictive on new inputs


# The start (init=) -----------------------------------------------------------------------


def test_a_start_that_cannot_run_falls_back_with_a_warning():
    def flat(y):  # x is flat along one direction: the Laplace approximation has no mode
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(x.sum(), 0.1), obs=y)
        pyro.factor("flat", 0.5 * x.square().sum())  # cancels the prior's curvature

    with pytest.warns(StartWarning, match=r"init='laplace'.*not a strict maximum"):
        guide = AutoFlowGuide(flat, init="laplace", init_scale=0.3)
        guide(torch.tensor(1.0))
    assert guide.start.how == "prior"
    torch.testing.assert_close(guide.scale, torch.full((2,), 0.3))
    pyro.clear_param_store()

    def nowhere(y):  # a zero density everywhere: no start can be found
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("wall", torch.tensor(-math.inf) + 0 * x)

    with pytest.warns(StartWarning, match=r"init='pathfinder'.*not finite"):
        guide = AutoFlowGuide(nowhere)
        guide(torch.tensor(1.0))
    assert guide.start.how == "prior"


def test_a_path_into_a_funnels_neck_falls_back_to_the_prior_start():
    # Centred eight schools: the density grows without bound as tau -> 0 with every theta at
    # mu, so L-BFGS climbs into the neck and its Gaussians get ever worse (the last one's ELBO
    # is thousands of nats below the best). A start there is far too narrow to leave.
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])

    def centred(sigma, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("school", 8):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    with pytest.warns(StartWarning, match=r"init='pathfinder'.*ran away.*non-centred"):
        guide = AutoFlowGuide(centred)
        guide(sigma, y)
    assert guide.start.how == "prior"
    pyro.clear_param_store()

    def noncentred(sigma, y):  # the same posterior, no neck: Pathfinder's start is kept
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("school", 8):
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)

    guide = AutoFlowGuide(noncentred)
    guide(sigma, y)
    assert guide.start.how == "pathfinder"


def test_unknown_start():
    with pytest.raises(ValueError, match=r"init='Pathfinder': use one of \['pathfinder'"):
        AutoFlowGuide(model, init="Pathfinder")


def test_the_start_has_a_bounded_cost():
    x, y = data()
    guide = AutoFlowGuide(model)
    guide(x, y)
    # Pathfinder's cap (1,500 rows of the log density) and the ELBO of the prior start.
    assert 0 < guide.start.evaluations <= 1500 + 32
    assert guide.start.seconds > 0


def test_above_the_dense_limit_the_linear_layer_is_diagonal_plus_low_rank():
    torch.set_default_dtype(torch.float64)

    def wide(y):
        with pyro.plate("d", 250):
            x = pyro.sample("x", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(x, 0.5), obs=y)

    y = torch.randn(250, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    guide = AutoFlowGuide(wide, hidden_features=(8,))
    guide(y)
    names = {name for name, _ in guide.named_parameters()}
    assert {"scale_left", "scale_right"} <= {n.removesuffix("_unconstrained") for n in names}
    assert "scale_tril_unconstrained" not in names
    # At step 0 the guide is the start's Gaussian: log q(z) = log N(S_0^-1 (z - mu_0)) - log|S_0|.
    start = guide.start
    z = start.loc + torch.randn(5, 250, dtype=torch.float64)
    eps = start.root.solve(z - start.loc)
    expected = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1) - start.root.log_abs_det
    with torch.no_grad():
        torch.testing.assert_close(guide.get_posterior().log_prob(z), expected)
    # The posterior is N(0.8 y, 0.2): Pathfinder finds it.
    torch.testing.assert_close(start.loc, 0.8 * y, atol=1e-3, rtol=0)


def test_locs_and_scales_per_site_as_autonormal():
    torch.set_default_dtype(torch.float64)
    x, y = data()
    values = {
        "sigma": torch.tensor(0.7),
        "w": torch.tensor([0.3, -1.0]),
        "p": torch.tensor([0.2, 0.3, 0.5]),
        "b": torch.tensor([-1.0, 0.0, 2.0]),
    }
    init = init_to_value(values=values)
    guide = AutoFlowGuide(model, init="prior", init_loc_fn=init, init_scale=0.2)
    autonormal = AutoNormal(model, init_loc_fn=init, init_scale=0.2)
    guide(x, y), autonormal(x, y)
    for name in ("sigma", "w", "p", "b"):
        # at step 0 the same numbers as AutoNormal's (unconstrained, per site)
        torch.testing.assert_close(getattr(guide.locs, name), getattr(autonormal.locs, name))
        torch.testing.assert_close(getattr(guide.scales, name), getattr(autonormal.scales, name))
    with pytest.raises(ValueError, match="not been set up yet"):
        AutoFlowGuide(model).locs  # noqa: B018
