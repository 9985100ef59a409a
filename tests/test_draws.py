"""The draws engine behind diagnose and to_inference_data (pyro_flows._draws, with
_structure, _replay and _vmap): chunks of draws vectorized over a plate or under
torch.func.vmap, checked against single-draw runs."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_flows import _draws
from pyro_flows._replay import per_draw, to_draws
from pyro_flows._structure import model_structure
from pyro_flows._vmap import vmapped

X = torch.tensor([0.5, -1.0, 2.0])


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, scale), obs=x)
    pyro.deterministic("twice", 2 * mu)


def guide(x):
    pyro.sample("mu", dist.Normal(0.3, 0.5))
    pyro.sample("scale", dist.LogNormal(0.1, 0.2))


def mixing(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu.mean(), scale), obs=x)  # mixes the draws


def test_structure_of_a_model_and_guide():
    structure = model_structure(model, AutoDiagonalNormal(model), (X,), {})
    kinds = {name: site.kind for name, site in structure.sites.items()}
    assert kinds == {
        "mu": "latent",
        "scale": "latent",
        "obs": "observed",
        "twice": "deterministic",
    }
    assert structure.max_plate_nesting == 1
    assert structure.sites["obs"].plates == (("data", -1, 3),)
    assert structure.chunk_size(10_000) == 10_000 and structure.chunk_size(50, 7) == 7


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_chunks_score_each_draw_as_a_single_draw_run_would(chunk_size):
    structure = model_structure(model, guide, (X,), {})
    found = list(_draws.chunks(model, guide, structure, 20, (X,), {}, chunk_size=chunk_size))
    assert [len(chunk.lp) for chunk in found] == ([20] if chunk_size is None else [7, 7, 6])
    assert all(chunk.vectorized for chunk in found)
    for chunk in found:
        for i in range(len(chunk.lp)):
            values = {name: chunk.posterior[name][i] for name in ("mu", "scale")}
            lp = poutine.trace(poutine.condition(model, values)).get_trace(X).log_prob_sum()
            log_q = dist.Normal(0.3, 0.5).log_prob(values["mu"])
            log_q = log_q + dist.LogNormal(0.1, 0.2).log_prob(values["scale"])
            torch.testing.assert_close(chunk.lp[i], lp)
            torch.testing.assert_close(chunk.log_q[i], log_q)
            torch.testing.assert_close(chunk.posterior["twice"][i], 2 * values["mu"])
        log_lik = chunk.log_likelihood["obs"]
        assert log_lik.shape == (len(chunk.lp), 3)
        expected = dist.Normal(chunk.posterior["mu"][:, None], chunk.posterior["scale"][:, None])
        torch.testing.assert_close(log_lik, expected.log_prob(X))


def test_predictive_and_prior_groups():
    structure = model_structure(model, guide, (X,), {})
    (chunk,) = _draws.chunks(model, guide, structure, 5, (X,), {}, predictive=True, prior=True)
    assert chunk.posterior_predictive["obs"].shape == (5, 3)
    assert set(chunk.prior) == {"mu", "scale", "twice"}
    assert chunk.prior_predictive["obs"].shape == (5, 3)


def test_a_model_that_mixes_draws_under_a_plate_runs_under_vmap():
    # mixing broadcasts wrongly under a plate over draws (caught by the recheck), and is
    # right under torch.func.vmap: vectorized all the same, each draw scored on its own
    structure = model_structure(mixing, guide, (X,), {})
    (chunk,) = _draws.chunks(mixing, guide, structure, 10, (X,), {}, vectorize=True)
    assert chunk.vectorized
    expected = dist.Normal(chunk.posterior["mu"][:, None], chunk.posterior["scale"][:, None])
    torch.testing.assert_close(chunk.log_likelihood["obs"], expected.log_prob(X))


def item_mixing(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", len(x)):
        # mixes the draws under a plate; .item() cannot run under torch.func.vmap
        pyro.sample("obs", dist.Normal(mu.mean() + 0 * mu.mean().item(), scale), obs=x)


def test_a_model_that_vectorizes_neither_way_runs_one_draw_at_a_time():
    structure = model_structure(item_mixing, guide, (X,), {})
    with pytest.raises(ValueError, match="'obs' differs.*does not broadcast.*vmap.*item"):
        list(_draws.chunks(item_mixing, guide, structure, 10, (X,), {}, vectorize=True))
    with pytest.warns(UserWarning, match="pyro.plate.*one draw at a time") as caught:
        found = list(_draws.chunks(item_mixing, guide, structure, 10, (X,), {}))
    assert "nn." not in str(caught[0].message)  # no torch layer to blame: the plate advice
    assert len(found) == 10 and not any(chunk.vectorized for chunk in found)
    one_at_a_time = list(
        _draws.chunks(item_mixing, guide, structure, 3, (X,), {}, vectorize=False)
    )
    assert [len(chunk.lp) for chunk in one_at_a_time] == [1, 1, 1]


def test_autoguides_auxiliary_latent_counts_in_log_q():
    # AutoDiagonalNormal samples an auxiliary latent and Delta sites: log q is the auxiliary
    # site's density minus the log-Jacobian of each constrained site.
    auto = AutoDiagonalNormal(model)
    auto(X)
    structure = model_structure(model, auto, (X,), {})
    (chunk,) = _draws.chunks(model, auto, structure, 4, (X,), {})
    loc, scale = auto.loc.detach(), auto.scale.detach()
    u = torch.stack([chunk.posterior["mu"], chunk.posterior["scale"].log()], -1)
    expected = dist.Normal(loc, scale).log_prob(u).sum(-1) - u[:, 1]  # log|d exp(u)/du| = u
    torch.testing.assert_close(chunk.log_q, expected)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ((0, None, None), ValueError, "num_samples must be at least 1"),
        ((10, 0, None), ValueError, "chunk_size must be at least 1"),
        ((10.0, None, None), TypeError, "num_samples must be an int"),
        ((10, None, "yes"), TypeError, "vectorize must be None, True or False"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        _draws.check_options(*options)


def test_per_draw_sums_and_broadcasts():
    log_prob = torch.arange(6.0).reshape(3, 1, 2)  # draws at dim -3 of a 2-plate model
    torch.testing.assert_close(per_draw(log_prob, 3, 3), torch.tensor([1.0, 5.0, 9.0]))
    # a site without the draws dimension is the same for every draw
    torch.testing.assert_close(per_draw(torch.ones(2), 3, 3), torch.full((3,), 2.0))
    assert per_draw(math.pi, 2, None).tolist() == pytest.approx([math.pi] * 2)


def test_to_draws_reshapes_to_one_row_per_draw():
    assert to_draws(torch.zeros(5, 1, 8), 5, torch.Size([8])).shape == (5, 8)
    assert to_draws(torch.zeros(()), 4, torch.Size([])).shape == (4,)


# Models written for one draw (torch.func.vmap) ---------------------------------------------

N = 30
RUGGED = torch.linspace(0.0, 6.0, N)
AFRICA = (torch.arange(N) % 3 == 0).float()
XS = torch.stack([AFRICA, RUGGED, AFRICA * RUGGED], -1)
YS = 9.0 - 0.2 * RUGGED + 0.5 * torch.sin(torch.arange(N, dtype=torch.float))


class Regression(PyroModule):
    """Pyro's Bayesian regression tutorial: its nn.Linear does not broadcast over draws."""

    def __init__(self, likelihood=dist.Normal):
        super().__init__()
        self.likelihood = likelihood
        self.linear = PyroModule[nn.Linear](3, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = pyro.deterministic("mean", self.linear(x).squeeze(-1), event_dim=1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", self.likelihood(mean, sigma), obs=y)


def regression_guide(x, y=None):
    pyro.sample("sigma", dist.Uniform(0.8, 1.2))
    pyro.sample("linear.weight", dist.Normal(torch.tensor([[0.0, -0.2, 0.1]]), 0.1).to_event(2))
    pyro.sample("linear.bias", dist.Normal(torch.tensor([9.0]), 0.3).to_event(1))


def single_draw(model, values, args):
    """The model's log-densities on one draw, in a plain (validated) run."""
    trace = poutine.trace(poutine.condition(model, values)).get_trace(*args)
    trace.compute_log_prob()
    return trace


def test_a_model_written_for_one_draw_runs_under_vmap():
    model = Regression()
    structure = model_structure(model, regression_guide, (XS, YS), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        (chunk,) = _draws.chunks(model, regression_guide, structure, 50, (XS, YS), {})
    assert chunk.vectorized and chunk.posterior["mean"].shape == (50, N)
    for i in range(50):  # every draw as a single-draw run scores it (only 2 are rechecked)
        names = ("sigma", "linear.weight", "linear.bias")
        trace = single_draw(model, {name: chunk.posterior[name][i] for name in names}, (XS, YS))
        torch.testing.assert_close(chunk.lp[i], trace.log_prob_sum())
        torch.testing.assert_close(chunk.posterior["mean"][i], trace.nodes["mean"]["value"])
        torch.testing.assert_close(chunk.log_likelihood["obs"][i], trace.nodes["obs"]["log_prob"])
        for name in structure.sites:
            torch.testing.assert_close(
                chunk.site_log_prob[name][i], trace.nodes[name]["log_prob"].sum()
            )


def test_predictive_and_prior_under_vmap_draw_each_draw_anew():
    model, n = Regression(), 1000
    structure = model_structure(model, regression_guide, (XS, YS), {})
    options = {"predictive": True, "prior": True}
    (chunk,) = _draws.chunks(model, regression_guide, structure, n, (XS, YS), {}, **options)
    assert chunk.vectorized
    predicted = chunk.posterior_predictive["obs"]
    assert predicted.shape == (n, N) and not torch.equal(predicted[0], predicted[1])
    # Drawn given each draw's own mean and sigma, the standardized residuals are N(0, 1):
    # over n * N = 30,000 of them, the mean has sd 0.006 and the sd has sd 0.004; 0.03 is
    # 5 sd or more (a predictive draw given another draw's parameters is off by ~1 sd).
    z = (predicted - chunk.posterior["mean"]) / chunk.posterior["sigma"][:, None]
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    # Prior: weight ~ N(0, 1) (3,000 values: the mean's sd is 0.018), sigma ~ U(0, 10)
    weight, sigma = chunk.prior["linear.weight"], chunk.prior["sigma"]
    assert weight.shape == (n, 1, 3) and chunk.prior_predictive["obs"].shape == (n, N)
    assert abs(weight.mean()) < 0.09 and abs(weight.std() - 1) < 0.09
    assert abs(sigma.mean() - 5) < 0.5 and 0 < sigma.min() and sigma.max() < 10


def test_samplers_that_vmap_cannot_run_fall_back_to_a_loop_for_their_group():
    # Beta draws through an autograd.Function without vmap rules: only the predictive group
    # is drawn one draw at a time; the log-densities stay vectorized, and nothing warns.
    model = Regression(lambda mean, sigma: dist.Beta(mean.abs() + 1, sigma))
    y = torch.full((N,), 0.5)
    structure = model_structure(model, regression_guide, (XS, y), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = list(
            _draws.chunks(
                model, regression_guide, structure, 6, (XS, y), {}, predictive=True, chunk_size=3
            )
        )
    assert all(chunk.vectorized for chunk in found)
    predicted = torch.cat([chunk.posterior_predictive["obs"] for chunk in found])
    assert predicted.shape == (6, N) and ((0 < predicted) & (predicted < 1)).all()


class Conv(PyroModule):
    def __init__(self):
        super().__init__()
        self.conv = PyroModule[nn.Conv1d](1, 1, 3, padding=1)
        self.conv.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 1, 3]).to_event(3))
        self.conv.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mean = self.conv(x.unsqueeze(-2)).squeeze(-2).sum(-1)
        if mean.sum().item() > 1e9:  # .item(): cannot run under torch.func.vmap either
            mean = mean + 1
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, 1.0), obs=y)


