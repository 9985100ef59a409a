"""A regression on real data: children's test scores (Gelman & Hill's kidiq).

    kid_score ~ Normal(beta[0] + beta[1] mom_hs + beta[2] mom_iq + beta[3] mom_hs mom_iq, sigma)

with a flat prior on ``beta`` and ``sigma ~ HalfCauchy(2.5)``, as in posteriordb's
``kidiq-kidscore_interaction``. ``mom_iq`` is not centred, so the coefficients are correlated
up to 0.99: a mean-field guide gets their means right and their spread far too narrow. Both
guides start at the least-squares fit (``init_to_value``), so what differs is only the shape.
Run::

    python examples/regression.py --num-steps 3000

Prints the ArviZ summary and PSIS-LOO of the flow's posterior, then the posterior sd of every
coefficient for AutoNormal, AutoFlowGuide, AutoFlowGuide with importance resampling and the
reference NUTS draws (posteriordb), and saves the marginals, a pair plot and the ELBO traces
with k-hat to ``--output``. Data: ``examples/data`` (BSD-3, see its README).
"""

import json
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from common import fit_guides, parser, plot_fits, plot_marginals, posterior, save, table
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_flows import AutoFlowGuide

DATA = Path(__file__).resolve().parent / "data"


def model(mom_hs, mom_iq, kid_score=None):
    flat = constraints.independent(constraints.real, 1)
    beta = pyro.sample("beta", dist.ImproperUniform(flat, (), (4,)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    # beta[..., k] keeps the draws' batch dimensions on the left (see docs/arviz.md).
    mean = beta[..., 0] + beta[..., 1] * mom_hs + (beta[..., 2] + beta[..., 3] * mom_hs) * mom_iq
    with pyro.plate("child", len(mom_hs)):
        pyro.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)


def load():
    data = json.loads((DATA / "kidiq.json").read_text())
    names = ("mom_hs", "mom_iq", "kid_score")
    return tuple(torch.tensor(data[k], dtype=torch.float) for k in names)


def least_squares(mom_hs, mom_iq, kid_score):
    """The least-squares coefficients and residual sd: where both guides start."""
    design = torch.stack([torch.ones_like(mom_hs), mom_hs, mom_iq, mom_hs * mom_iq], -1)
    beta = torch.linalg.lstsq(design, kid_score.unsqueeze(-1)).solution.squeeze(-1)
    return {"beta": beta, "sigma": (kid_score - design @ beta).std()}


def main(argv=None):
    p = parser(__doc__, num_steps=3000)
    p.add_argument("--num-particles", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    data = load()
    init = init_to_value(values=least_squares(*data))
    guides = {
        "AutoNormal": lambda: AutoNormal(model, init_loc_fn=init),
        "AutoFlowGuide": lambda: AutoFlowGuide(model, init_loc_fn=init, stl=True),
    }
    results, diagnoses, idatas = fit_guides(model, guides, args, *data, lr=0.01)
    draws = {name: posterior(idata, ("beta", "sigma")) for name, idata in idatas.items()}
    resampled = diagnoses["AutoFlowGuide"].resample()
    draws["AutoFlowGuide + PSIS"] = {k: v.numpy() for k, v in resampled.items()}
    reference = np.load(DATA / "kidiq_reference.npz")
    draws["NUTS (posteriordb)"] = {k: reference[k] for k in ("beta", "sigma")}

    print(f"kidiq regression, {args.num_steps} steps, {args.num_particles} particles")
    print("AutoFlowGuide posterior (ArviZ):")
    print(az.summary(idatas["AutoFlowGuide"], var_names=["beta", "sigma"], kind="stats"))
    print(az.loo(idatas["AutoFlowGuide"]))
    for name, d in diagnoses.items():
        print(f"{name}: ELBO {d.elbo:.2f}, k-hat {d.khat:.2f} ({d.verdict})")
    names = [f"beta[{k}]" for k in range(4)] + ["sigma"]
    print(table(draws, names))

    if not args.no_figures:
        save(plot_marginals(draws, names, "kidiq regression"), args, "regression_marginals")
        save(pair(draws), args, "regression_pair")
        save(plot_fits(results, diagnoses, "kidiq regression"), args, "regression_fit")
    return {
        name: {"sd": np.asarray(d["beta"]).std(0).tolist(), "mean": d["beta"].mean(0).tolist()}
        for name, d in draws.items()
    }


def pair(draws):
    """beta[2] against beta[3] (correlation 0.99 in the posterior) for each method."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(draws), figsize=(3.3 * len(draws), 3.2), sharex=True)
    fig.subplots_adjust(wspace=0.05)
    for ax, (name, d) in zip(axes, draws.items(), strict=True):
        beta = np.asarray(d["beta"])[:2000]
        ax.scatter(beta[:, 2], beta[:, 3], s=2, alpha=0.3)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("beta[2] (mom_iq)")
        ax.set_yticks([])
    axes[0].set_ylabel("beta[3] (interaction)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
