r"""Plots of a fit's ELBO trace and of a diagnosis' k-hat."""

__all__ = [
    "plot_elbo",
    "plot_khat",
]

import math
from typing import Any

import numpy as np

BANDS = [  # (upper end, colour, label)
    (0.5, "tab:green", "trust"),
    (None, "tab:orange", "use with care"),
    (math.inf, "tab:red", "do not trust"),
]


def _axes(ax: Any) -> Any:
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6, 3))
    return ax


def plot_elbo(result: Any, ax: Any = None, window: int | None = None) -> Any:
    r"""Plots the ELBO of every step of a fit, and its running mean.

    The vertical axis starts near the lowest running mean after the first tenth of the
    steps, so the early steps do not flatten the rest.

    Arguments:
        result: A :class:`pyro_flows.FitResult`.
        ax: Matplotlib axes. If :py:`None`, new ones.
        window: The running-mean window in steps. If :py:`None`, a fiftieth of the steps.

    Returns:
        The axes.

    Example:
        >>> from pyro_flows import FitResult
        >>> ax = plot_elbo(FitResult(losses=[5.0, 4.0, 3.5, 3.4, 3.4]))
        >>> ax.get_xlabel()
        'step'
    """

    ax = _axes(ax)
    elbo = -np.asarray(result.losses, dtype=float)
    steps = np.arange(len(elbo))
    window = max(1, len(elbo) // 50) if window is None else window
    ax.plot(steps, elbo, color="tab:blue", alpha=0.3, lw=0.5, label="ELBO")
    if len(elbo) >= window:
        running = np.convolve(elbo, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], running, color="tab:blue", label=f"mean of {window}")
        late = running[len(running) // 10 :]
        finite = late[np.isfinite(late)]
        if len(finite) and np.isfinite(elbo).any():
            low, high = finite.min(), np.nanmax(elbo[np.isfinite(elbo)])
            ax.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO")
    ax.legend(loc="lower right")
    return ax


def plot_khat(diagnosis: Any, ax: Any = None) -> Any:
    r"""Plots a diagnosis' Pareto k-hat against the verdict bands.

    Green up to 0.5 (trust), orange up to the sample-size threshold (use with care), red
    above it (do not trust); the title gives the verdict.

    Arguments:
        diagnosis: A :class:`pyro_flows.Diagnosis`.
        ax: Matplotlib axes. If :py:`None`, new ones.

    Returns:
        The axes.

    Example:
        >>> import torch
        >>> from pyro_flows import Diagnosis
        >>> d = Diagnosis.from_log_weights(torch.randn(1000) * 0.1, {})
        >>> plot_khat(d).get_xlabel()
        'Pareto k-hat'
    """

    ax = _axes(ax)
    khat, threshold = diagnosis.khat, diagnosis.khat_threshold
    shown = khat if math.isfinite(khat) else (-0.5 if khat < 0 else 1.5)
    left, right = min(-0.5, shown - 0.1), max(1.5, shown + 0.1)
    start = left
    for end, colour, label in BANDS:
        end = threshold if end is None else min(end, right)
        if end > start:
            ax.axvspan(start, end, color=colour, alpha=0.25, label=label)
        start = max(start, end)
    ax.axvline(shown, color="black", lw=2)
    ax.annotate(
        f"k-hat = {khat:.2f}",
        (shown, 0.5),
        xytext=(5, 0),
        textcoords="offset points",
        va="center",
    )
    ax.set_xlim(left, right)
    ax.set_yticks([])
    ax.set_xlabel("Pareto k-hat")
    ax.set_title(f"{diagnosis.verdict} (S = {diagnosis.num_samples}, ESS = {diagnosis.ess:.0f})")
    ax.legend(loc="upper left", fontsize="small")
    return ax
