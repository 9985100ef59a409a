"""Flow-preconditioned NUTS (NeuTra) on Neal's funnel, against plain NUTS.

NUTS struggles in a funnel: one step size cannot suit both the neck and the mouth, so it
diverges in the neck and takes long trajectories in the mouth. NeuTra (Hoffman et al., 2019)
runs NUTS on the flow's base space instead: a fitted AutoFlowGuide maps standard normal noise
to (nearly) the posterior, so in that space the funnel is (nearly) a round Gaussian. Pyro does
this with ``NeuTraReparam(guide)``; nothing else changes. Run::

    python examples/neutra.py --num-steps 3000 --num-mcmc 1000

Prints, for plain NUTS and NeuTra NUTS: CPU time (one thread), divergences, the effective
sample size (ArviZ's ``ess``, bulk) of ``y`` and the lowest over all coordinates, ESS per CPU
second, and the sd of ``y`` (exactly 3); saves the draws of (x[0], y) and the trace of ``y``
to ``--output``.

Reference:
    | NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport
    | (Hoffman et al., 2019) https://arxiv.org/abs/1903.03704
"""

import time

import arviz as az
import numpy as np
import pyro
import torch
from common import parser, save
from funnel import model
from pyro import poutine
from pyro.infer import MCMC, NUTS, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam

from pyro_flows import AutoFlowGuide, diagnose, fit


def run_nuts(model, num_mcmc, dim):
    mcmc = MCMC(NUTS(model), num_samples=num_mcmc, warmup_steps=num_mcmc, disable_progbar=True)
    start = time.process_time()  # CPU time: fair on a shared machine (one thread)
    mcmc.run(dim)
    seconds = time.process_time() - start
    divergences = len(mcmc.diagnostics()["divergences"]["chain 0"])
    return mcmc.get_samples(), seconds, divergences


def ess(draws):
    """Bulk ESS (ArviZ) of y and the smallest over y and every x[i]."""
    y = np.asarray(draws["y"])
    columns = [y, *np.asarray(draws["x"]).T]
    values = [float(az.ess(np.asarray(c)[None])) for c in columns]
    return values[0], min(values)


def main(argv=None):
    p = parser(__doc__, num_steps=3000)
    p.add_argument("--num-mcmc", type=int, default=1000, help="NUTS draws (and warm-up)")
    p.add_argument("--dim", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    # 1. Fit the flow.
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = AutoFlowGuide(model, stl=True)
    start = time.perf_counter()
    result = fit(
        model,
        guide,
        args.dim,
        num_steps=args.num_steps,
        optim=pyro.optim.Adam({"lr": 0.003}),
        loss=Trace_ELBO(num_particles=8, vectorize_particles=True),
        progress_bar=False,
    )
    fit_seconds = time.perf_counter() - start
    diagnosis = diagnose(model, guide, args.dim, num_samples=args.num_samples)

    # 2. Plain NUTS on the model.
    pyro.set_rng_seed(args.seed)
    draws, seconds, divergences = run_nuts(model, args.num_mcmc, args.dim)
    runs = {"NUTS": ({k: v.numpy() for k, v in draws.items()}, seconds, divergences)}

    # 3. NUTS on the flow's base space; transform_sample maps its draws back to the model's.
    pyro.set_rng_seed(args.seed)
    neutra = NeuTraReparam(guide.requires_grad_(False))
    latent, seconds, divergences = run_nuts(
        poutine.reparam(model, config=lambda _: neutra), args.num_mcmc, args.dim
    )
    with torch.no_grad():
        draws = neutra.transform_sample(latent["y_shared_latent"])
    runs["NeuTra NUTS"] = ({k: v.numpy() for k, v in draws.items()}, seconds, divergences)

    print(f"Neal's funnel, {args.dim}-D: NUTS against NeuTra NUTS, {args.num_mcmc} draws each")
    print(f"  AutoFlowGuide: {args.num_steps} steps in {fit_seconds:.0f} s, {result}")
    print(f"  {diagnosis!r}")
    header = ("", "CPU s", "divergent", "ESS(y)", "min ESS", "ESS(y)/s", "min ESS/s", "sd(y)")
    print(f"{header[0]:14s}" + "".join(f"{h:>11s}" for h in header[1:]))
    summary = {}
    for name, (draws, seconds, divergences) in runs.items():
        ess_y, ess_min = ess(draws)
        sd = float(np.std(draws["y"]))
        values = (seconds, divergences, ess_y, ess_min, ess_y / seconds, ess_min / seconds, sd)
        print(f"{name:14s}" + "".join(f"{v:11.2f}" for v in values))
        summary[name] = dict(zip(header[1:], values, strict=True))
    print("  (exact: sd(y) = 3; fitting the flow is a one-off cost, not counted above)")

    if not args.no_figures:
        save(plot(runs), args, "neutra")
    return summary


def plot(runs):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 6), squeeze=False)
    for j, (name, (draws, seconds, divergences)) in enumerate(runs.items()):
        axes[0, j].scatter(draws["x"][:, 0], draws["y"], s=3, alpha=0.4)
        axes[0, j].set(xlim=(-30, 30), ylim=(-10, 10), xlabel="x[0]", ylabel="y")
        axes[0, j].set_title(f"{name}: {seconds:.0f} CPU s, {divergences} divergent")
        axes[1, j].plot(draws["y"], lw=0.5)
        axes[1, j].set(ylim=(-10, 10), xlabel="draw", ylabel="y")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
