"""Local latents in subsampled plates: AutoFlowGuide's per-element guide for them, its ELBO
under subsampling, its checks, and diagnostics on the whole data."""

import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_flows import AutoFlowGuide, diagnose, fit, to_inference_data
from pyro_flows._local import LOCAL_KINDS

SEED = int(os.environ.get("PYRO_FLOWS_SEED", "0"))  # see conftest.py
G = 20
Y = torch.randn(G, generator=torch.Generator().manual_seed(1)) + 2.0


def model(y, batch=None):
    # mu ~ N(0, 3^2), e_g ~ N(0, 1), y_g ~ N(mu + e_g, 0.5^2): a Gaussian posterior.
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("groups", G, subsample_size=batch) as i:
        e = pyro.sample("e", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + e, 0.5), obs=y[i])


def exact_posterior(y):
    # Precision of (mu, e_1..e_G), from the joint's quadratic form.
    n = len(y)
    precision = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    precision[0, 0] = 1 / 9 + n / 0.25
    precision[0, 1:] = precision[1:, 0] = 1 / 0.25
    precision[1:, 1:] = torch.eye(n, dtype=torch.float64) * (1 + 1 / 0.25)
    covariance = torch.linalg.inv(precision)
    b = torch.cat([y.sum().reshape(1), y]).double() / 0.25
    return covariance @ b, covariance


def guide_for(**options):
    return AutoFlowGuide(model, init="prior", hidden_features=(16,), **options)


def test_local_sites_have_one_guide_per_element_of_the_full_plate():
    guide = guide_for()
    trace = pyro.poutine.trace(guide).get_trace(Y, 5)
    assert trace.nodes["e"]["value"].shape == (5,)  # the subsample
    assert guide.latent_dim == 1  # the flow is on the global mu only
    assert guide.local_locs.e.shape == (G,) and guide.median(Y, 5)["e"].shape == (G,)
    quantiles = guide.quantiles([0.1, 0.9], Y, 5)
    assert quantiles["e"].shape == (2, G) and (quantiles["e"][0] < quantiles["e"][1]).all()


def test_the_subsampled_elbo_is_unbiased():
    # With the guide fixed, the mean loss over subsamples equals the whole data's: each local
    # site's and each observation's log-density is scaled by G / batch in both model and guide.
    torch.set_default_dtype(torch.float64)
    guide = guide_for()
    guide(Y, 5)
    with torch.no_grad():
        guide.local_locs.e.copy_(torch.linspace(-1.0, 1.0, G))
    elbo = Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1)
    full = torch.tensor([elbo.loss(model, guide, Y, None) for _ in range(20)])
    subsampled = torch.tensor([elbo.loss(model, guide, Y, 5) for _ in range(400)])
    # Each mean has the standard error of its draws; 4 of them (both) bound a correct estimator.
    se = (full.var() / len(full) + subsampled.var() / len(subsampled)).sqrt()
    assert abs(full.mean() - subsampled.mean()) < 4 * se, (full.mean(), subsampled.mean(), se)


@pytest.mark.parametrize("local", ["mean_field", "structured"])
def test_minibatch_fit_recovers_the_exact_means(local):
    # For a Gaussian posterior the best mean-field Gaussian has the exact means (and the
    # structured guide can be exact); 3,000 minibatch steps of 10 of 20 groups, the parameters
    # averaged over the last 20%.
    torch.set_default_dtype(torch.float64)
    mean, covariance = exact_posterior(Y)
    guide = guide_for(local=local)
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    fit(model, guide, Y, 10, num_steps=3000, loss=loss)
    median = guide.median(Y, None)
    sd = covariance.diagonal().sqrt()
    # Errors of the averaged iterates, measured over seeds 0-4 (in sds): mean-field mu
    # 0.004-0.077, the worst e 0.013-0.046; structured mu 0.006-0.115, e 0.064-0.105 (the
    # median of its local sites is a Monte Carlo estimate, 0.02 sd of error). Bound: 0.2 sd.
    assert abs(median["mu"] - mean[0]) / sd[0] < 0.2
    assert ((median["e"] - mean[1:]).abs() / sd[1:]).max() < 0.2


