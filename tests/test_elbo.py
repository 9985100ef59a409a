"""VmapTrace_ELBO (pyro_flows.elbo) and fit's checks of vectorized particles (pyro_flows._loop
with pyro_flows._vmap): models that do not broadcast over particles, such as Pyro's Bayesian
regression tutorial with PyroModule[nn.Linear] and PyroSample weights."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch import nn

from pyro_flows import AutoFlowGuide, VmapTrace_ELBO, fit

N = 40
RUGGED = torch.linspace(0.0, 6.0, N)
AFRICA = (torch.arange(N) % 3 == 0).float()
X = torch.stack([AFRICA, RUGGED, AFRICA * RUGGED], -1)
Y = 9.0 - 0.2 * RUGGED + 0.5 * torch.sin(torch.arange(N, dtype=torch.float))


class Regression(PyroModule):
    """Pyro's Bayesian regression tutorial: does not broadcast over particles."""

    def __init__(self):
        super().__init__()
        self.linear = PyroModule[nn.Linear](3, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def mean(self, x):
        return self.linear(x).squeeze(-1)

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.mean(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


class Broadcasting(Regression):
    """The same model, its layer written so that it broadcasts over particles."""

    def mean(self, x):
        weight, bias = self.linear.weight, self.linear.bias
        return ((weight @ x.unsqueeze(-1)).squeeze(-1) + bias).squeeze(-1)


class Mixing(Regression):
    """The rewrite that runs under a plate over particles but mixes them."""

    def mean(self, x):
        return (x @ self.linear.weight.transpose(-1, -2) + self.linear.bias).squeeze(-1)


GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoFlowGuide": lambda model: AutoFlowGuide(model, hidden_features=(8,)),
    "AutoFlowGuide-stl": lambda model: AutoFlowGuide(model, hidden_features=(8,), stl=True),
    "AutoFlowGuide-nsf_coupling-stl": lambda model: AutoFlowGuide(
        model, flow="nsf_coupling", hidden_features=(8,), stl=True
    ),
}


def loss_and_grads(elbo, model, guide, seed=1):
    """One loss_and_grads from a fixed seed; returns the loss and every parameter's grad."""
    store = pyro.get_param_store()
    for _, param in store.named_parameters():
        param.grad = None
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(model, guide, X, Y)
    return loss, {name: param.grad.clone() for name, param in store.named_parameters()}


def assert_same(found, expected):
    # float32 sums of the same terms in another order (over 40 points and 8 particles):
    # relative differences of a few 1e-7 were measured; 1e-5 leaves room, and any mix-up of
    # particles or a missing term changes the loss by more than 1e-2 relative.
    (loss, grads), (expected_loss, expected_grads) = found, expected
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        scale = expected_grads[name].abs().max()
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("make_guide", GUIDES.values(), ids=GUIDES.keys())
def test_same_as_vectorized_trace_elbo_on_the_broadcasting_rewrite(make_guide):
    # Same seed, same guide: the guide's particles are the same draws, and the model written
    # for one draw under vmap must give the loss and gradients of the broadcasting rewrite.
    guide = make_guide(Regression())
    guide(X, Y)
    found = loss_and_grads(VmapTrace_ELBO(num_particles=8), Regression(), guide)
    vectorized = Trace_ELBO(num_particles=8, vectorize_particles=True)
    assert_same(found, loss_and_grads(vectorized, Broadcasting(), guide))


class FixedNoise:
    """Replaces torch.randn (the flow's base draws) by rows of a fixed table, for the same
    particles in one vectorized call as in one call per particle."""

    def __init__(self, table):
        self.table, self.calls, self.randn = table, 0, torch.randn

    def __call__(self, *shape, **kwargs):
        shape = torch.Size(
            shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        )
        if math.prod(shape) == self.table.numel():
            return self.table.reshape(shape).to(**kwargs)
        self.calls += 1
        return self.table[self.calls - 1].reshape(shape).to(**kwargs)


@pytest.mark.parametrize("stl", [False, True], ids=["plain", "stl"])
def test_same_as_looped_trace_elbo_on_the_same_draws(monkeypatch, stl):
    model = Regression()
    guide = AutoFlowGuide(model, hidden_features=(8,), stl=stl)
    guide(X, Y)
    noise = FixedNoise(torch.randn(8, guide.latent_dim))
    monkeypatch.setattr(torch, "randn", noise)
    found = loss_and_grads(VmapTrace_ELBO(num_particles=8), model, guide)
    noise.calls = 0  # (the first call of VmapTrace_ELBO draws one particle to set itself up)
    looped = loss_and_grads(Trace_ELBO(num_particles=8), model, guide)
    assert noise.calls == 8  # each looped particle took its own row
    assert_same(found, looped)


def test_differentiable_loss_has_the_same_gradient():
    model, elbo = Regression(), VmapTrace_ELBO(num_particles=4)
    guide = AutoNormal(model)
    elbo.loss(model, guide, X, Y)  # sets the guide and the ELBO up
    loss, grads = loss_and_grads(elbo, model, guide)
    pyro.set_rng_seed(1)
    differentiable = elbo.differentiable_loss(model, guide, X, Y)
    params = [param for _, param in pyro.get_param_store().named_parameters()]
    found = torch.autograd.grad(differentiable, params)
    assert differentiable.item() == pytest.approx(loss, rel=1e-6)
    for grad, expected in zip(found, grads.values(), strict=True):
        torch.testing.assert_close(grad, expected)
    pyro.set_rng_seed(1)
    assert elbo.loss(model, guide, X, Y) == pytest.approx(loss, rel=1e-6)


def test_model_parameters_and_subsampled_plates():
    # A pyro.param of the model gets its gradient through vmap; a subsampled plate's
    # indices, drawn by the guide, reach the model (else the local latents would not match).
    def model(y):
        shift = pyro.param("shift", torch.tensor(0.5))
        scale = pyro.param("scale", torch.tensor(1.5), constraint=dist.constraints.positive)
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(y), subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(mu + shift, scale))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y[idx])

    def guide(y):
        loc = pyro.param("loc", torch.zeros(len(y)))
        mu_loc = pyro.param("mu_loc", torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(mu_loc, 1.0))
        with pyro.plate("data", len(y), subsample_size=10) as idx:
            pyro.sample("z", dist.Normal(loc[idx], 1.0))

    y = torch.linspace(-2.0, 2.0, 30)
    results = []
    for elbo in (VmapTrace_ELBO(num_particles=6), Trace_ELBO(6, vectorize_particles=True)):
        pyro.set_rng_seed(3)
        for _, param in pyro.get_param_store().named_parameters():
            param.grad = None
        loss = elbo.loss_and_grads(model, guide, y)
        store = pyro.get_param_store()
        results.append((loss, {name: p.grad.clone() for name, p in store.named_parameters()}))
    assert results[0][1]["shift"].abs() > 0
    assert_same(*results)


