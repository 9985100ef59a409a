"""The draws engine behind diagnose and to_inference_data (pyro_flows._draws, with
_structure and _replay): chunks of draws vectorized over a plate, checked against single-draw
runs."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDiagonalNormal

from pyro_flows import _draws
from pyro_flows._replay import per_draw, to_draws
from pyro_flows._structure import model_structure

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


def test_a_model_that_mixes_draws_is_caught():
    structure = model_structure(mixing, guide, (X,), {})
    with pytest.raises(ValueError, match="does not broadcast over draws.*pyro.plate"):
        list(_draws.chunks(mixing, guide, structure, 10, (X,), {}, vectorize=True))
    with pytest.warns(UserWarning, match="one draw at a time"):
        found = list(_draws.chunks(mixing, guide, structure, 10, (X,), {}))
    assert len(found) == 10 and not any(chunk.vectorized for chunk in found)
    one_at_a_time = list(_draws.chunks(mixing, guide, structure, 3, (X,), {}, vectorize=False))
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
