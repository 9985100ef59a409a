r"""Pyro NUTS's time to 1,000 effective draws on each benchmark target, cached.

The reference a fit's total time is set against (the benchmark's `total_s` / `start_s`
columns): how long the standard sampler takes to give 1,000 effective draws of the same
posterior, on the same machine, one thread. NUTS runs once per target with Pyro's defaults
(diagonal mass matrix, adapted step size, target acceptance 0.8, JIT-compiled potential), a
warm-up of 500 and 1,000 draws, one chain; the time includes compilation and warm-up, and is
scaled to 1,000 effective draws by the smallest bulk ESS over every scalar (ArviZ). The result
is cached in `benchmarks/results/nuts.json`: a target already there is not run again unless
`--force`.

Usage:
    python -m benchmarks.nuts_time                       # every target not yet cached
    python -m benchmarks.nuts_time --targets banana --force
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS

from .targets import TARGETS, load_target
from .targets.base import Target, init_to_uniform_unconstrained

CACHE = Path(__file__).resolve().parent / "results" / "nuts.json"
EFFECTIVE = 1000


def nuts_time(target: Target, warmup: int = 500, draws: int = 1000, seed: int = 0) -> dict:
    r"""Runs NUTS on a target; returns its wall and CPU times, the smallest ESS and the time
    scaled to 1,000 effective draws."""
    import arviz

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    kernel = NUTS(
        target.model,
        jit_compile=True,
        ignore_jit_warnings=True,
        max_plate_nesting=target.max_plate_nesting,
        init_strategy=init_to_uniform_unconstrained,
    )
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True)
    wall, cpu = time.perf_counter(), time.process_time()
    mcmc.run(*target.args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples = {k: v.double().numpy()[None] for k, v in mcmc.get_samples().items()}
    ess = arviz.ess(arviz.convert_to_dataset(samples), method="bulk")
    smallest = float(min(np.min(ess[name].values) for name in ess.data_vars))
    scale = EFFECTIVE / smallest if smallest > 0 else math.inf
    return {
        "warmup": warmup,
        "draws": draws,
        "wall_s": wall,
        "cpu_s": cpu,
        "min_ess": smallest,
        "seconds_per_1000_ess": wall * scale,
        "divergences": len(mcmc.diagnostics()["divergences"]["chain 0"]),
    }


def main(argv: list[str] | None = None) -> dict:
    r"""Runs NUTS on the targets not yet in the cache (or all, with `--force`)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nuts_time", description=__doc__)
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--force", action="store_true", help="run cached targets again")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {}
    for name in args.targets:
        if name in cache and not args.force:
            continue
        target = load_target(name)
        if target is None:
            continue
        cache[name] = nuts_time(target)
        row = cache[name]
        print(
            f"{name}: {row['wall_s']:.0f} s, min ESS {row['min_ess']:.0f}, "
            f"{row['seconds_per_1000_ess']:.0f} s per 1,000 effective draws",
            flush=True,
        )
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        args.cache.write_text(json.dumps(cache, indent=1, sort_keys=True))
    return cache


if __name__ == "__main__":
    main(sys.argv[1:])