class ItemRegression(Regression):
    def forward(self, x, y=None):
        if self.linear.weight.sum().item() > 1e9:  # .item(): nor under torch.func.vmap
            raise AssertionError
        super().forward(x, y)


@pytest.mark.parametrize(
    ("model", "layer", "sites", "advice"),
    [
        (
            ItemRegression,
            "nn.Linear module 'linear'",
            "'linear.weight', 'linear.bias'",
            "(weight @ x.unsqueeze(-1)).squeeze(-1) + bias",
        ),
        (Conv, "nn.Conv1d module 'conv'", "'conv.weight', 'conv.bias'", None),
    ],
    ids=["Linear", "Conv1d"],
)
def test_the_fallback_warning_names_the_layer(model, layer, sites, advice):
    model = model()
    guide = AutoNormal(model)
    structure = model_structure(model, guide, (XS, YS), {})
    with pytest.warns(UserWarning, match="one draw at a time") as caught:
        found = list(_draws.chunks(model, guide, structure, 3, (XS, YS), {}))
    message = str(caught[0].message)
    assert layer in message and sites in message and "pyro.plate" not in message
    assert (advice in message) if advice else "broadcasts:" not in message
    assert "x @ weight.transpose(-1, -2) + bias: it runs, but mixes" in message or not advice
    assert not any(chunk.vectorized for chunk in found)


