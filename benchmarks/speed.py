r"""Speed of a training step and of whole fits, against AutoNormal in the same run.

Targets: eight schools (non-centred, D = 10, posteriordb data) for ``--dims 10``, and the
hierarchical normal model of :mod:`benchmarks.scale` (``mu``, ``tau`` and D - 2 group means)
for any other D. One thread; CPU time (this process, plus its children for the fits, which
counts Inductor's compiler).

``steps``: every configuration's step is timed in interleaved rounds (each round times every
configuration for a block of steps, about half a second each) and the fastest round of each is
kept, so that load from other processes slows all configurations alike or none. Ratios are to
``AutoNormal`` with Pyro's plain Adam. Configurations:

- ``AutoNormal``, ``AutoNormal+fused``: Pyro's guide, plain and fused Adam.
- ``default``, ``default+fused``: ``AutoFlowGuide(model)`` (iaf, Pathfinder start, STL), one
  particle.
- ``recipe``: the same with 8 vectorized particles (the accurate recipe), fused Adam.
- ``realnvp+stl``: ``flow="realnvp"``, 8 vectorized particles, fused Adam.
- ``default+graph``, ``recipe+graph``, ``recipe+inductor``: the compiled step of
  ``fit(compile=...)`` (the captured loss and gradients, then the same fused Adam), without
  fit's bookkeeping (timed in ``fits``).

``fits``: whole fits of N steps from a fresh guide, each in a fresh process: ``AutoNormal``
with a plain SVI loop, and ``AutoFlowGuide`` through ``fit`` (set-up, Pathfinder start,
capture and compilation included). ``inductor`` runs twice: with an empty Inductor cache
(``cold``) and with the cache the first run left (``warm``).

``capture``: the set-up of the compiled step (capture, checks and Inductor's compilation) for
a guide already set up, in a fresh process; ``inductor`` cold and warm as in ``fits``.

``memory``: the peak resident memory that a configuration's build and five steps add, in a
fresh process.

Usage:
    python -m benchmarks.speed steps --dims 10 100 1000 10000
    python -m benchmarks.speed steps --dims 1000 --configs AutoNormal recipe recipe+inductor
    python -m benchmarks.speed fits --dims 10 1000 --steps 5000
    python -m benchmarks.speed capture --dims 10 1000
    python -m benchmarks.speed memory --dims 10000 --configs recipe
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

STEP_CONFIGS = (
    "AutoNormal",
    "AutoNormal+fused",
    "default",
    "default+fused",
    "recipe",
    "realnvp+stl",
    "default+graph",
    "recipe+graph",
    "recipe+inductor",
)
FIT_CONFIGS = (
    "AutoNormal+svi",
    "default",
    "default+graph",
    "default+inductor",
    "recipe",
    "recipe+graph",
    "recipe+inductor",
)
CAPTURE_CONFIGS = ("default+graph", "default+inductor")
BLOCK_SECONDS = 0.5


def target(dim: int) -> tuple[Callable, tuple, int]:
    r"""Returns the model, its arguments and its plate nesting for D latent dimensions."""

    import torch

    if dim == 10:
        from .targets import load_target

        found = load_target("eight_schools-eight_schools_noncentered")
        return found.model, tuple(found.args), found.max_plate_nesting
    from .scale import model

    generator = torch.Generator().manual_seed(0)
    y = 1.0 + 0.5 * torch.randn(dim - 2, generator=generator)
    return model, (y + torch.randn(dim - 2, generator=generator),), 1


def parts(config: str) -> tuple[str, int, bool, bool | str]:
    r"""Splits a configuration name into (guide, particles, fused Adam, compile mode)."""

    base, _, extra = config.partition("+")
    mode = {"graph": True, "inductor": "inductor"}.get(extra, False)
    if base == "AutoNormal":
        return "AutoNormal", 1, extra == "fused", False
    if base == "realnvp":
        return "realnvp", 8, True, False
    return "iaf", 8 if base == "recipe" else 1, base == "recipe" or extra != "", mode


def make_step(config: str, dim: int, index: int) -> Callable[[], float]:
    r"""Returns one training step of `config` (its guide set up and warmed up)."""

    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.util import zero_grads

    from pyro_flows import AutoFlowGuide
    from pyro_flows._compiled import CompiledStep

    model, args, nesting = target(dim)
    flow, particles, fused, mode = parts(config)
    pyro.set_rng_seed(index)
    guide = AutoNormal(model) if flow == "AutoNormal" else AutoFlowGuide(model, flow=flow)
    guide._pyro_name = f"bench_{dim}_{index}"  # own parameter names: guides coexist
    loss = Trace_ELBO(
        num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=nesting
    )
    optim = pyro.optim.Adam({"lr": 0.003, **({"fused": True} if fused else {})})
    svi = SVI(model, guide, optim, loss)
    svi.step(*args)  # set-up
    if not mode:
        return lambda: svi.step(*args)
    compiled = CompiledStep(model, guide, loss, args, {}, mode)
    params = set(compiled.params.values())

    def step() -> float:
        value = compiled.loss_and_grads()
        optim(params)
        zero_grads(params)
        return value

    return step


def time_steps(configs: list[str], dim: int, rounds: int) -> dict[str, float]:
    r"""Returns the fastest CPU ms per step over `rounds` interleaved blocks, per config."""

    steps, sizes = {}, {}
    for i, config in enumerate(configs):
        steps[config] = make_step(config, dim, i)
        start = time.process_time()
        for _ in range(3):
            steps[config]()
        sizes[config] = max(1, round(BLOCK_SECONDS / max(1e-4, (time.process_time() - start) / 3)))
    best = dict.fromkeys(configs, float("inf"))
    for _ in range(rounds):
        for config, step in steps.items():
            start = time.process_time()
            for _ in range(sizes[config]):
                step()
            best[config] = min(best[config], (time.process_time() - start) / sizes[config] * 1e3)
    return best


def run_steps(args: argparse.Namespace) -> list[dict]:
    rows = []
    print("| D | config | CPU ms/step | x AutoNormal |\n|---|---|---|---|")
    for dim in args.dims:
        best = time_steps(args.configs, dim, args.rounds)
        baseline = best.get("AutoNormal", float("nan"))
        for config, ms in best.items():
            rows.append({"D": dim, "config": config, "ms": ms, "ratio": ms / baseline})
            print(f"| {dim:,} | {config} | {ms:.3g} | {ms / baseline:.3g} |", flush=True)
    return rows


def fit_worker(spec: dict) -> dict:
    r"""One whole fit from a fresh guide: CPU time (with children) and wall time."""

    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from pyro_flows import AutoFlowGuide, fit

    torch.set_num_threads(1)
    model, args, nesting = target(spec["D"])
    config, steps = spec["config"], spec["steps"]
    pyro.set_rng_seed(0)
    start = (_cpu(), time.perf_counter())
    if config == "AutoNormal+svi":
        svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        losses = [svi.step(*args) for _ in range(steps)]
    else:
        _, particles, _, mode = parts(config)
        loss = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1)
        guide = AutoFlowGuide(model)
        result = fit(model, guide, *args, num_steps=steps, loss=loss, compile=mode)
        losses = result.losses
    cpu, wall = _cpu() - start[0], time.perf_counter() - start[1]
    tail = losses[-max(1, len(losses) // 10) :]
    return {"cpu_s": cpu, "wall_s": wall, "elbo": -sum(tail) / len(tail)}


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_fits(args: argparse.Namespace) -> list[dict]:
    rows = []
    print("| D | config | CPU s | wall s | ELBO (last 10%) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for dim in args.dims:
            for config in args.configs:
                runs = ["cold", "warm"] if config.endswith("inductor") else [""]
                for run in runs:
                    spec = {"D": dim, "config": config, "steps": args.steps}
                    env = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}  # compile in children we time
                    if run:
                        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, f"{dim}-{config}")
                    row = {"D": dim, "config": f"{config} {run}".strip()}
                    row.update(worker_run("fit", spec, env, args.timeout))
                    rows.append(row)
                    print(_fit_row(row), flush=True)
    return rows


def _fit_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['D']:,} | {row['config']} | {row['error']} | | |"
    cells = f"{row['cpu_s']:.1f} | {row['wall_s']:.1f} | {row['elbo']:.2f}"
    return f"| {row['D']:,} | {row['config']} | {cells} |"


def capture_worker(spec: dict) -> dict:
    r"""The CPU and wall seconds of :class:`~pyro_flows._compiled.CompiledStep`'s set-up
    (capture, Inductor's compilation, the checks), for a guide already set up."""

    import pyro
    import torch
    from pyro.infer import Trace_ELBO

    from pyro_flows import AutoFlowGuide
    from pyro_flows._compiled import CompiledStep

    torch.set_num_threads(1)
    model, args, nesting = target(spec["D"])
    _, particles, _, mode = parts(spec["config"])
    loss = Trace_ELBO(
        num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=nesting
    )
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model)
    guide(*args)
    start = (_cpu(), time.perf_counter())
    CompiledStep(model, guide, loss, args, {}, mode)
    return {"cpu_s": _cpu() - start[0], "wall_s": time.perf_counter() - start[1]}


