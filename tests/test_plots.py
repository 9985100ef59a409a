"""The plots of a fit's ELBO trace and of a diagnosis' k-hat."""

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_flows import Diagnosis, FitResult, diagnose, fit
from pyro_flows.plots import plot_elbo, plot_khat

X = torch.tensor([1.3, 0.4, 2.1, 1.7, 0.9, 1.1, 0.2, 1.8])


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def exact_guide(x):
    # the exact posterior of `model`: N(sum(x) / (1 + n), 1 / (1 + n))
    n = len(x)
    pyro.sample("mu", dist.Normal(x.sum() / (1 + n), (1 / (1 + n)) ** 0.5))


def test_plots():
    result = fit(model, AutoNormal(model), X, num_steps=50)
    assert result.plot().get_ylabel() == "ELBO"
    d = diagnose(model, exact_guide, X, num_samples=100)
    ax = d.plot()
    assert ax.get_xlabel() == "Pareto k-hat" and ax.get_title().startswith("trust")
    heavy = -0.9 * torch.log(torch.rand(1000, generator=torch.Generator().manual_seed(1)))
    heavy_diagnosis = Diagnosis.from_log_weights(heavy, {})
    assert plot_khat(heavy_diagnosis).get_title().startswith(heavy_diagnosis.verdict)
    plot_elbo(FitResult(losses=[1.0]))
    plt.close("all")
