"""Importance weights of guide draws and their statistics: k-hat, ESS, IW-ELBO.

(How the verdict uses them is tested in tests/test_diagnostics.py.)
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_flows import Diagnosis, log_importance_weights
from pyro_flows.importance import khat_threshold

X = torch.tensor([1.3, 0.4, 2.1, 1.7, 0.9, 1.1, 0.2, 1.8])


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
