r"""NumPyro's whole-fit CPU time on the models of `benchmarks.speed fits`, for docs/scale.md.

Runs in the benchmark's optional environment, not the package's: NumPyro and JAX, no torch
needed (``pip install numpyro jax``). Each fit runs in a fresh process on one thread and is
timed as `benchmarks.speed fits` times pyro-flows' fits: CPU seconds of the process from
before its imports to the end of 5,000 steps of Adam at lr 0.01 (compilation included), with
the final ELBO estimate. The models are eight schools (non-centred, D = 10) and the
hierarchical Gaussian of `benchmarks.scale` at D = 1,000, whose data `benchmarks.speed`
draws with torch: pass them with ``--data`` (a JSON list written by ``--write-data`` in the
package's environment), or the script draws its own with numpy (same model, other data).

Usage:
    python -m benchmarks.numpyro_fits --write-data y1000.json      # package's environment
    /path/to/numpyro-env/bin/python benchmarks/numpyro_fits.py --data y1000.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
GUIDES = ("AutoNormal", "AutoIAFNormal")
MODELS = ("eight_schools", "hierarchical1000")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fit_one(model_name: str, guide_name: str, steps: int, data: list | None) -> dict:
    r"""One fit in this process: imports, set-up, compilation and `steps` steps, timed."""
    began = _cpu()
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO, autoguide

    def eight_schools(sigma, y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
        with numpyro.plate("school", len(sigma)):
            eta = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)

    def hierarchical(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfNormal(5.0))
        with numpyro.plate("groups", len(y)):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
            numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    if model_name == "eight_schools":
        model, args = eight_schools, (jnp.array(SIGMA), jnp.array(Y))
    else:
        if data is None:
            import numpy as np

            rng = np.random.default_rng(0)
            data = list(1.0 + 0.5 * rng.standard_normal(998) + rng.standard_normal(998))
        model, args = hierarchical, (jnp.array(data),)
    guide = getattr(autoguide, guide_name)(model)
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), steps, *args, progress_bar=False)
    losses = result.losses
    tail = float(jnp.mean(losses[-steps // 10 :]))
    return {
        "model": model_name,
        "guide": guide_name,
        "steps": steps,
        "cpu_s": _cpu() - began,
        "final_elbo": -tail,
        "finite": bool(jnp.isfinite(losses[-1])),
        "numpyro": numpyro.__version__,
        "jax": jax.__version__,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--data", help="JSON list: the D = 1,000 model's data")
    parser.add_argument("--write-data", help="write benchmarks.speed's D = 1,000 data here")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "GUIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.write_data:
        from benchmarks.speed import target

        _, (y,), _ = target(1000)
        with open(args.write_data, "w") as file:
            json.dump(y.tolist(), file)
        return []
    data = None
    if args.data:
        with open(args.data) as file:
            data = json.load(file)
    if args.one:
        row = fit_one(*args.one, args.steps, data)
        print(json.dumps(row))
        return [row]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        JAX_PLATFORMS="cpu",
    )
    rows = []
    for model_name in MODELS:
        for guide_name in GUIDES:
            command = [sys.executable, __file__, "--one", model_name, guide_name]
            command += ["--steps", str(args.steps)] + (["--data", args.data] if args.data else [])
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{model_name:18s} {guide_name:14s} {row['cpu_s']:7.1f} s CPU, "
                f"final ELBO {row['final_elbo']:.2f}{'' if row['finite'] else ' (NaN)'}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=1)
    return rows


if __name__ == "__main__":
    main()
