r"""Does the "sticking the landing" gradient help AutoFlowGuide? STL on against off.

Fits `AutoFlowGuide` (default flow) with `stl=False` and `stl=True` on reference posteriors,
same seeds and recipe, and compares ELBO, IW-ELBO, PSIS k-hat and the marginal sd ratios
(guide sd / reference sd) against the posteriordb reference draws.

Usage:
    python -m benchmarks.stl                       # 2 targets, 3 seeds, 5,000 steps
    python -m benchmarks.stl --num-steps 50 --seeds 1 --draws 200   # smoke test

Prints one row per fit and the medians over seeds; `--out FILE` also writes every row as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pyro_flows import AutoFlowGuide

from .fitting import Recipe, fit_guide
from .targets import load_target

TARGETS = ("eight_schools-eight_schools_noncentered", "sblrc-blr")
COLUMNS = ("elbo", "iwelbo", "khat", "min_sd_ratio", "max_sd_ratio", "ms_per_step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stl", description=__doc__)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0, 1, ..., N-1")
    parser.add_argument("--num-steps", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--out", type=Path, help="write every row to this JSON file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    recipe = Recipe(
        steps=args.num_steps,
        lr=args.lr,
        particles=args.particles,
        draws=args.draws,
        iw_particles=min(100, args.draws),
    )
    rows = []
    for name in args.targets:
        target = load_target(name)
        if target is None:
            continue
        for stl in (False, True):
            for seed in range(args.seeds):
                fit = fit_guide(target, lambda m, s=stl: AutoFlowGuide(m, stl=s), recipe, seed)
                row = {"target": name, "stl": stl, "seed": seed}
                row |= {key: fit.metrics.get(key) for key in (*COLUMNS, "error")}
                rows.append(row)
                print(_format(row), flush=True)
    return rows


def _format(row: dict) -> str:
    values = " ".join(
        f"{key}={row[key]:.3f}" if isinstance(row[key], float) else f"{key}={row[key]}"
        for key in COLUMNS
    )
    return f"{row['target']:<40} stl={row['stl']!s:<5} seed={row['seed']} {values}"


def medians(rows: list[dict]) -> list[str]:
    lines = []
    for name in dict.fromkeys(row["target"] for row in rows):
        for stl in (False, True):
            group = [r for r in rows if r["target"] == name and r["stl"] == stl and not r["error"]]
            if group:
                values = {k: float(np.median([r[k] for r in group])) for k in COLUMNS}
                lines.append(_format({"target": name, "stl": stl, "seed": "*", **values}))
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    torch.set_num_threads(1)
    args = parse_args(argv)
    rows = run(args)
    print("medians over seeds:")
    print("\n".join(medians(rows)))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
