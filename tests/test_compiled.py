"""fit(compile=...): the same fit as the ordinary SVI step (loss, parameters, averaging), every
reason to fall back, checkpoints and resuming, the non-finite guard, and the Jacobi safety net."""

import math
import os
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_flows._compiled as compiled
from pyro_flows import AutoFlowGuide, NonFiniteLossError, fit

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def noncentred(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * z, sigma), obs=y)


def params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def run(mode, steps=30, flow="iaf", stl=True, loss=None, seed=1, dtype=torch.float32, **options):
    """A fit from a freshly set-up guide: the same start and draws whatever `mode`."""
    model, init = options.pop("model", schools), options.pop("init", "prior")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    args = (Y.to(dtype), SIGMA.to(dtype))
    guide = AutoFlowGuide(model, flow=flow, stl=stl, init=init)
    guide(*args)  # set-up outside the compared fits
    pyro.set_rng_seed(seed)
    loss = loss or Trace_ELBO()
    result = fit(model, guide, *args, num_steps=steps, loss=loss, compile=mode, **options)
    return result, params()


def assert_same_fit(a, b, rtol):
    (result_a, params_a), (result_b, params_b) = a, b
    torch.testing.assert_close(
        torch.tensor(result_a.losses), torch.tensor(result_b.losses), rtol=rtol, atol=rtol
    )
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=rtol, atol=rtol)


CASES = {
    "iaf-stl-8-vectorized": {
        "loss": lambda: Trace_ELBO(8, vectorize_particles=True, max_plate_nesting=1)
    },
    "iaf-1": {"stl": False},
    "realnvp-stl": {"flow": "realnvp"},
    "nsf-stl-2-looped": {"flow": "nsf", "loss": lambda: Trace_ELBO(num_particles=2)},
    "noncentred-pathfinder-start": {"model": noncentred, "init": "pathfinder"},
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_same_fit_as_the_ordinary_step(case):
    options = {k: v() if k == "loss" else v for k, v in case.items()}
    ordinary = run(False, **options)
    found = run(True, **options)
    assert found[0].compiled and not ordinary[0].compiled
    assert found[0].averaged_steps == ordinary[0].averaged_steps == 6
    assert_same_fit(found, ordinary, rtol=1e-4)


def test_same_fit_in_float64():
    torch.set_default_dtype(torch.float64)  # the priors' numbers too (conftest resets it)
    assert_same_fit(run(True, dtype=torch.float64), run(False, dtype=torch.float64), rtol=1e-9)


def test_too_few_jacobi_iterations_are_redone_exactly(monkeypatch):
    # One Jacobi iteration per layer is too few once the flow has moved: such steps are redone
    # as the guide's own solve does them (the same gradients as the ordinary step), and after
    # MISSES of them the graph is captured again with more iterations.
    monkeypatch.setattr(compiled, "ITERATIONS", ((100, 1),))
    monkeypatch.setattr(compiled, "MISSES", 2)
    loss = Trace_ELBO(4, vectorize_particles=True, max_plate_nesting=1)
    guide = AutoFlowGuide(schools, init="prior")
    fit(schools, guide, Y, SIGMA, num_steps=200, loss=loss, optim=pyro.optim.Adam({"lr": 0.05}))
    step = compiled.CompiledStep(schools, guide, loss, (Y, SIGMA), {}, True)
    for _ in range(4):
        state = torch.get_rng_state()
        found = step.loss_and_grads(), [p.grad for p in step.params.values()]
        for p in step.params.values():
            p.grad = None
        torch.set_rng_state(state)
        expected = loss.loss_and_grads(schools, guide, Y, SIGMA)
        assert found[0] == pytest.approx(expected, rel=1e-6)
        for p, grad in zip(step.params.values(), found[1], strict=True):
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-5)
            p.grad = None
    assert step.iterations > 1


# Fallbacks -----------------------------------------------------------------------------------


