"""Eight schools: AutoNormal against AutoFlowGuide, side by side.

The hierarchical model of Rubin (1981), non-centred. The only change between the two fits is
the guide: ``AutoNormal(model)`` becomes ``AutoFlowGuide(model)``. Run::

    python examples/eight_schools.py --num-steps 2000

Prints both posteriors beside the reference NUTS posterior of posteriordb (2,000 draws,
bundled in ``examples/data``; BSD-3, see its README), and saves the marginals of ``mu``,
``tau`` and two schools' ``theta`` and the ELBO traces to ``--output`` (default ``figures/``).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_flows import AutoFlowGuide, FitResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_marginals, save  # noqa: E402

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
REFERENCE = Path(__file__).resolve().parent / "data" / "eight_schools_reference.npz"


def model(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def fit(guide, num_steps, lr, num_particles):
    # max_plate_nesting: the model's one plate. Without it Pyro guesses it from a first run and
    # logs "Guessed max_plate_nesting = 2" (the particles' plate is the second).
    elbo = Trace_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=1,
    )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo)
    start = time.perf_counter()
    losses = [svi.step(SIGMA, Y) for _ in range(num_steps)]
    return losses, time.perf_counter() - start


def summarize(draws):
    """Mean, sd and 5%/95% quantiles of every scalar parameter."""
    rows = {}
    for name in ("mu", "tau", "theta"):
        values = np.asarray(draws[name]).reshape(len(draws[name]), -1)
        for j in range(values.shape[1]):
            label = name if values.shape[1] == 1 else f"{name}[{j}]"
            v = values[:, j]
            rows[label] = (v.mean(), v.std(), *np.quantile(v, [0.05, 0.95]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=3000)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--num-particles", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--flow", default="iaf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="figures", help="folder for the figures")
    parser.add_argument("--no-figures", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    summaries, notes, samples, traces = {}, {}, {}, {}
    for name, make_guide in {
        "AutoNormal": lambda: AutoNormal(model),
        "AutoFlowGuide": lambda: AutoFlowGuide(model, flow=args.flow),
    }.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = make_guide()
        losses, seconds = fit(guide, args.num_steps, args.lr, args.num_particles)
        predictive = Predictive(model, guide=guide, num_samples=args.num_samples)
        with torch.no_grad():
            draws = {k: v.squeeze(-2) for k, v in predictive(SIGMA).items() if k != "y"}
        summaries[name] = summarize(draws)
        notes[name] = f"final loss {losses[-1]:.2f}, {seconds:.1f} s"
        samples[name], traces[name] = draws, FitResult(losses=losses)
    reference = np.load(REFERENCE)
    samples["NUTS (posteriordb)"] = {k: reference[k] for k in ("mu", "tau", "theta")}
    summaries["NUTS (posteriordb)"] = summarize(samples["NUTS (posteriordb)"])

    print(f"Eight schools, {args.num_steps} steps, {args.num_particles} particles, lr {args.lr}")
    for name, note in notes.items():
        print(f"  {name}: {note}")
    source = f"examples/data/{REFERENCE.name}"
    print(f"  NUTS (posteriordb): {len(reference['mu'])} reference draws from {source}")
    header = f"{'':10s}" + "".join(f"{name:>34s}" for name in summaries)
    print(header)
    print(f"{'':10s}" + "".join(f"{'mean    sd     5%    95%':>34s}" for _ in summaries))
    for row in summaries["AutoNormal"]:
        cells = "".join(
            "{:>34s}".format("{:6.2f} {:5.2f} {:6.2f} {:6.2f}".format(*summary[row]))
            for summary in summaries.values()
        )
        print(f"{row:10s}{cells}")
    if not args.no_figures:
        names = ["mu", "tau", "theta[0]", "theta[2]"]
        save(plot_marginals(samples, names, "Eight schools"), args, "eight_schools_marginals")
        save(plot_traces(traces), args, "eight_schools_elbo")
    return {name: {k: list(map(float, v)) for k, v in s.items()} for name, s in summaries.items()}


def plot_traces(traces):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 3), sharey=True)
    for ax, (name, result) in zip(axes, traces.items(), strict=True):
        result.plot(ax=ax)
        ax.set_title(f"{name}: ELBO {result.elbo():.2f}")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
