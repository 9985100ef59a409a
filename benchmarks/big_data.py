r"""Data-parallel SVI on a million rows: AutoFlowGuide against AutoNormal, 1 and 2 processes.

Runs ``examples/big_data.py`` (hierarchical logistic regression, group effects as local latents
in a subsampled plate, globals under the flow; Lightning, DDP with gloo for 2 processes) once
per configuration, each in a fresh process on one torch thread per process, and collects
what it reports:

- ``rows_per_s``: rows of data through the ELBO per second of training, over all processes
  (steps x groups per step x rows per group x processes / training seconds; the first
  step, which sets up nothing but warms caches, included);
- ``epoch_s``: the median seconds per epoch after the first;
- ``peak_mb``: each process's peak resident set size (``ru_maxrss``), which includes the
  interpreter, torch and the data (about 16 MB for a million rows);
- the posterior mean and sd of each global against the value that simulated the data.

The 2-process runs take half the steps of the 1-process runs with the same batch per process,
so that every configuration sees the same number of rows. Timings are only comparable on an
otherwise idle machine with at least as many cores as processes.

Usage:
    python -m benchmarks.big_data                      # 1M rows; about 4 min on 2 free cores
    python -m benchmarks.big_data --rows 100000 --groups 1000 --steps 200   # quick
    python -m benchmarks.big_data --device cuda        # a GPU per process
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "big_data.py"
OUT = ROOT / "benchmarks" / "results" / "big_data"


def run(guide, processes, args):
    """One configuration in a fresh process (Lightning starts the second one); its summary."""
    steps = args.steps // processes
    with tempfile.TemporaryDirectory() as folder:
        summary = Path(folder) / "summary.json"
        command = [
            sys.executable,
            str(EXAMPLE),
            *("--rows", str(args.rows), "--groups", str(args.groups)),
            *("--batch-groups", str(args.batch_groups), "--num-steps", str(steps)),
            *("--processes", str(processes), "--guide", guide, "--device", args.device),
            *("--seed", str(args.seed), "--summary", str(summary), "--no-figures"),
        ]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(summary.read_text())
    result["wall_s"] = time.perf_counter() - start  # with start-up, data and draws
    return result


def table(results):
    """The results as Markdown: speed and memory, then the globals' posterior."""
    lines = [
        "| guide | processes | steps | rows/s | s per epoch | train s | peak MB per process |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["config"]
        peaks = ", ".join(f"{m:.0f}" for m in r["peak_mb"])
        lines.append(
            f"| {c['guide']} | {c['processes']} | {r['steps']} | {r['rows_per_s']:,.0f} "
            f"| {r['epoch_s']:.2f} | {r['train_s']:.1f} | {peaks} |"
        )
    names = list(results[0]["posterior"])
    lines += ["", "| guide | processes | " + " | ".join(names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    truth = results[0]["posterior"]
    lines.append("| truth | | " + " | ".join(f"{truth[n]['truth']:.3f}" for n in names) + " |")
    for r in results:
        c, post = r["config"], r["posterior"]
        cells = [f"{post[n]['mean']:.3f} ± {post[n]['sd']:.3f}" for n in names]
        lines.append(f"| {c['guide']} | {c['processes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--groups", type=int, default=10_000)
    p.add_argument("--batch-groups", type=int, default=500, help="groups per step and process")
    p.add_argument("--steps", type=int, default=1000, help="steps of 1 process (2: half)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--guides", nargs="+", default=["AutoFlowGuide", "AutoNormal"])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    results = []
    for processes in args.processes:  # one at a time
        for guide in args.guides:
            results.append(run(guide, processes, args))
            r = results[-1]
            print(f"{guide}, {processes} process(es): {r['rows_per_s']:,.0f} rows/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
