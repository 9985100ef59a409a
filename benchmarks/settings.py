r"""Which settings of the default flow work best? Depth, width, learning rate and particles.

Fits `AutoFlowGuide` (flow `"iaf"`) with one setting changed at a time from the defaults
(3 layers of (64, 64), Adam at 0.003, 8 particles, the benchmark's recipe) on a few targets,
same seeds, and prints the medians over seeds of ELBO, PSIS k-hat, the marginal sd ratios,
ms per step and the steps to come within 1 nat of the final ELBO.

Usage:
    python -m benchmarks.settings                      # 4 targets, 2 seeds, 5,000 steps
    python -m benchmarks.settings --num-steps 50 --seeds 1 --draws 200 --targets banana

`--out DIR` writes `settings.json` (every fit) and `settings.md` (the medians) there.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pyro_flows import AutoFlowGuide

from .fitting import Recipe, fit_guide
from .targets import load_target

TARGETS = ("eight_schools-eight_schools_noncentered", "arK-arK", "funnel10", "banana")
DEFAULT = {"transforms": 3, "hidden_features": (64, 64), "lr": 0.003, "particles": 8}
VARIANTS = {  # name: the settings that differ from DEFAULT
    "default": {},
    "1 layer": {"transforms": 1},
    "5 layers": {"transforms": 5},
    "(32, 32)": {"hidden_features": (32, 32)},
    "(128, 128)": {"hidden_features": (128, 128)},
    "lr 0.001": {"lr": 0.001},
    "lr 0.01": {"lr": 0.01},
    "1 particle": {"particles": 1},
}
COLUMNS = ("elbo", "khat", "min_sd_ratio", "max_sd_ratio", "ms_per_step", "steps_to_1nat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.settings", description=__doc__)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0, 1, ..., N-1")
    parser.add_argument("--num-steps", type=int, default=5000)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--out", type=Path, help="write settings.json and settings.md here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    r"""Fits every variant on every target and seed; returns one row per fit."""
    base = Recipe(steps=args.num_steps, draws=args.draws, iw_particles=min(100, args.draws))
    rows = []
    for name in args.targets:
        target = load_target(name)
        if target is None:
            continue
        for variant in args.variants:
            settings = DEFAULT | VARIANTS[variant]
            recipe = replace(base, lr=settings["lr"], particles=settings["particles"])
            options = {k: settings[k] for k in ("transforms", "hidden_features")}
            for seed in range(args.seeds):
                fit = fit_guide(target, lambda m, o=options: AutoFlowGuide(m, **o), recipe, seed)
                row = {"target": name, "variant": variant, "seed": seed}
                row |= {k: fit.metrics.get(k) for k in COLUMNS}
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    cells = [f"{k} {_text(row[k])}" for k in COLUMNS]
    return f"{row['target'][:24]:24s} {row['variant']:11s} seed {row['seed']}: " + " ".join(cells)


def _text(value: object) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.2f}"


def medians(rows: list[dict]) -> str:
    r"""Returns a Markdown table of the medians over seeds, one row per target and variant."""
    lines = ["| target | variant | " + " | ".join(COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 2) + "|")
    keys = dict.fromkeys((r["target"], r["variant"]) for r in rows)
    for target, variant in keys:
        group = [r for r in rows if (r["target"], r["variant"]) == (target, variant)]
        cells = []
        for k in COLUMNS:
            values = [r[k] for r in group if r[k] is not None and np.isfinite(r[k])]
            cells.append(_text(float(np.median(values)) if values else None))
        lines.append(f"| {target} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    r"""Runs the sweep, prints the medians and writes them where `--out` says."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args)
    table = medians(rows)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "settings.json").write_text(json.dumps(rows, indent=1))
        (args.out / "settings.md").write_text(table)
    return rows


if __name__ == "__main__":
    main()
