"""What the examples share: their command line, a summary table and two kinds of figure.

Not part of the library; each example imports it from its own folder.
"""

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

import matplotlib

if "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")  # scripts write PNG files; no window is needed

import matplotlib.pyplot as plt
import numpy as np
import pyro
from pyro.infer import Trace_ELBO

from pyro_flows import diagnose, fit, to_inference_data
from pyro_flows.plots import plot_elbo, plot_khat

COLOURS = {"AutoNormal": "tab:orange", "AutoFlowGuide": "tab:blue"}


def parser(doc: str, num_steps: int, num_samples: int = 4000) -> argparse.ArgumentParser:
    """The options every example has: steps, draws, seed and the figure folder."""
    p = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-steps", type=int, default=num_steps, help="SVI steps per guide")
    p.add_argument("--num-samples", type=int, default=num_samples, help="posterior draws")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="figures", help="folder for the figures")
    p.add_argument("--no-figures", action="store_true", help="print only")
    return p


def fit_guides(
    model: Callable,
    guides: dict[str, Callable],
    args: argparse.Namespace,
    *data: object,
    lr: float = 0.003,
) -> tuple[dict, dict, dict]:
    """Fits every guide with one recipe and seed: Adam, vectorized particles.

    Returns the fits (``FitResult``), the diagnoses and the ArviZ ``InferenceData`` of each.
    """
    results, diagnoses, idatas = {}, {}, {}
    for name, make_guide in guides.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = make_guide()
        results[name] = fit(
            model,
            guide,
            *data,
            num_steps=args.num_steps,
            optim=pyro.optim.Adam({"lr": lr}),
            loss=Trace_ELBO(num_particles=args.num_particles, vectorize_particles=True),
            progress_bar=False,
        )
        diagnoses[name] = diagnose(model, guide, *data, num_samples=args.num_samples)
        idatas[name] = to_inference_data(guide, *data, num_samples=args.num_samples)
    return results, diagnoses, idatas


def posterior(idata: object, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The draws of the named sites, shape ``(S, ...)`` (the one chain dropped)."""
    return {k: idata.posterior[k].values[0] for k in names}


def scalars(draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Splits every array of shape ``(S, ...)`` into its scalar columns, named ``x[i]``."""
    out = {}
    for name, value in draws.items():
        value = np.asarray(value)
        flat = value.reshape(len(value), -1)
        if flat.shape[1] == 1:  # a scalar site, possibly with a trailing plate of size 1
            out[name] = flat[:, 0]
            continue
        for j, index in enumerate(np.ndindex(*value.shape[1:])):
            out[f"{name}[{','.join(map(str, index))}]"] = flat[:, j]
    return out


def table(draws: dict[str, dict[str, np.ndarray]], names: list[str] | None = None) -> str:
    """Mean and sd of every scalar, one column pair per method, as aligned text."""
    columns = {method: scalars(d) for method, d in draws.items()}
    first = next(iter(columns.values()))
    names = list(first) if names is None else names
    width = max(14, *(len(m) + 2 for m in columns))
    lines = [f"{'':12s}" + "".join(f"{m:>{width}s}" for m in columns)]
    lines.append(f"{'':12s}" + "".join(f"{'mean     sd':>{width}s}" for _ in columns))
    for name in names:
        cells = ""
        for column in columns.values():
            v = column.get(name)
            text = "-" if v is None else f"{v.mean():8.3g} {v.std():6.3g}"
            cells += f"{text:>{width}s}"
        lines.append(f"{name:12s}{cells}")
    return "\n".join(lines)


def _is_reference(method: str) -> bool:
    return method.split(" ")[0] in ("NUTS", "exact", "reference")


def plot_marginals(
    draws: dict[str, dict[str, np.ndarray]], names: list[str], title: str = ""
) -> plt.Figure:
    """One panel per scalar: a histogram of each method's draws, the reference as a black line.

    The axes fit the reference where there is one; a guide far narrower than it is cut off at
    the top (its spike would otherwise flatten everything else).
    """
    columns = {method: scalars(d) for method, d in draws.items()}
    ncols = min(len(names), 4)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    palette = iter(["tab:green", "tab:purple", "tab:brown", "tab:pink"])
    colours = {
        m: COLOURS.get(m) or ("black" if _is_reference(m) else next(palette)) for m in columns
    }
    for ax, name in zip(axes.flat, names, strict=False):
        references = [c[name] for m, c in columns.items() if _is_reference(m) and name in c]
        basis = references or [c[name] for c in columns.values() if name in c]
        low, high = np.quantile(np.concatenate(basis), [0.002, 0.998])
        low, high = low - 0.1 * (high - low), high + 0.1 * (high - low)
        bins = np.linspace(low, high, 50)
        top = 0.0
        for method, column in columns.items():
            if name not in column:
                continue
            reference = _is_reference(method)
            # Densities over all draws, also those outside the axes.
            counts, _ = np.histogram(column[name], bins=bins)
            heights = counts / (len(column[name]) * np.diff(bins))
            ax.stairs(
                heights,
                bins,
                fill=not reference,
                alpha=1.0 if reference else 0.4,
                lw=1.5,
                color=colours[method],
                label=method,
            )
            if reference or not references:
                top = max(top, float(np.max(heights)))
        if top > 0:
            ax.set_ylim(0, 1.5 * top)
        ax.set_xlim(low, high)
        ax.set_title(name)
        ax.set_yticks([])
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_fits(results: dict, diagnoses: dict, title: str = "") -> plt.Figure:
    """ELBO traces (top) and k-hat (bottom), one column per guide."""
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 5), squeeze=False)
    for j, (name, result) in enumerate(results.items()):
        plot_elbo(result, ax=axes[0, j])
        axes[0, j].set_title(f"{name}: ELBO {result.elbo():.2f}")
        plot_khat(diagnoses[name], ax=axes[1, j])
        axes[1, j].set_title(f"{name}: {axes[1, j].get_title()}")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, args: argparse.Namespace, name: str) -> Path | None:
    """Writes the figure to ``<output>/<name>.png`` (unless ``--no-figures``) and closes it."""
    path = None
    if not args.no_figures:
        folder = Path(args.output)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        print(f"saved {path}")
    plt.close(fig)
    return path