def test_diagnostics_on_the_whole_data_after_minibatch_steps():
    guide = guide_for()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(50):
        svi.step(Y, 5)
    # batch=None: the guide's plates follow the model's (no subsample), not the set-up's.
    diagnosis = diagnose(model, guide, Y, None, num_samples=200)
    assert math.isfinite(diagnosis.elbo)
    assert diagnosis.samples["e"].shape == (200, G)
    idata = to_inference_data(guide, Y, None, num_samples=50)
    assert idata.posterior["e"].shape == (1, 50, G)
    # and back to minibatches
    assert math.isfinite(svi.step(Y, 5))


def test_create_plates_as_in_autonormal():
    def create_plates(y, batch=None):
        return pyro.plate("groups", G, subsample_size=batch)

    guide = guide_for(create_plates=create_plates)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(Y, 5))
    trace = pyro.poutine.trace(guide).get_trace(Y, None)
    assert trace.nodes["e"]["value"].shape == (G,)


def test_state_dict_into_a_fresh_guide():
    guide = guide_for()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(20):
        svi.step(Y, 5)
    state = {k: v.clone() for k, v in guide.state_dict().items()}
    pyro.clear_param_store()
    fresh = guide_for()
    fresh.load_state_dict(state)  # the local values wait for the set-up
    fresh(Y, 5)
    torch.testing.assert_close(fresh.local_locs.e, guide.local_locs.e)
    torch.testing.assert_close(fresh.median(Y, 5)["e"], guide.median(Y, 5)["e"])


def test_errors():
    def all_local(y, batch=None):
        with pyro.plate("groups", G, subsample_size=batch) as i:
            e = pyro.sample("e", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(e, 0.5), obs=y[i])

    with pytest.raises(ValueError, match=r"Every latent site of the model \(e\).*AutoNormal"):
        AutoFlowGuide(all_local, init="prior")(Y, 5)

    def wrong_shape(y, batch=None, size=3):
        pyro.sample("mu", dist.Normal(0.0, 3.0))
        with pyro.plate("groups", G, subsample_size=batch):
            pyro.sample("e", dist.Normal(0.0, 1.0).expand([size]))

    # Pyro's own check names the plate and the site.
    with pytest.raises(ValueError, match=r"plate\('groups'\) at site e dim -1, 5 vs 3"):
        AutoFlowGuide(wrong_shape, init="prior")(Y, 5)
    pyro.clear_param_store()

    def moving(y, batch=None):
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        with pyro.plate("groups", G, subsample_size=batch):
            pyro.sample("e", dist.Uniform(0.0, tau))

    with pytest.raises(NotImplementedError, match="Local latent site 'e'.*depends on other"):
        AutoFlowGuide(moving, init="prior")(Y, 5)

    def sized(y, batch=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        with pyro.plate("groups", len(y), subsample_size=batch) as i:
            e = pyro.sample("e", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + e, 0.5), obs=y[i])

    pyro.clear_param_store()
    guide = AutoFlowGuide(sized, init="prior")
    guide(Y, 5)
    with pytest.raises(ValueError, match=r"Plate 'groups' of local latent site 'e' had 20 .*40"):
        guide(torch.cat([Y, Y]), 5)

    def indexed(y, index):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        with pyro.plate("groups", len(y), subsample=index) as i:
            e = pyro.sample("e", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + e, 0.5), obs=y[i.clamp(0, len(y) - 1)])

    def plates_for(y, index):
        return pyro.plate("groups", len(y), subsample=index)

    pyro.clear_param_store()
    guide = AutoFlowGuide(indexed, init="prior", create_plates=plates_for)
    guide(Y, torch.arange(5))
    for index, problem in [
        (torch.tensor([3, G]), rf"from 3 to {G}"),
        (torch.tensor([-1, 2]), "from -1 to 2"),
        (torch.tensor([1.0, 2.0]), "of dtype torch.float32"),
        (torch.tensor([[1, 2]]), r"of shape \(1, 2\)"),
    ]:
        with pytest.raises(ValueError, match=rf"Plate 'groups' .*indices {problem}: .*\[0, {G}\)"):
            guide(Y, index)

    with pytest.raises(ValueError, match="local='joint': use one of"):
        AutoFlowGuide(model, local="joint")


