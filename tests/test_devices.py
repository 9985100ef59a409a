"""The guide's core on a device and in both float dtypes.

`pytest tests/test_devices.py --device cuda` runs these on a CUDA device (skipped when there is
none); the default is the CPU.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_flows import FLOWS, AutoFlowGuide, fit, load_checkpoint

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def model(x, y):
    """Constrained, vector, simplex, correlation-Cholesky, plated and dependent latents."""
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.ones((), dtype=x.dtype, device=x.device)))
    w = pyro.sample("w", dist.Normal(torch.zeros_like(x[0]), 1.0).to_event(1))
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3, dtype=x.dtype, device=x.device)))
    pyro.sample("L", dist.LKJCholesky(3, torch.tensor(2.0, dtype=x.dtype, device=x.device)))
    b = pyro.sample("b", dist.Uniform(torch.zeros_like(sigma), 1.0 + sigma))  # moves with sigma
    with pyro.plate("data", len(y)):
        mean = (x * w).sum(-1) + b + p[..., :1]
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def data(device, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, generator=generator, dtype=dtype)
    y = x @ torch.tensor([1.0, -0.5], dtype=dtype) + 0.3 * torch.randn(20, dtype=dtype)
    return x.to(device), y.to(device)


def on(tensor, device, dtype):
    return tensor.device.type == device.type and tensor.dtype == dtype


CASES = [(flow, "float32") for flow in FLOWS] + [("iaf", "float64"), ("nsf_coupling", "float64")]


@pytest.mark.parametrize("flow, dtype", CASES)
def test_guide_core(device, dtype, flow):
    dtype = DTYPES[dtype]
    x, y = data(device, dtype)
    options = {"flow": flow, "hidden_features": (8,), "num_quantile_samples": 256}
    guide = AutoFlowGuide(model, stl=True, **options)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = torch.tensor([svi.step(x, y) for _ in range(3)])
    assert torch.isfinite(losses).all()
    for param in guide.parameters():
        assert on(param, device, dtype)

    trace = poutine.trace(model).get_trace(x, y)
    draws = guide(x, y)
    median = guide.median(x, y)
    quantiles = guide.quantiles([0.1, 0.9], x, y)
    for name in ("sigma", "w", "p", "L", "b"):
        support = trace.nodes[name]["fn"].support
        for value in (draws[name], median[name], *quantiles[name]):
            assert on(value, device, dtype), name
            if name != "b":  # b's support moves with sigma: see tests/test_properties.py
                assert support.check(value).all(), name

    samples = Predictive(model, guide=guide, num_samples=4)(x, y)
    assert on(samples["y"], device, dtype) and samples["w"].shape[::2] == (4, 2)

    fresh = AutoFlowGuide(model, **options)
    fresh.load_state_dict(guide.state_dict())
    fresh.to(device)
    z = guide.get_posterior().sample((3,))
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.get_posterior().log_prob(z), guide.get_posterior().log_prob(z)
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_fit_and_resume(device, dtype, tmp_path):
    dtype = DTYPES[dtype]
    x, y = data(device, dtype)

    def run(num_steps, checkpoint=None):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(model, hidden_features=(16,))
        optim = pyro.optim.Adam({"lr": 0.01})
        result = fit(model, guide, x, y, num_steps=num_steps, optim=optim, checkpoint=checkpoint)
        return result, guide

    result, guide = run(20)
    expected = guide.loc.detach().clone()
    assert result.num_failures == 0 and on(expected, device, dtype)

    path = tmp_path / "fit.pt"
    run(8, path)
    assert load_checkpoint(path)["step"] == 8
    result, guide = run(20, path)
    assert result.num_steps == 20
    assert torch.equal(guide.loc.detach(), expected)