def test_fit_runs_the_tutorial_model_with_vectorized_particles():
    model = Regression()
    guide = AutoFlowGuide(model, hidden_features=(8,), stl=True)
    loss = VmapTrace_ELBO(num_particles=8)
    result = fit(model, guide, X, Y, num_steps=60, loss=loss, optim=pyro.optim.Adam({"lr": 0.05}))
    assert result.num_failures == 0 and all(map(math.isfinite, result.losses))
    assert sum(result.losses[-10:]) < sum(result.losses[:10])


def test_fit_explains_a_model_that_does_not_broadcast_over_particles():
    model = Regression()
    loss = Trace_ELBO(num_particles=8, vectorize_particles=True)
    with pytest.raises(ValueError, match="does not broadcast over the particles") as caught:
        fit(model, AutoFlowGuide(model, stl=True), X, Y, num_steps=5, loss=loss)
    message = str(caught.value)
    assert "nn.Linear module 'linear'" in message and "'linear.weight', 'linear.bias'" in message
    assert "loss=pyro_flows.VmapTrace_ELBO(num_particles=8)" in message
    assert "(weight @ x.unsqueeze(-1)).squeeze(-1) + bias" in message
    assert "vectorize_particles=False" in message
    assert isinstance(caught.value.__cause__, RuntimeError)  # the original error, chained


