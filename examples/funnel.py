"""Neal's funnel: where a mean-field guide cannot follow the posterior's shape.

    y ~ Normal(0, 3),    x[i] | y ~ Normal(0, exp(y / 2)),    i = 1..9

The scale of ``x`` spans exp(+-4.5) across the range of ``y``: a neck and a mouth that no
product of independent normals can cover. The exact posterior is the prior (there is no data),
so the guides are compared with exact draws. Run::

    python examples/funnel.py --num-steps 3000

Prints both guides' ELBO, k-hat and the sd of ``y`` (exactly 3), and saves the marginals, the
(y, x[0]) scatter, and the ELBO traces with k-hat to ``--output``.
"""

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from common import fit_guides, parser, plot_fits, plot_marginals, posterior, save, table
from pyro.infer.autoguide import AutoNormal

from pyro_flows import AutoFlowGuide


def model(dim=10):
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    scale = torch.exp(y / 2).unsqueeze(-1)
    pyro.sample("x", dist.Normal(0.0, scale).expand(scale.shape[:-1] + (dim - 1,)).to_event(1))


def exact_draws(num_samples, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, 3.0, num_samples)
    x = rng.normal(size=(num_samples, dim - 1)) * np.exp(y / 2)[:, None]
    return {"y": y, "x": x}


def main(argv=None):
    p = parser(__doc__, num_steps=3000)
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--num-particles", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    guides = {
        "AutoNormal": lambda: AutoNormal(model),
        "AutoFlowGuide": lambda: AutoFlowGuide(model, stl=True),
    }
    results, diagnoses, idatas = fit_guides(model, guides, args, args.dim)
    draws = {name: posterior(idata, ("y", "x")) for name, idata in idatas.items()}
    draws["exact"] = exact_draws(args.num_samples, args.dim, args.seed)

    print(f"Neal's funnel, {args.dim}-D, {args.num_steps} steps, {args.num_particles} particles")
    print(f"{'':14s}{'ELBO':>9s}{'k-hat':>8s}{'sd(y)':>8s}  verdict   (exact: ELBO 0, sd(y) 3)")
    for name, d in diagnoses.items():
        sd = draws[name]["y"].std()
        print(f"{name:14s}{d.elbo:9.3f}{d.khat:8.2f}{sd:8.2f}  {d.verdict}")
    print(table(draws, ["y", "x[0]", "x[1]"]))

    if not args.no_figures:
        save(plot_marginals(draws, ["y", "x[0]"], "Neal's funnel"), args, "funnel_marginals")
        save(scatter(draws), args, "funnel_scatter")
        save(plot_fits(results, diagnoses, "Neal's funnel"), args, "funnel_fit")
    return {
        name: {"elbo": d.elbo, "khat": d.khat, "sd_y": float(draws[name]["y"].std())}
        for name, d in diagnoses.items()
    }


def scatter(draws):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(draws), figsize=(4 * len(draws), 3.5), sharey=True)
    for ax, (name, d) in zip(axes, draws.items(), strict=True):
        ax.scatter(d["x"][:2000, 0], d["y"][:2000], s=2, alpha=0.3)
        ax.set_title(name)
        ax.set_xlim(-30, 30)
        ax.set_xlabel("x[0]")
    axes[0].set_ylabel("y")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