def branchy(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    scale = 2.0 if mu > 0 else 1.0  # Python control flow on a value
    pyro.sample("y", dist.Normal(mu, scale * sigma).to_event(1), obs=y)


def dependent(y, sigma):
    a = pyro.sample("a", dist.Uniform(0.0, 1.0))
    b = pyro.sample("b", dist.Uniform(0.0, 1.0 - a))
    pyro.sample("y", dist.Normal(a + b, sigma).to_event(1), obs=y)


def imputed(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    mask = torch.arange(len(y)) % 2 == 0
    with pyro.plate("schools", len(y)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y, obs_mask=mask)


def subsampled(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("schools", len(y), subsample_size=4) as index:
        pyro.sample("y", dist.Normal(mu, sigma[index]), obs=y[index])


def with_param(y, sigma):
    shift = pyro.param("shift", torch.tensor(0.0))
    mu = pyro.sample("mu", dist.Normal(shift, 5.0))
    pyro.sample("y", dist.Normal(mu, sigma).to_event(1), obs=y)


def counting():
    calls = [0]

    def model(y, sigma):
        calls[0] += 1  # Python state that the graph would freeze at its traced value
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        pyro.factor("drift", 0.01 * calls[0] * mu)
        pyro.sample("y", dist.Normal(mu, sigma).to_event(1), obs=y)

    return model


PRIOR = partial(AutoFlowGuide, init="prior")  # the start does not matter here
FALLBACKS = {
    "other guide": (schools, AutoNormal, Trace_ELBO, "not an AutoFlowGuide"),
    "TraceGraph_ELBO": (schools, PRIOR, TraceGraph_ELBO, "only Trace_ELBO"),
    "RenyiELBO": (schools, PRIOR, RenyiELBO, "only Trace_ELBO"),
    "control flow": (branchy, PRIOR, Trace_ELBO, "reads tensor values in Python"),
    "dependent support": (dependent, PRIOR, Trace_ELBO, "depend on other latents"),
    "obs_mask": (imputed, PRIOR, Trace_ELBO, "imputes data"),
    "subsampling": (subsampled, PRIOR, Trace_ELBO, "subsampled"),
    "model parameters": (with_param, PRIOR, Trace_ELBO, "parameters of its own"),
    "python state": (counting(), PRIOR, Trace_ELBO, "differs from the ordinary"),
}


@pytest.mark.parametrize("model, make_guide, make_loss, reason", FALLBACKS.values(), ids=FALLBACKS)
def test_falls_back_with_the_reason(model, make_guide, make_loss, reason):
    guide = make_guide(model)
    with pytest.warns(UserWarning, match=f"fit\\(compile=...\\): .*{reason}.*ordinary SVI step"):
        result = fit(model, guide, Y, SIGMA, num_steps=3, loss=make_loss(), compile=True)
    assert not result.compiled and result.num_steps == 3


def test_bad_option():
    with pytest.raises(ValueError, match="compile='fast': use False"):
        fit(schools, AutoFlowGuide(schools), Y, SIGMA, num_steps=1, compile="fast")


# Checkpoints and the guard -------------------------------------------------------------------


def test_resume_gives_the_uninterrupted_fit(tmp_path):
    path = tmp_path / "fit.pt"
    whole = run(True, steps=40, average=0)
    run(True, steps=20, average=0, checkpoint=path)
    pyro.clear_param_store()  # resumed into a fresh guide, from the file only
    pyro.set_rng_seed(123)
    guide = AutoFlowGuide(schools, init="prior")
    result = fit(schools, guide, Y, SIGMA, num_steps=40, checkpoint=path, compile=True, average=0)
    assert result.compiled and result.losses == whole[0].losses
    for name, value in params().items():
        assert torch.equal(value, whole[1][name]), name
    # and the ordinary path goes on from a compiled fit's checkpoint
    os.replace(path, tmp_path / "copy.pt")
    run(True, steps=20, average=0, checkpoint=path)
    pyro.clear_param_store()
    result = fit(
        schools, AutoFlowGuide(schools, init="prior"), Y, SIGMA, num_steps=40, checkpoint=path
    )
    assert not result.compiled and result.num_steps == 40
    assert all(math.isfinite(x) for x in result.losses)


def cliff(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    pyro.factor("cliff", torch.where(mu > 2.0, torch.nan, 0.0))  # NaN beyond 2
    pyro.sample("y", dist.Normal(mu, sigma).to_event(1), obs=y)


def test_nonfinite_steps_are_undone():
    def go(mode):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(cliff, init="prior")
        optim = pyro.optim.Adam({"lr": 0.1})
        result = fit(cliff, guide, Y, SIGMA, num_steps=100, optim=optim, compile=mode)
        return result, params()

    found, ordinary = go(True), go(False)
    assert found[0].compiled and found[0].num_failures >= 1
    assert found[0].num_failures == ordinary[0].num_failures
    assert all(math.isfinite(x) for x in found[0].losses)
    assert_same_fit(found, ordinary, rtol=1e-4)


def test_nonfinite_error_names_the_site():
    def late(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        pyro.factor("bad", torch.where(mu > -100.0, torch.nan, 0.0))
        pyro.sample("y", dist.Normal(mu, sigma).to_event(1), obs=y)

    guide = AutoFlowGuide(late, init="prior")
    with pytest.warns(UserWarning, match="set-up of the guide failed"):
        with pytest.raises(NonFiniteLossError) as error:
            fit(late, guide, Y, SIGMA, num_steps=5, max_failures=3, compile=True)
    assert error.value.site == "bad"


@pytest.mark.slow
def test_inductor_same_fit():
    loss = Trace_ELBO(8, vectorize_particles=True, max_plate_nesting=1)
    found = run("inductor", steps=20, loss=loss)
    ordinary = run(False, steps=20, loss=loss)
    assert found[0].compiled
    assert_same_fit(found, ordinary, rtol=1e-4)


def test_an_error_of_the_model_is_the_ordinary_steps():
    def flat(y, sigma):  # does not broadcast over vectorized particles
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(mu.reshape(2).sum(), sigma).to_event(1), obs=y)

    loss = Trace_ELBO(4, vectorize_particles=True, max_plate_nesting=1)
    guide = AutoFlowGuide(flat, init="prior")
    with pytest.warns(UserWarning, match="could not be captured"):
        with pytest.raises(ValueError, match="vectoriz|broadcast"):
            fit(flat, guide, Y, SIGMA, num_steps=3, loss=loss, compile=True)
