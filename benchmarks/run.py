r"""Runs the reference-posterior benchmark: every guide on every target, in one process.

Usage:
    python -m benchmarks.run --quick          # about 2 minutes: 3 targets, 1 seed, 1,000 steps
    python -m benchmarks.run                  # full: every target, 3 seeds, 5,000 steps
    python -m benchmarks.run --targets banana --guides AutoNormal AutoFlowGuide
    python -m benchmarks.run --start laplace --targets sblri-blr --out benchmarks/results/laplace
    python -m benchmarks.run --recipe dropin --out benchmarks/results/dropin   # a user's SVI loop
    python -m benchmarks.run --recipe fit --out benchmarks/results/fit         # fit's defaults

Writes `results.json` (every seed), `results.md` (medians over seeds) and plots under
`--out` (default `benchmarks/results`, or `benchmarks/results/tmp/quick` in quick mode).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import traceback
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pyro
import torch

from . import report
from .draws import scalar_columns
from .fitting import Fit, Recipe, fit_guide
from .guides import GUIDES
from .laplace_start import find_start
from .targets import TARGETS, load_target

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_TARGETS = ("eight_schools-eight_schools_noncentered", "banana", "funnel10")
QUICK = {"steps": 1000, "draws": 1000, "seeds": 1}
FULL = {"steps": 5000, "draws": 4000, "seeds": 3}
# The optimization recipes: the reference one (Adam 0.003, 8 vectorized particles); the one a
# user's own SVI loop runs after swapping AutoNormal for AutoFlowGuide (plain SVI, Adam 0.01,
# Trace_ELBO(), 1 particle); and pyro_flows.fit with its defaults.
RECIPES = {
    "reference": {"lr": 0.003, "particles": 8, "trainer": "svi"},
    "dropin": {"lr": 0.01, "particles": 1, "trainer": "svi"},
    "fit": {"lr": 0.01, "particles": 1, "trainer": "fit"},
}
WARMUP_STEPS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    r"""Parses the command line; unset options take the quick or full defaults."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 targets, 1 seed, short fits")
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), metavar="TARGET")
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), metavar="GUIDE")
    parser.add_argument("--seeds", type=int, help="seeds 0, 1, ..., N-1")
    parser.add_argument("--steps", type=int, help="SVI steps per fit")
    parser.add_argument("--recipe", choices=list(RECIPES), default="reference", help="see RECIPES")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: the recipe's)")
    parser.add_argument("--particles", type=int, help="ELBO particles per step (the recipe's)")
    parser.add_argument("--draws", type=int, help="guide draws for ELBO, k-hat and marginals")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    parser.add_argument(
        "--start",
        choices=("prior", "laplace"),
        default="prior",
        help="start every guide at the prior median (default) or at pyro_flows.laplace_start",
    )
    args = parser.parse_args(argv)
    defaults = {**(QUICK if args.quick else FULL), **RECIPES[args.recipe]}
    if args.quick and args.recipe == "reference":
        defaults["lr"] = 0.01
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.targets is None:
        args.targets = list(QUICK_TARGETS if args.quick else TARGETS)
    if args.guides is None:
        args.guides = list(GUIDES)
    if args.out is None:
        args.out = RESULTS / "tmp" / "quick" if args.quick else RESULTS
    return args


def warm_up(guides: list[str]) -> None:
    r"""Takes a few steps with every guide so one-time costs (imports, caches) are not timed."""
    banana = load_target("banana")
    for name in guides:
        fit_guide(banana, GUIDES[name], Recipe(steps=WARMUP_STEPS, draws=200), seed=0)


def run_target(
    target, guides: list[str], recipe: Recipe, seeds: int, start: object = None
) -> tuple[list, dict, dict]:
    r"""Fits every guide for every seed; returns results, first-seed draws and ELBO traces."""
    results, columns, traces = [], {}, {}
    for seed in range(seeds):
        for name in guides:
            build = GUIDES[name] if start is None else partial(GUIDES[name], start=start)
            began = time.perf_counter()
            try:
                fit = fit_guide(target, build, recipe, seed)
            except Exception as error:  # a guide that cannot fit this target is a result
                traceback.print_exc(limit=3)
                fit = Fit({"seed": seed, "error": f"{type(error).__name__}: {error}"}, {}, [])
            result = {"target": target.name, "guide": name, **fit.metrics}
            results.append(result)
            if seed == 0:
                columns[name], traces[name] = fit.columns, fit.elbo_trace
            _progress(result, time.perf_counter() - began)
    return results, columns, traces


