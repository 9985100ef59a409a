"""A hierarchical regression: varying intercepts and slopes across groups.

    mu_a, mu_b ~ Normal(0, 5),    tau_a, tau_b, sigma ~ HalfNormal(2)
    a[j] ~ Normal(mu_a, tau_a),   b[j] ~ Normal(mu_b, tau_b),       j = 1..10 groups
    y[i] ~ Normal(a[g[i]] + b[g[i]] x[i], sigma)

on simulated data with 2 to 6 observations per group and groups that differ little, so the
data leave the group scales ``tau`` uncertain down to 0. Written the way most people first
write it (centred, the default here), the posterior is a funnel: the spread of ``a`` shrinks
with ``tau_a``. Both guides miss its neck (small ``tau``), and ``diagnose`` says so (k-hat above
0.7). ``--noncentred`` fits the guides to the same model written with
``a = mu_a + tau_a * a_raw``: the funnel is gone and both guides come closer, though the right
tail of ``tau`` stays too light. The reference is NUTS on the non-centred model
(``--num-nuts 0`` to skip it). Run::

    python examples/hierarchical.py --num-steps 3000
    python examples/hierarchical.py --num-steps 3000 --noncentred

Prints ELBO, k-hat and the posterior mean and sd of the group-level parameters for each guide
and for NUTS, and saves the marginals and the ELBO traces with k-hat to ``--output``.
"""

import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from common import fit_guides, parser, plot_fits, plot_marginals, posterior, save, table
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal

from pyro_flows import AutoFlowGuide

HYPER = ("mu_a", "mu_b", "tau_a", "tau_b", "sigma")


def simulate(num_groups=10, seed=1):
    """Fixed data (its own seed): group sizes 2..6, a ~ N(1, 0.2), b ~ N(-0.5, 0.1), sigma 1."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 7, num_groups)
    group = np.repeat(np.arange(num_groups), sizes)
    x = rng.normal(size=len(group))
    a = rng.normal(1.0, 0.2, num_groups)
    b = rng.normal(-0.5, 0.1, num_groups)
    y = a[group] + b[group] * x + rng.normal(size=len(group))
    return torch.as_tensor(group), torch.tensor(x, dtype=torch.float), torch.tensor(y).float()


def hyperpriors():
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 5.0))
    mu_b = pyro.sample("mu_b", dist.Normal(0.0, 5.0))
    tau_a = pyro.sample("tau_a", dist.HalfNormal(2.0))
    tau_b = pyro.sample("tau_b", dist.HalfNormal(2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    return mu_a, mu_b, tau_a, tau_b, sigma


def likelihood(group, x, y, a, b, sigma):
    with pyro.plate("obs", len(x)):
        # Index from the right, so that a batch of draws on the left passes through.
        mean = a[..., group] + b[..., group] * x
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def model(group, x, y=None, num_groups=10):
    mu_a, mu_b, tau_a, tau_b, sigma = hyperpriors()
    with pyro.plate("groups", num_groups):
        a = pyro.sample("a", dist.Normal(mu_a, tau_a))
        b = pyro.sample("b", dist.Normal(mu_b, tau_b))
    likelihood(group, x, y, a, b, sigma)


def noncentred(group, x, y=None, num_groups=10):
    mu_a, mu_b, tau_a, tau_b, sigma = hyperpriors()
    with pyro.plate("groups", num_groups):
        a_raw = pyro.sample("a_raw", dist.Normal(0.0, 1.0))
        b_raw = pyro.sample("b_raw", dist.Normal(0.0, 1.0))
    a = pyro.deterministic("a", mu_a + tau_a * a_raw)
    b = pyro.deterministic("b", mu_b + tau_b * b_raw)
    likelihood(group, x, y, a, b, sigma)


def nuts(data, num_samples, seed):
    pyro.set_rng_seed(seed)
    kernel = NUTS(noncentred)
    mcmc = MCMC(kernel, num_samples, warmup_steps=num_samples, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run(*data)
    seconds = time.perf_counter() - start
    samples = {k: v.numpy() for k, v in mcmc.get_samples().items()}
    samples["a"] = samples["mu_a"][:, None] + samples["tau_a"][:, None] * samples["a_raw"]
    samples["b"] = samples["mu_b"][:, None] + samples["tau_b"][:, None] * samples["b_raw"]
    return {k: samples[k] for k in (*HYPER, "a", "b")}, seconds


def main(argv=None):
    p = parser(__doc__, num_steps=3000)
    p.add_argument("--num-particles", type=int, default=8)
    p.add_argument("--num-nuts", type=int, default=500, help="NUTS draws (and warm-up)")
    p.add_argument("--noncentred", action="store_true", help="fit the non-centred model")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    data = simulate()
    fitted = noncentred if args.noncentred else model
    guides = {
        "AutoNormal": lambda: AutoNormal(fitted),
        "AutoFlowGuide": lambda: AutoFlowGuide(fitted, stl=True),
    }
    start = time.perf_counter()
    results, diagnoses, idatas = fit_guides(fitted, guides, args, *data)
    seconds = {"AutoNormal and AutoFlowGuide": time.perf_counter() - start}
    draws = {name: posterior(idata, (*HYPER, "a", "b")) for name, idata in idatas.items()}
    if args.num_nuts:
        draws["NUTS (non-centred)"], seconds["NUTS (non-centred)"] = nuts(
            data, args.num_nuts, args.seed
        )

    print(
        f"Hierarchical regression ({'non-centred' if args.noncentred else 'centred'}), "
        f"{len(data[0])} observations in 10 groups, {args.num_steps} steps, "
        f"{args.num_particles} particles"
    )
    for name, s in seconds.items():
        print(f"  {name}: {s:.0f} s")
    for name, d in diagnoses.items():
        print(f"  {name}: ELBO {d.elbo:.2f}, k-hat {d.khat:.2f} ({d.verdict})")
    print(table(draws, [*HYPER, "a[0]", "b[0]"]))

    if not args.no_figures:
        names = [*HYPER, "a[0]", "b[0]", "a[1]"]
        kind = "noncentred" if args.noncentred else "centred"
        fig = plot_marginals(draws, names, f"Hierarchical regression ({kind})")
        save(fig, args, f"hierarchical_{kind}_marginals")
        fig = plot_fits(results, diagnoses, f"Hierarchical regression ({kind})")
        save(fig, args, f"hierarchical_{kind}_fit")
    return {name: {k: float(np.std(d[k])) for k in HYPER} for name, d in draws.items()}


if __name__ == "__main__":
    main()
