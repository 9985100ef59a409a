"""Where a guide starts: init_to_median_or_feasible and the initial scales."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO

from pyro_flows import AutoFlowGuide, init_to_median_or_feasible
from pyro_flows.initialization import check_init_scale, init_scale_vector


def gamma_poisson(y):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Poisson(rate), obs=y)


def test_median_where_the_prior_has_one():
    # Pyro's init_to_median: the median of 15 prior draws (log-scale sd 0.003 here, so 2%
    # is about 6 of its sds).
    site = {"name": "s", "fn": dist.LogNormal(1.0, 0.01), "value": None, "is_observed": False}
    value = init_to_median_or_feasible(site)
    torch.testing.assert_close(value, torch.tensor(math.e), rtol=0.02, atol=0)


@pytest.mark.parametrize(
    "support, expected",
    [
        (constraints.positive, torch.ones(2)),
        (constraints.interval(-1.0, 3.0), torch.ones(2)),
        (constraints.simplex, torch.full((2,), 0.5)),
    ],
    ids=str,
)
def test_feasible_point_of_a_flat_prior(support, expected):
    site = {"name": "x", "fn": dist.ImproperUniform(support, (), (2,)), "value": None}
    site["is_observed"] = False
    torch.testing.assert_close(init_to_median_or_feasible(site), expected)


def test_one_init_scale_or_one_per_site():
    shapes = {"a": torch.Size([2]), "b": torch.Size([])}
    like = torch.zeros(3)
    assert init_scale_vector(check_init_scale(0.5), shapes, like).tolist() == [0.5] * 3
    per_site = check_init_scale({"a": torch.tensor([1.0, 2.0])})
    assert init_scale_vector(per_site, shapes, like).tolist() == pytest.approx([1.0, 2.0, 0.1])


@pytest.mark.parametrize(
    "support", [constraints.lower_cholesky, constraints.positive_definite], ids=str
)
def test_flat_prior_on_a_support_torch_cannot_map(support):
    # The default initialization falls back to the guide's own bijection for flat priors:
    # torch's biject_to has none onto these supports and set-up failed with its error.
    def model():
        x = pyro.sample("x", dist.ImproperUniform(support, (), (3, 3)))
        pyro.factor("f", -x.square().sum())

    guide = AutoFlowGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert torch.isfinite(torch.tensor([svi.step() for _ in range(3)])).all()
    torch.testing.assert_close(guide.prototype_trace.nodes["x"]["value"], torch.eye(3))
    assert support.check(guide.median()["x"]).all()


@pytest.mark.parametrize(
    "init_scale, error, match",
    [
        ({"nope": 0.1}, ValueError, r"\['nope'\], which are not latent sites"),
        ({"rate": torch.ones(3)}, ValueError, r"shape \(3,\).*unconstrained shape \(\)"),
        ({"rate": 0.0}, ValueError, r"init_scale\['rate'\].*positive and finite"),
        ({"rate": "0.1"}, TypeError, r"init_scale\['rate'\] must be a positive number"),
    ],
)
def test_bad_init_scale_per_site(init_scale, error, match):
    with pytest.raises(error, match=match):
        AutoFlowGuide(gamma_poisson, init_scale=init_scale)(torch.ones(3))