def _progress(result: dict, seconds: float) -> None:
    if result.get("error"):
        print(f"  {result['guide']:28s} seed {result['seed']}: {result['error']}", flush=True)
        return
    print(
        f"  {result['guide']:28s} seed {result['seed']}: ELBO {result['elbo']:9.2f} "
        f"k̂ {result['khat']:5.2f} sd ratio [{result['min_sd_ratio']:.2f}, "
        f"{result['max_sd_ratio']:.2f}] {result['ms_per_step']:.2f} ms/step ({seconds:.0f} s)",
        flush=True,
    )


def _complete(results: list[dict]) -> None:
    """Gives failed fits every column, as NaN."""
    for r in results:
        for key, _, _ in report.COLUMNS:
            r.setdefault(key, math.nan)
        r.setdefault("dim", 0)


def write(
    results: list[dict],
    descriptions: dict,
    args: argparse.Namespace,
    recipe: Recipe,
    seconds: float,
) -> None:
    r"""Writes `results.json` and `results.md` for the targets done so far."""
    _complete(results)
    report.add_step_ratios(results)
    settings = {
        "mode": "quick" if args.quick else "full",
        "recipe": asdict(recipe),
        "seeds": args.seeds,
        "targets": list(descriptions),
        "guides": args.guides,
        "seconds": seconds,
        "versions": {"python": platform.python_version(), "torch": torch.__version__}
        | {"pyro": pyro.__version__},
        "threads": torch.get_num_threads(),
        "start": args.start,
        "recipe_name": args.recipe,
    }
    report.write_json(results, settings, args.out / "results.json")
    trained = (
        f"pyro_flows.fit's defaults for {args.steps} steps"
        if args.trainer == "fit"
        else f"{args.steps} steps of Adam (lr {args.lr}), {args.particles} particle(s)"
    )
    header = (
        f"# Benchmark results ({settings['mode']} mode, recipe {args.recipe!r})\n\n"
        f"{trained}, {args.draws} guide draws, medians over {args.seeds} seed(s); {seconds:.0f} s "
        f"on {torch.get_num_threads()} thread(s), torch {torch.__version__}, pyro "
        f"{pyro.__version__}."
    )
    if args.start == "laplace":
        header += (
            " Every guide starts at `pyro_flows.laplace_start`'s mode, with its scales where "
            "the guide takes one per coordinate (not Pyro's flows)."
        )
    (args.out / "results.md").write_text(report.markdown(results, descriptions, header))


def main(argv: list[str] | None = None) -> list[dict]:
    r"""Runs the benchmark and writes its outputs; returns the results (one dict per fit)."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    recipe = Recipe(
        steps=args.steps,
        lr=args.lr,
        particles=args.particles,
        draws=args.draws,
        trainer=args.trainer,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    warm_up(args.guides)
    results, descriptions, seconds = [], {}, 0.0
    for name in args.targets:
        target = load_target(name)
        if target is None:
            continue
        start = None
        if args.start == "laplace":
            start = find_start(target)
            if start is None:
                continue
        print(f"{name}: {target.description}", flush=True)
        descriptions[name] = target.description
        found, columns, traces = run_target(target, args.guides, recipe, args.seeds, start)
        results += found
        if not args.no_plots:
            reference = scalar_columns(target.reference(None, seed=10_000))
            report.plot_marginals(name, reference, columns, args.out / f"marginals-{name}.png")
            report.plot_elbo_traces(name, traces, args.out / f"elbo-{name}.png")
        # Written after every target, so that a long run interrupted keeps what it measured.
        seconds = time.perf_counter() - started
        write(results, descriptions, args, recipe, seconds)
    print(f"wrote {args.out} in {seconds:.0f} s")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
