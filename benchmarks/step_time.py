r"""Milliseconds per SVI step of every guide on one target, as ratios to AutoNormal.

Guides are timed in interleaved rounds (each round times every guide for a block of steps)
and the fastest round of each is kept, so that a burst of other work on the machine slows
all guides alike or none, rather than whichever happened to run at the time.

Usage:
    python -m benchmarks.step_time                       # eight schools, 1 and 8 particles
    python -m benchmarks.step_time --target banana --particles 8
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from .guides import BASELINE, GUIDES
from .targets import TARGETS, load_target


def time_guides(target, guides: list[str], particles: int, rounds: int, steps: int) -> dict:
    r"""Returns the fastest ms/step over `rounds` interleaved blocks of `steps`, per guide."""
    runs = {}
    for name in guides:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = GUIDES[name](target.model)
        guide._pyro_name = f"bench_{len(runs)}"  # own parameter names: guides coexist
        elbo = Trace_ELBO(
            num_particles=particles,
            vectorize_particles=particles > 1,
            max_plate_nesting=target.max_plate_nesting,
        )
        runs[name] = SVI(target.model, guide, Adam({"lr": 0.003}), elbo)
        for _ in range(20):  # set-up and warm-up
            runs[name].step(*target.args)
    best = dict.fromkeys(guides, float("inf"))
    for _ in range(rounds):
        for name, svi in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                svi.step(*target.args)
            best[name] = min(best[name], (time.perf_counter() - start) / steps * 1e3)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__)
    parser.add_argument("--target", default="eight_schools-eight_schools_noncentered")
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), default=list(GUIDES))
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    if args.target not in TARGETS:
        parser.error(f"unknown target {args.target!r}")
    torch.set_num_threads(1)
    target = load_target(args.target)
    guides = [BASELINE] + [g for g in args.guides if g != BASELINE]
    results = {}
    print(f"{args.target}: fastest of {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"{'guide':30s}" + "".join(f"{f'{p} particle(s)':>24s}" for p in args.particles))
    for particles in args.particles:
        results[particles] = time_guides(target, guides, particles, args.rounds, args.steps)
    for name in guides:
        cells = ""
        for particles in args.particles:
            ms = results[particles][name]
            cells += f"{ms:12.2f} ms {ms / results[particles][BASELINE]:6.2f}x"
        print(f"{name:30s}{cells}")
    return results


if __name__ == "__main__":
    main()