def test_fit_catches_a_rewrite_that_mixes_the_particles():
    model = Mixing()
    loss = Trace_ELBO(num_particles=8, vectorize_particles=True)
    with pytest.raises(ValueError, match="site 'obs'.*mixes the particles.*VmapTrace_ELBO"):
        fit(model, AutoNormal(model), X, Y, num_steps=5, loss=loss)


def test_fit_leaves_other_errors_alone():
    def model(x, y):
        raise RuntimeError("a bug of the model's own")

    loss = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=2)
    with pytest.raises(RuntimeError, match="own"):
        fit(model, lambda x, y: None, X, Y, num_steps=2, loss=loss)


def test_fit_of_a_broadcasting_model_is_unchanged_by_the_check():
    # The one-time check draws from a forked random stream: the same fit as plain SVI.
    def run(with_fit):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, loss = Broadcasting(), Trace_ELBO(num_particles=4, vectorize_particles=True)
        guide, optim = AutoNormal(model), pyro.optim.Adam({"lr": 0.02})
        if with_fit:
            return fit(model, guide, X, Y, num_steps=10, optim=optim, loss=loss).losses
        svi = pyro.infer.SVI(model, guide, optim, loss)
        return [svi.step(X, Y) for _ in range(10)]

    assert run(True) == run(False)


def test_what_is_not_supported():
    def discrete(y):
        rate = pyro.sample("rate", dist.Poisson(3.0))
        pyro.sample("obs", dist.Normal(rate, 1.0), obs=y)

    def discrete_guide(y):
        pyro.sample("rate", dist.Poisson(pyro.param("r", torch.tensor(3.0))))

    elbo = VmapTrace_ELBO(num_particles=2)
    with pytest.raises(NotImplementedError, match=r"reparameterized.*'rate' \(Poisson\)"):
        elbo.loss(discrete, discrete_guide, torch.tensor(1.0))

    def enumerated_guide(y):
        probs = pyro.param("p", torch.tensor(0.5))
        pyro.sample("rate", dist.Bernoulli(probs), infer={"enumerate": "parallel"})

    with pytest.raises(NotImplementedError, match="'rate'.*TraceEnum_ELBO"):
        VmapTrace_ELBO(num_particles=2).loss(discrete, enumerated_guide, torch.tensor(1.0))

    def item(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu.item(), 1.0), obs=y)

    with pytest.raises(NotImplementedError, match=r"torch.func.vmap.*\.item\(\)"):
        VmapTrace_ELBO(num_particles=2).loss(item, AutoNormal(item), torch.tensor(1.0))

    def half_guided(y):
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide_a(y):
        pyro.sample("a", dist.Normal(pyro.param("a_loc", torch.tensor(0.0)), 1.0))

    with pytest.raises(NotImplementedError, match="latent site 'b' is not in the guide"):
        with pyro.validation_enabled(False):  # Pyro would warn about 'b' first
            VmapTrace_ELBO(num_particles=2).loss(half_guided, guide_a, None)
    with pytest.raises(TypeError, match="always vectorizes"):
        VmapTrace_ELBO(num_particles=2, vectorize_particles=False)


def test_model_parameters_of_a_pyro_module():
    # nn.Parameters of a PyroModule become pyro.params: created before vmap, trained through it
    class Scaled(Regression):
        def __init__(self):
            super().__init__()
            self.log_scale = PyroParam(torch.tensor(0.0))

        def mean(self, x):
            return self.linear(x).squeeze(-1) * self.log_scale.exp()

    model = Scaled()
    guide = AutoNormal(model)
    _, grads = loss_and_grads(VmapTrace_ELBO(num_particles=4), model, guide)
    assert grads["log_scale"].abs() > 0
