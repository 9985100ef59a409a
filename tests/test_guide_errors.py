import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from pyro_flows import AutoFlowGuide


def test_discrete_latent_site_is_named():
    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("k", dist.Categorical(torch.ones(3)))

    with pytest.raises(ValueError, match=r"'k' is discrete.*Enumerate.*AutoGuideList"):
        AutoFlowGuide(model)()


def test_subsampled_local_latents_are_refused():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])

    with pytest.raises(
        ValueError,
        match=r"'z' is inside plate 'data'.*10 of 100.*AutoGuideList\(model, create_plates",
    ):
        AutoFlowGuide(model)(torch.zeros(100))


def test_subsampled_observations_with_global_latents_are_fine():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    assert set(AutoFlowGuide(model)(torch.zeros(100))) == {"mu"}


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

    guide = AutoFlowGuide(model, create_plates=create_plates)
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
    guide.append(AutoFlowGuide(poutine.block(model, hide=["z"])))
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
