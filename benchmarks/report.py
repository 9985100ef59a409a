"""Writes the benchmark's results: JSON, a Markdown table and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .guides import BASELINE

# The goals of issue 5 for AutoFlowGuide (same step budget as every other guide).
KHAT_GOAL, SD_RATIO_GOAL, MEAN_ERROR_GOAL, STEP_RATIO_GOAL, STEP_RATIO_MAX_DIM = (
    0.7,
    (0.9, 1.1),
    0.1,
    1.5,
    30,
)
MAX_MARGINALS = 12  # marginals plotted per target

COLUMNS = [  # (key, header, format)
    ("elbo", "ELBO", "{:.2f}"),
    ("elbo_se", "± MCSE", "{:.2f}"),
    ("iwelbo", "IW-ELBO", "{:.2f}"),
    ("khat", "k̂", "{:.2f}"),
    ("max_mean_error", "max \\|Δmean\\|/sd", "{:.3f}"),
    ("mean_mean_error", "mean \\|Δmean\\|/sd", "{:.3f}"),
    ("min_sd_ratio", "min sd ratio", "{:.2f}"),
    ("max_sd_ratio", "max sd ratio", "{:.2f}"),
    ("mean_wasserstein", "W1/sd", "{:.3f}"),
    ("ms_per_step", "ms/step", "{:.2f}"),
    ("step_ratio", "× AutoNormal", "{:.2f}"),
    ("steps_to_1nat", "steps to 1 nat", "{:.0f}"),
    ("seconds_to_1nat", "s to 1 nat", "{:.1f}"),
    ("peak_rss_mb", "peak ΔRSS MB", "{:.0f}"),
]


def add_step_ratios(results: list[dict]) -> None:
    r"""Adds to each result its step time over AutoNormal's on the same target and seed."""
    baseline = {
        (r["target"], r["seed"]): r["ms_per_step"] for r in results if r["guide"] == BASELINE
    }
    for r in results:
        base = baseline.get((r["target"], r["seed"]))
        r["step_ratio"] = r["ms_per_step"] / base if base else math.nan