def run_capture(args: argparse.Namespace) -> list[dict]:
    rows = []
    print("| D | config | CPU s | wall s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for dim in args.dims:
            for config in args.configs:
                runs = ["cold", "warm"] if config.endswith("inductor") else [""]
                for run in runs:
                    env = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}
                    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, f"{dim}-{config}")
                    row = {"D": dim, "config": f"{config} {run}".strip()}
                    spec = {"D": dim, "config": config}
                    row.update(worker_run("capture", spec, env, args.timeout))
                    rows.append(row)
                    if "error" in row:
                        print(f"| {dim:,} | {row['config']} | {row['error']} | |", flush=True)
                    else:
                        cells = f"{row['cpu_s']:.1f} | {row['wall_s']:.1f}"
                        print(f"| {dim:,} | {row['config']} | {cells} |", flush=True)
    return rows


def memory_worker(spec: dict) -> dict:
    r"""The peak resident memory that a configuration's build and five steps add."""

    import torch

    torch.set_num_threads(1)
    make_step("AutoNormal", 10, 0)  # imports and first calls
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = make_step(spec["config"], spec["D"], 1)
    for _ in range(5):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": after - before, "process_mb": after}


def run_memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    print("| D | config | peak MB added | process peak MB |\n|---|---|---|---|")
    for dim in args.dims:
        for config in args.configs:
            row = {"D": dim, "config": config}
            row.update(worker_run("memory", {"D": dim, "config": config}, {}, args.timeout))
            rows.append(row)
            if "error" in row:
                print(f"| {dim:,} | {config} | {row['error']} | |", flush=True)
            else:
                print(f"| {dim:,} | {config} | {row['peak_mb']:.0f} | {row['process_mb']:.0f} |")
    return rows


def worker_run(kind: str, spec: dict, env: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.speed", "worker", json.dumps([kind, spec])]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return {"error": lines[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__)
    parser.add_argument("what", choices=["steps", "fits", "capture", "memory", "worker"])
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--configs", nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5000, help="steps of each whole fit")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--out", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.what == "worker":
        kind, spec = json.loads(args.spec)
        workers = {"fit": fit_worker, "capture": capture_worker, "memory": memory_worker}
        print(json.dumps(workers[kind](spec)))
        return []
    default = {"steps": STEP_CONFIGS, "capture": CAPTURE_CONFIGS}.get(args.what, FIT_CONFIGS)
    args.configs = args.configs or list(default)
    run = {"steps": run_steps, "fits": run_fits, "capture": run_capture, "memory": run_memory}
    run = run[args.what]
    rows = run(args)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=1)
    return rows


if __name__ == "__main__":
    main()
