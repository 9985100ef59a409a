"""FlowPosterior and its "sticking the landing" log-density (the path gradient vanishes at
the exact posterior, for every flow and under JitTrace_ELBO)."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_value

from pyro_flows import FLOWS, AutoFlowGuide
from pyro_flows.distributions import (
    DENSE_SOLVE_MAX,
    FlowPosterior,
    _implicit_inverse,
    _jacobian,
    _layers,
    _transposed_solve,
    detached_log_prob,
)
from pyro_flows.flows import realnvp

Y = torch.tensor([1.0, -2.0, 0.5])


def model():
    # z ~ N(0, 2^2 I), y | z ~ N(z, I): the posterior is N(0.8 y, 0.8 I).
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=Y)


def exact_guide(flow, stl):
    # At step 0 the guide is exactly N(init loc, init_scale^2 I): the posterior.
    init = init_to_value(values={"z": 0.8 * Y.to(torch.get_default_dtype())})
    guide = AutoFlowGuide(
        model, flow=flow, stl=stl, init="prior", init_loc_fn=init, init_scale=0.8**0.5
    )
    guide()
    return guide


@pytest.mark.parametrize("loss", [Trace_ELBO, JitTrace_ELBO], ids=["Trace", "JitTrace"])
@pytest.mark.parametrize("flow", FLOWS)
def test_gradient_vanishes_at_the_exact_posterior(flow, loss):
    torch.set_default_dtype(torch.float64)
    grads = {}
    for stl in (False, True):
        pyro.clear_param_store()
        guide = exact_guide(flow, stl)
        params = list(guide.parameters())  # the location, the linear layer, the flow
        elbo = loss(num_particles=4, vectorize_particles=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            value = elbo.differentiable_loss(model, guide)
        # -ELBO = -log p(y) exactly for every draw when q is the posterior.
        log_evidence = dist.Normal(0.0, 5.0**0.5).log_prob(Y).sum()
        torch.testing.assert_close(value, -log_evidence.to(value.dtype))
        grads[stl] = max(g.abs().max() for g in torch.autograd.grad(value, params))
    assert grads[False] > 1e-2  # the score term: noise of order one
    assert grads[True] < 1e-10  # the path term alone vanishes


def test_detached_log_prob_equals_log_prob_with_the_path_gradient():
    torch.set_default_dtype(torch.float64)
    transform = realnvp(3)
    with torch.no_grad():
        for p in transform.parameters():
            p.add_(0.3 * torch.randn_like(p))
    f = transform()
    loc, scale = torch.randn(3), torch.rand(3) + 0.5
    q = FlowPosterior(f, loc, scale)
    eps = torch.randn(5, 3)
    z = (loc + scale * f(eps)).requires_grad_()
    expected = q.log_prob(z)  # through the exact inverse
    (grad_expected,) = torch.autograd.grad(expected.sum(), z)
    for inverse in ("exact", "implicit"):
        if inverse == "implicit":
            y = (z - loc) / scale
            eps_ = _implicit_inverse(f, y, eps)
            _, ladj = f.call_and_ladj(eps_)
            value = dist.Normal(0.0, 1.0).log_prob(eps_).sum(-1) - ladj - scale.log().sum()
        else:
            value = detached_log_prob(f, loc, scale, z, eps)
        (grad,) = torch.autograd.grad(value.sum(), z)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, grad_expected)


@pytest.mark.parametrize("flow", ["iaf", "nsf"])
def test_layered_transposed_solve_equals_the_dense_jacobian(flow):
    # The O(D)-memory path of STL for autoregressive flows against the dense Jacobian.
    torch.set_default_dtype(torch.float64)
    lazy = FLOWS[flow](7, hidden_features=(16,))
    with torch.no_grad():
        for p in lazy.parameters():  # well away from the identity
            p.add_(0.3 * torch.randn_like(p))
    transform = lazy()
    eps = torch.randn(5, 7)
    grad = torch.randn(5, 7)
    jacobian = _jacobian(transform, eps)
    expected = torch.linalg.solve(jacobian.mT, grad.unsqueeze(-1)).squeeze(-1)
    found = _transposed_solve(_layers(transform), eps, grad)
    torch.testing.assert_close(found, expected)


@pytest.mark.parametrize("features", [7, DENSE_SOLVE_MAX + 8])
def test_implicit_inverse_of_an_autoregressive_flow_at_either_size(features):
    # Dense up to DENSE_SOLVE_MAX features, layer by layer above: the same gradient.
    torch.set_default_dtype(torch.float64)
    lazy = FLOWS["iaf"](features, hidden_features=(16,))
    with torch.no_grad():
        for p in lazy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    transform = lazy()
    eps = torch.randn(3, features)
    y = transform(eps).requires_grad_()
    grad = torch.randn(3, features)
    (found,) = torch.autograd.grad(_implicit_inverse(transform, y, eps), y, grad)
    jacobian = _jacobian(transform, eps)
    expected = torch.linalg.solve(jacobian.mT, grad.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(found, expected)