def test_a_full_size_subsample_in_another_order_is_indexed():
    # Pyro indexes parameters by a plate's subsample only where it is smaller than the plate:
    # a shuffled batch holding every element is indexed by the guide itself.
    def shuffled(y, index):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        with pyro.plate("groups", len(y), subsample=index) as i:
            e = pyro.sample("e", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + e, 0.5), obs=y[i])

    def plates_for(y, index):
        return pyro.plate("groups", len(y), subsample=index)

    for local in LOCAL_KINDS:
        pyro.clear_param_store()
        guide = AutoFlowGuide(shuffled, init="prior", local=local, create_plates=plates_for)
        guide(Y, torch.arange(5))
        with torch.no_grad():
            guide.local_locs.e = torch.arange(float(G))  # element j's location is j
        for index in [torch.randperm(G), torch.arange(G), torch.tensor([4, 1])]:
            trace = poutine.trace(guide).get_trace(Y, index)
            fn = trace.nodes["e_unconstrained"]["fn"]
            loc = getattr(fn, "base_dist", fn).loc
            if local == "structured":  # the weights start at zero
                assert torch.count_nonzero(guide.local_weights.e) == 0
            torch.testing.assert_close(loc.detach(), index.float())


# An amortized local guide (local_guide=) -----------------------------------------------------

ROWS = 200
ROW_Y = 1.5 + 1.2 * torch.randn(ROWS, generator=torch.Generator().manual_seed(2))


def rows_model(index, y):
    # z_i | mu, y_i ~ N((mu + 4 y_i) / 5, 1 / 5): the mean-field optimum is linear in y_i.
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("rows", ROWS, subsample=index):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(z, 0.5), obs=y)


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 2)

    def forward(self, index, y):
        h = self.linear(y.unsqueeze(-1))
        return {"z": (h[..., 0], torch.nn.functional.softplus(h[..., 1]))}


def test_amortized_local_guide_fits_the_rows():
    guide = AutoFlowGuide(rows_model, init="prior", local_guide=Encoder())
    svi = SVI(rows_model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO(num_particles=4))
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(3000):
        index = torch.randperm(ROWS, generator=generator)[:20]
        svi.step(index, ROW_Y[index])
    everything = torch.arange(ROWS)
    with torch.no_grad():
        loc, scale = guide.local_guide(everything, ROW_Y)["z"]
    mu = guide.median(everything, ROW_Y)["mu"]
    # The mean-field optimum: q(z_i) = N((E[mu] + 4 y_i) / 5, 1 / 5) exactly.
    exact = (mu + 4 * ROW_Y) / 5
    sd = 0.2**0.5
    assert (loc - exact).abs().max() < 0.1 * sd, (loc - exact).abs().max()
    assert (scale / sd - 1).abs().max() < 0.1, scale
    # mu: its exact posterior (y_i ~ N(mu, 1.25) given mu), within 3 posterior sds
    precision = 1 / 9 + ROWS / 1.25
    assert abs(mu - ROW_Y.sum() / 1.25 / precision) < 3 * precision**-0.5
    quantiles = guide.quantiles([0.5], everything, ROW_Y)["z"]
    torch.testing.assert_close(quantiles[0], loc)


def test_amortized_local_guide_errors():
    with pytest.raises(TypeError, match="local_guide must be a torch.nn.Module"):
        AutoFlowGuide(rows_model, local_guide=lambda index, y: {})
    with pytest.raises(ValueError, match="local='structured' with local_guide"):
        AutoFlowGuide(rows_model, local="structured", local_guide=Encoder())
    with pytest.raises(ValueError, match="no latent site inside a subsampled plate"):
        AutoFlowGuide(model, init="prior", local_guide=Encoder())(Y, None)

    class Wrong(torch.nn.Module):
        def __init__(self, output):
            super().__init__()
            self.output, self.w = output, torch.nn.Parameter(torch.zeros(()))

        def forward(self, index, y):
            return self.output(y + self.w)

    index = torch.arange(5)
    wrong_keys = Wrong(lambda y: {"e": (y, y.exp())})
    with pytest.raises(ValueError, match=r"returned \['e'\].*\['z'\]"):
        AutoFlowGuide(rows_model, init="prior", local_guide=wrong_keys)(index, ROW_Y[index])
    pyro.clear_param_store()
    wrong_shape = Wrong(lambda y: {"z": (y[:2], y[:2].exp())})
    with pytest.raises(ValueError, match=r"site 'z': give a \(loc, scale\) pair .* shape \(5,\)"):
        AutoFlowGuide(rows_model, init="prior", local_guide=wrong_shape)(index, ROW_Y[index])