def test_functional_random_draws_differ_across_a_vmapped_batch():
    # Normal, Cauchy, Exponential and Laplace sample with in-place fills that vmap refuses;
    # turned into out-of-place draws, every row gets its own numbers, from the right law.
    loc = torch.linspace(-1.0, 1.0, 2000)

    def draw(make):
        return vmapped(lambda v: make(v["loc"])(), {"loc": loc}, len(loc), sample=True)

    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda a: dist.Normal(a, 1.0)(), randomness="different")(loc)
    for make, mean in [
        (lambda a: dist.Normal(a, 1.0), loc),
        (lambda a: dist.Laplace(a, 1.0), loc),
        (lambda a: dist.Exponential(a + 2.0), 1 / (loc + 2.0)),
    ]:
        values = draw(make)
        # 2,000 draws of sd <= 1.5: the mean residual has sd <= 0.034; 0.15 is 4.4 sd. (A
        # few float32 ties are possible: the same number for every row would be 1 value.)
        assert len(values.unique()) > 0.99 * len(loc) and abs((values - mean).mean()) < 0.15
    cauchy = draw(lambda a: dist.Cauchy(a, 1.0)) - loc
    assert abs(cauchy.median()) < 0.15  # the median of 2,000 Cauchy draws: sd 0.035
