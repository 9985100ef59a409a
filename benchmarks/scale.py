r"""How AutoFlowGuide scales with the latent dimension D, against AutoNormal in the same run.

A hierarchical model with D latent dimensions (mu, tau and D - 2 group means theta_j, centred:
y_j ~ N(theta_j, 1), theta_j ~ N(mu, tau)). Every configuration (guide, flow, STL, D) runs in a
fresh subprocess on one thread, which reports:

- `params`: the number of guide parameters;
- `build_s`: the first SVI step, which traces the model and builds the guide (after a run at
  D = 4 in the same process, so that lazy imports and first calls are not counted);
- `ms_step`: wall time per SVI step (Trace_ELBO, one particle, Adam), the median over blocks of
  5 steps after 3 warm-up steps, for at most `--seconds` or `--max-steps`;
- `x_autonormal`: the median ratio of each block's time to that of the next block of AutoNormal
  steps on the same model in the same process (alternate blocks, so that load from other
  processes affects both alike; AutoNormal's parameters add 2 D floats to `peak_mb`);
- `peak_mb`: the process's peak resident set size (`resource.getrusage(...).ru_maxrss`) over the
  build and the steps, minus the peak before them (after the imports and the D = 4 run): what
  the model, guide and steps add. It counts memory that the allocator keeps, so it is coarse
  below a few MB;
- with `--fit-steps N`: `elbo`, the mean ELBO over the last 10% of N steps (lr 0.01); rows of
  the same D bound the same log evidence, so a higher ELBO is a better fit.

STL on an autoregressive flow (`iaf`, `nsf`) builds the D x D Jacobian of the flow at each draw
(a batched pass of D copies of the draw: O(D^2) memory) and solves with it (O(D^3) time).
Above `--stl-max-dim` such configurations are skipped, with the reason in the table.

Usage:
    python -m benchmarks.scale                        # D = 10 ... 10,000, all configurations
    python -m benchmarks.scale --dims 10 100 --seconds 1      # quick
    python -m benchmarks.scale --dims 10000 --fit-steps 300 --configs AutoNormal iaf iaf-h16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DIMS = (10, 100, 1000, 10000)
# name: (flow or None for AutoNormal, AutoFlowGuide options)
CONFIGS = {
    "AutoNormal": (None, {}),
    "iaf": ("iaf", {}),
    "iaf+stl": ("iaf", {"stl": True}),
    "nsf_coupling": ("nsf_coupling", {}),
    "nsf_coupling+stl": ("nsf_coupling", {"stl": True}),
    "realnvp": ("realnvp", {}),
    "realnvp+stl": ("realnvp", {"stl": True}),
}
EXTRA = {
    "iaf-h16": ("iaf", {"hidden_features": (16, 16)}),
    "iaf-1x64": ("iaf", {"transforms": 1}),
    "nsf_coupling-h16-b4": ("nsf_coupling", {"hidden_features": (16, 16), "bins": 4}),
    "realnvp-h16": ("realnvp", {"hidden_features": (16, 16)}),
}
COLUMNS = ("D", "config", "params", "build_s", "ms_step", "x_autonormal", "peak_mb", "elbo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"of {[*CONFIGS]}")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per config")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--fit-steps", type=int, default=0)
    parser.add_argument("--stl-max-dim", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per config")
    parser.add_argument("--out", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON: one configuration
    return parser.parse_args(argv)


def stl_jacobian(flow: str | None, options: dict) -> bool:
    r"""Whether STL builds the flow's D x D Jacobian (autoregressive flows)."""

    return flow in ("iaf", "nsf") and bool(options.get("stl"))


def model(y):
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from pyro_flows import AutoFlowGuide

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def setup(dim: int, flow: str | None, options: dict) -> tuple:
        pyro.set_rng_seed(0)
        generator = torch.Generator().manual_seed(0)
        y = 1.0 + 0.5 * torch.randn(dim - 2, generator=generator)
        y = y + torch.randn(dim - 2, generator=generator)
        guide = AutoNormal(model) if flow is None else AutoFlowGuide(model, flow=flow, **options)
        return SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()), guide, y

    def timed(svi: SVI, y: torch.Tensor, losses: list) -> float:
        start = time.perf_counter()
        for _ in range(5):
            losses.append(svi.step(y))
        return (time.perf_counter() - start) / 5

    # A small run first: lazy imports and first-call set-up are not counted.
    svi, _, y = setup(4, spec["flow"], spec["options"])
    for _ in range(3):
        svi.step(y)
    pyro.clear_param_store()
    baseline = rss_mb()
    svi, guide, y = setup(spec["D"], spec["flow"], spec["options"])
    start = time.perf_counter()
    losses = [svi.step(y)]
    build = time.perf_counter() - start
    params = sum(p.numel() for p in guide.parameters())
    for _ in range(3):
        losses.append(svi.step(y))
    # AutoNormal on the same model, timed in alternate blocks: the ratio is robust to load
    # that other processes put on the machine during the measurement.
    twin = setup(spec["D"], None, {}) if spec["flow"] is not None else None
    if twin is not None:
        for _ in range(4):
            twin[0].step(twin[2])
    blocks, ratios, steps, start = [], [], 0, time.perf_counter()
    while steps < spec["max_steps"] and time.perf_counter() - start < spec["seconds"]:
        blocks.append(timed(svi, y, losses))
        if twin is not None:
            ratios.append(blocks[-1] / timed(twin[0], twin[2], []))
        steps += 5
    for _ in range(max(0, spec["fit_steps"] - len(losses))):
        losses.append(svi.step(y))
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "params": params,
        "build_s": build,
        "ms_step": 1e3 * statistics.median(blocks),
        "x_autonormal": statistics.median(ratios) if ratios else 1.0,
        "timed_steps": steps,
        "peak_mb": rss_mb() - baseline,
        "baseline_mb": baseline,
        "elbo": -sum(tail) / len(tail) if spec["fit_steps"] else None,
        "steps": len(losses),
    }


def run_one(spec: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.scale", "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return {"error": lines[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict]:
    configs = {**CONFIGS, **EXTRA}
    rows = []
    for dim in args.dims:
        for name in args.configs:
            flow, options = configs[name]
            row = {"D": dim, "config": name}
            if stl_jacobian(flow, options) and dim > args.stl_max_dim:
                row["error"] = "skipped: STL's D x D Jacobian solve per draw is O(D^3)"
            else:
                spec = {
                    "D": dim,
                    "flow": flow,
                    "options": options,
                    "seconds": args.seconds,
                    "max_steps": args.max_steps,
                    "fit_steps": args.fit_steps,
                }
                row.update(run_one(spec, args.timeout))
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    cells = []
    for column in COLUMNS:
        value = row.get(column)
        if isinstance(value, float):
            value = f"{value:.3g}" if column != "elbo" else f"{value:.1f}"
        cells.append("" if value is None else str(value))
    if "error" in row:
        cells.append(row["error"])
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    print("| " + " | ".join(COLUMNS) + " | note |")
    print("|" + "---|" * (len(COLUMNS) + 1))
    rows = run(args)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
