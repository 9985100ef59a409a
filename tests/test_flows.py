"""The flow factories: bijections with the right log-Jacobian, identity at the start, and
clear errors for bad options."""

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
import zuko

from pyro_flows import AutoFlowGuide
from pyro_flows.flows import FLOWS, iaf, identity_init_, nsf, nsf_coupling, realnvp

# Every flow family, plus what a user may pass as `flow=`: a zuko Flow and a torch Transform.
CONSTRUCTORS = {
    **{
        name: partial(factory, transforms=2, hidden_features=(16, 16))
        for name, factory in FLOWS.items()
    },
    "zuko-maf": lambda d: identity_init_(zuko.flows.MAF(d, transforms=2).transform),
}


def _perturbed(name, features):
    transform = CONSTRUCTORS[name](features).to(torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in transform.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return transform


@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_bijection_and_log_det_jacobian(name, features):
    transform = _perturbed(name, features)()
    x = torch.randn(4, features, dtype=torch.float64)
    y, ladj = transform.call_and_ladj(x)
    assert y.shape == x.shape and ladj.shape == (4,)
    assert not torch.allclose(y, x), "the perturbed flow should not be the identity"
    torch.testing.assert_close(transform.inv(y), x, atol=1e-8, rtol=1e-8)
    for i in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(transform, x[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jacobian).logabsdet)
        inverse_jacobian = torch.autograd.functional.jacobian(transform.inv, y[i])
        torch.testing.assert_close(-ladj[i], torch.linalg.slogdet(inverse_jacobian).logabsdet)


@pytest.mark.parametrize("features", [1, 3])
@pytest.mark.parametrize("name", FLOWS)
def test_starts_as_identity(name, features):
    transform = FLOWS[name](features).to(torch.float64)()
    x = 3 * torch.randn(10, features, dtype=torch.float64)
    y, ladj = transform.call_and_ladj(x)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(10, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("factory", [iaf, nsf, nsf_coupling, realnvp], ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "options, message",
    [
        ({"transforms": 0}, "transforms=0"),
        ({"hidden_features": ()}, "hidden_features"),
        ({"hidden_features": (8, 0)}, "hidden_features"),
    ],
)
def test_bad_options(factory, options, message):
    with pytest.raises(ValueError, match=message):
        factory(3, **options)


@pytest.mark.parametrize("factory", [nsf, nsf_coupling], ids=lambda f: f.__name__)
def test_bad_bins(factory):
    with pytest.raises(ValueError, match="bins=1"):
        factory(3, bins=1)


def test_parameter_count_grows_linearly_in_features():
    counts = [sum(p.numel() for p in iaf(d).parameters()) for d in (1000, 2000)]
    assert counts[1] - counts[0] < 2 * (counts[0] - 0), counts
    # (64, 64) hidden units: about 3 * (64 d + 64 * 64 + 2 d * 64) parameters.
    assert counts[1] < 3 * (64 * 2000 + 64 * 64 + 128 * 2000 + 2000 * 3 + 200)


def one_site():
    pyro.sample("mu", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"hidden_features": ()}, ValueError, r"hidden_features=\(\): give one positive int"),
        ({"hidden_features": (64, 0)}, ValueError, r"hidden_features=\(64, 0\)"),
        ({"hidden_features": 64}, TypeError, r"options \{'hidden_features': 64\}.*\(64, 64\)"),
        ({"transforms": -1}, ValueError, "transforms=-1: a flow needs at least one layer"),
        ({"flow": "nsf", "bins": 1}, ValueError, "bins=1: a spline needs at least 2 bins"),
        ({"activation": "relu"}, TypeError, r"'activation': 'relu'.*activation=torch.nn.ELU"),
        ({"flow": "IAF"}, ValueError, r"Unknown flow 'IAF': use one of \['iaf'"),
        ({"init_scale": float("inf")}, ValueError, "init_scale=inf: .* positive and finite"),
    ],
)
def test_bad_flow_options(options, error, message):
    with pytest.raises(error, match=message):
        AutoFlowGuide(one_site, **options)