def median_over_seeds(results: list[dict]) -> dict[tuple[str, str], dict]:
    r"""Returns, per (target, guide), the median of every numeric metric over seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["target"], r["guide"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        row = {"seeds": len(runs), "errors": [r["error"] for r in runs if r.get("error")]}
        for name, _, _ in COLUMNS:
            values = [_number(r.get(name)) for r in runs]
            row[name] = float(np.median(values)) if values else math.nan
        row["dim"] = runs[0]["dim"]
        out[key] = row
    return out


def _number(value: object) -> float:
    return math.nan if value is None else float(value)


def _cell(value: float, fmt: str) -> str:
    return "—" if value is None or not np.isfinite(value) else fmt.format(value)


def goal_misses(target: str, guide: str, rows: dict[tuple[str, str], dict]) -> list[str]:
    r"""Returns the goals of issue 5 that a guide misses on a target (medians over seeds)."""
    row = rows[(target, guide)]
    if row["errors"]:
        return ["failed"]
    misses = []
    if not row["khat"] < KHAT_GOAL:
        misses.append(f"k̂ ≥ {KHAT_GOAL}")
    low, high = SD_RATIO_GOAL
    if not (row["min_sd_ratio"] >= low and row["max_sd_ratio"] <= high):
        misses.append(f"sd ratio outside [{low}, {high}]")
    if not row["max_mean_error"] <= MEAN_ERROR_GOAL:
        misses.append(f"\\|Δmean\\| > {MEAN_ERROR_GOAL} sd")
    pyro_best = max(
        (r["elbo"] for (t, g), r in rows.items() if t == target and not g.startswith("AutoFlow")),
        default=-math.inf,
    )
    if not row["elbo"] >= pyro_best - 2 * row["elbo_se"]:
        misses.append(f"ELBO below Pyro's best ({pyro_best:.2f})")
    if row["dim"] <= STEP_RATIO_MAX_DIM and not row["step_ratio"] <= STEP_RATIO_GOAL:
        misses.append(f"step time > {STEP_RATIO_GOAL}× AutoNormal")
    return misses


SUMMARY = [  # (key, title, format, marks the best guide as)
    ("khat", "PSIS k̂ (lower is better; < 0.7 usable, < 0.5 good)", "{:.2f}", min),
    ("elbo", "ELBO (higher is better)", "{:.2f}", max),
    ("max_mean_error", "max \\|Δmean\\| / reference sd", "{:.2f}", min),
    ("min_sd_ratio", "min sd ratio to the reference", "{:.2f}", None),
    ("max_sd_ratio", "max sd ratio to the reference", "{:.2f}", None),
    ("step_ratio", "time per step / AutoNormal's", "{:.2f}", None),
]


def summary(results: list[dict], targets: list[str]) -> str:
    r"""Returns a Markdown grid per metric: targets by guides, medians over seeds, best bold."""
    rows = median_over_seeds(results)
    guides = list(dict.fromkeys(g for (_, g) in rows))
    lines = []
    for key, title, fmt, best in SUMMARY:
        lines += [f"### {title}", "", "| target | D | " + " | ".join(guides) + " |"]
        lines.append("|---" * (len(guides) + 2) + "|")
        for target in targets:
            found = {g: rows[(target, g)] for g in guides if (target, g) in rows}
            if not found:
                continue
            values = {g: r[key] for g, r in found.items() if not r["errors"]}
            finite = [v for v in values.values() if np.isfinite(v)]
            top = best(finite) if best and finite else None
            cells = []
            for g in guides:
                text = _cell(values.get(g, math.nan), fmt)
                cells.append(f"**{text}**" if top is not None and values.get(g) == top else text)
            dim = next(iter(found.values()))["dim"]
            lines.append(f"| {target} | {dim} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def markdown(results: list[dict], descriptions: dict[str, str], header: str) -> str:
    r"""Returns the Markdown report: a summary, one table per target and the goals missed."""
    rows = median_over_seeds(results)
    lines = [
        header,
        "",
        "## Summary (medians over seeds)",
        "",
        summary(results, list(descriptions)),
    ]
    for target, description in descriptions.items():
        guides = [g for (t, g) in rows if t == target]
        if not guides:
            continue
        lines += [f"## {target}", "", f"{description}.", ""]
        lines.append("| guide | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 1) + "|")
        for guide in guides:
            row = rows[(target, guide)]
            cells = [_cell(row[k], f) for k, _, f in COLUMNS]
            if row["errors"]:
                cells = [f"failed: {row['errors'][0]}"] + [""] * (len(COLUMNS) - 1)
            lines.append(f"| {guide} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Goals of issue 5 not met (AutoFlowGuide)", ""]
    for target in descriptions:
        for guide in [g for (t, g) in rows if t == target and g.startswith("AutoFlowGuide")]:
            misses = goal_misses(target, guide, rows)
            if misses:
                lines.append(f"- {target}, {guide}: " + "; ".join(misses))
    return "\n".join(lines) + "\n"


def write_json(results: list[dict], settings: dict, path: Path) -> None:
    r"""Writes every result (all seeds) and the run's settings as JSON."""
    path.write_text(json.dumps({"settings": settings, "results": results}, indent=1))


def plot_marginals(target: str, reference: dict, fits: dict, path: Path) -> None:
    r"""Plots each guide's marginals (first seed) over the reference histogram."""
    import matplotlib.pyplot as plt

    names = list(reference)[:MAX_MARGINALS]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ref = reference[name]
        low, high = np.quantile(ref, [0.005, 0.995])
        bins = np.linspace(low, high, 50)
        ax.hist(ref, bins=bins, density=True, color="0.8", label="reference")
        for guide, columns in fits.items():
            if name in columns:
                density, _ = np.histogram(columns[name], bins=bins, density=True)
                ax.step(bins[:-1], density, where="post", lw=1, label=guide)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(target, fontsize=10)
    fig.tight_layout()
    # Beside the panels, not over the first one.
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_elbo_traces(target: str, traces: dict[str, np.ndarray], path: Path) -> None:
    r"""Plots each guide's ELBO trace (running mean over a fiftieth of the steps)."""
    import matplotlib.pyplot as plt

    from .metrics import running_mean

    fig, ax = plt.subplots(figsize=(7, 4))
    finals = []
    for guide, trace in traces.items():
        smooth = running_mean(trace, max(10, len(trace) // 50))
        ax.plot(np.arange(1, len(trace) + 1), smooth, lw=1, label=guide)
        tail = smooth[len(smooth) // 2 :]
        finals += list(tail[np.isfinite(tail)])
    if finals:
        top = max(finals)
        ax.set_ylim(max(min(finals), top - 50) - 5, top + 2)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (running mean)")
    ax.set_title(target)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
