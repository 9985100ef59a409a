"""Bijections onto supports, and supports that depend on other latents."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

from pyro_flows import AutoFlowGuide
from pyro_flows.supports import (
    CorrCholeskyBijection,
    LowerCholeskyBijection,
    PositiveOrderedBijection,
    dependent_support_sites,
    site_bijection,
    trace_with_leaf_latents,
)


def triangle():
    """Uniform on {a, b > 0, a + b < 1}: a ~ U(0, 1), b | a ~ U(0, 1 - a)."""
    a = pyro.sample("a", dist.Uniform(0.0, 1.0))
    pyro.sample("b", dist.Uniform(0.0, 1.0 - a))


def test_dependent_sites_are_found():
    values = {"a": torch.tensor(0.3), "b": torch.tensor(0.2)}
    trace = trace_with_leaf_latents(triangle, values)
    assert dependent_support_sites(trace, values) == {"b"}


def test_support_depending_on_a_param_is_dependent():
    def model():
        upper = pyro.param("upper", torch.tensor(2.0))
        pyro.sample("x", dist.Uniform(0.0, upper))

    values = {"x": torch.tensor(1.0)}
    assert dependent_support_sites(trace_with_leaf_latents(model, values), values) == {"x"}


def test_draws_stay_in_the_moving_support():
    guide = AutoFlowGuide(triangle, init="prior", init_scale=2.0)
    with pyro.plate("draws", 2000):
        draws = guide()
    assert ((draws["b"] > 0) & (draws["a"] + draws["b"] < 1)).all()
    # Pyro's AutoNormal fixes b's support at its prototype value of a, and leaves it.
    autonormal = AutoNormal(triangle, init_scale=2.0)
    with pyro.plate("draws", 2000):
        draws = autonormal()
    assert (draws["a"] + draws["b"] > 1).any()


def test_log_density_has_the_dependent_jacobian():
    torch.set_default_dtype(torch.float64)
    guide = AutoFlowGuide(triangle, init="prior", init_scale=0.7)
    trace = poutine.trace(guide).get_trace()
    trace.compute_log_prob()
    a, b = trace.nodes["a"]["value"], trace.nodes["b"]["value"]
    u_a = torch.logit(a)
    u_b = torch.logit(b / (1 - a))
    loc = guide.loc.detach()
    expected = (
        dist.Normal(loc, 0.7).log_prob(torch.stack([u_a, u_b])).sum()
        - torch.log(a * (1 - a))  # da / du_a
        - torch.log((1 - a) * torch.sigmoid(u_b) * (1 - torch.sigmoid(u_b)))  # db / du_b
    )
    torch.testing.assert_close(trace.log_prob_sum(), expected)


def test_models_without_dependent_supports_do_not_run_the_model_in_the_guide():
    calls = []

    def model():
        calls.append(1)
        pyro.sample("a", dist.Beta(2.0, 2.0))

    guide = AutoFlowGuide(model)
    guide()
    after_setup = len(calls)
    for _ in range(5):
        guide()
    assert len(calls) == after_setup


def test_fit_on_the_triangle():
    # The target is normalized (log Z = 0): in unconstrained coordinates it is a product of two
    # standard logistic densities, which a flow can match, so the ELBO should approach 0.
    guide = AutoFlowGuide(triangle, stl=True)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    svi = SVI(triangle, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    for _ in range(400):
        svi.step()
    with pyro.plate("draws", 4000), torch.no_grad():
        draws = guide()
    assert ((draws["b"] > 0) & (draws["a"] + draws["b"] < 1)).all()
    # log w has sd < 0.3 here, so 4000 particles estimate the ELBO to within 0.02.
    estimate = -Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(triangle, guide)
    assert -0.1 < estimate < 0.02
    # E[a] = 1/2 (sd 0.29), E[b] = 1/4 (sd 0.19): 4000 draws give MC errors 0.005 and 0.003;
    # allow 5 MC errors plus 0.01 for what 400 steps leave of the fit.
    assert draws["a"].mean().item() == pytest.approx(0.5, abs=0.035)
    assert draws["b"].mean().item() == pytest.approx(0.25, abs=0.025)
    # The median of b solves b (1 - log b) = 1/2: b = 0.1867 (an MC error of about 0.004).
    assert guide.median()["b"].item() == pytest.approx(0.1867, abs=0.02)


# The bijections that pyro_flows.supports adds to torch's biject_to ---------------------------


def _tril(n, offset=0):
    rows, cols = torch.tril_indices(n, n, offset=offset)
    return lambda matrix: matrix[..., rows, cols]


BIJECTIONS = {
    # name: (transform, free coordinates of an output, input size for n)
    "lower_cholesky": (LowerCholeskyBijection(), _tril, lambda n: n * (n + 1) // 2),
    "positive_definite": (
        site_bijection(constraints.positive_definite),
        _tril,
        lambda n: n * (n + 1) // 2,
    ),
    "positive_ordered": (PositiveOrderedBijection(), lambda n: lambda y: y, lambda n: n),
    "corr_cholesky": (CorrCholeskyBijection(), lambda n: _tril(n, -1), lambda n: n * (n - 1) // 2),
}


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(BIJECTIONS)), n=st.integers(2, 4), seed=st.integers(0, 99))
def test_bijection_round_trip_and_log_jacobian(name, n, seed):
    torch.set_default_dtype(torch.float64)
    transform, free, size = BIJECTIONS[name]
    x = 2 * torch.randn(size(n), generator=torch.Generator().manual_seed(seed))
    y = transform(x)
    assert transform.codomain.check(y).all()
    torch.testing.assert_close(transform.inv(y), x)
    jacobian = torch.autograd.functional.jacobian(lambda x: free(n)(transform(x)), x)
    torch.testing.assert_close(
        transform.log_abs_det_jacobian(x, y), torch.linalg.slogdet(jacobian).logabsdet
    )
    assert transform.inverse_shape(y.shape) == x.shape
    assert transform.forward_shape(x.shape) == y.shape


def test_corr_cholesky_log_jacobian_stays_finite_in_float32():
    # torch's rounds 1 - (y_30^2 + y_31^2) to 0 here; the float64 value is -37.148.
    u = torch.tensor([0.0, 0.0, 0.0, 6.0, 6.0, 0.0])
    t = CorrCholeskyBijection()
    assert t.log_abs_det_jacobian(u, t(u)).item() == pytest.approx(-37.148, abs=1e-3)


def test_positive_ordered_guide_draws_stay_finite_in_float32():
    # exp of an ordered vector (torch's biject_to) is doubly exponential: with init_scale=3,
    # 13% of these draws were infinite.
    def model():
        pyro.sample(
            "cutpoints", dist.ImproperUniform(constraints.positive_ordered_vector, (), (3,))
        )

    guide = AutoFlowGuide(model, init="prior", init_scale=3.0)
    with torch.no_grad(), pyro.plate("draws", 10_000):
        draws = guide()["cutpoints"]
    assert torch.isfinite(draws).all() and (draws > 0).all() and (draws.diff(dim=-1) >= 0).all()
    # Gaps below float32's resolution (e^u < 1e-7 y) still tie, rarely at this width.
    assert constraints.positive_ordered_vector.check(draws).float().mean() > 0.999


def test_wishart_site():
    def model():
        pyro.sample("precision", dist.Wishart(torch.tensor(4.0), torch.eye(2)))

    init = init_to_value(values={"precision": torch.eye(2)})  # torch's sampler warns
    guide = AutoFlowGuide(
        model, hidden_features=(8,), init="prior", init_loc_fn=init, init_scale=0.5
    )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert all(torch.isfinite(torch.tensor(svi.step())) for _ in range(5))
    assert constraints.positive_definite.check(guide.median()["precision"])
