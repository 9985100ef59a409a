"""Accuracy and cost metrics of a fitted guide against reference draws (numpy only)."""

from __future__ import annotations

import numpy as np


def wasserstein_1d(x: np.ndarray, y: np.ndarray, num_quantiles: int = 2000) -> float:
    r"""Returns the 1-D Wasserstein-1 distance between two samples.

    Uses `W1 = int_0^1 |F^-1(u) - G^-1(u)| du`, with the quantile functions evaluated at
    `num_quantiles` midpoints `u = (i + 1/2) / num_quantiles`.

    Example:
        >>> x = np.random.default_rng(0).normal(size=10_000)
        >>> round(wasserstein_1d(x, x + 0.5), 6)
        0.5
    """
    u = (np.arange(num_quantiles) + 0.5) / num_quantiles
    return float(np.mean(np.abs(np.quantile(x, u) - np.quantile(y, u))))


def marginal_errors(
    guide: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    r"""Compares each scalar marginal of guide draws with the reference draws.

    Arguments:
        guide: Guide draws, one column per scalar (see `benchmarks.draws.scalar_columns`).
        reference: Reference draws with the same column names.

    Returns:
        Per column: `mean_error` (|mean difference| / reference sd), `sd_ratio` (guide sd /
        reference sd) and `wasserstein` (1-D Wasserstein distance / reference sd).
    """
    out = {}
    for name, ref in reference.items():
        draws = np.asarray(guide[name], dtype=float)
        sd = ref.std()
        out[name] = {
            "mean_error": float(abs(draws.mean() - ref.mean()) / sd),
            "sd_ratio": float(draws.std() / sd),
            "wasserstein": wasserstein_1d(draws, ref) / sd,
        }
    return out


def summarize_marginals(errors: dict[str, dict[str, float]]) -> dict[str, float]:
    r"""Returns the max and mean mean-error, min and max sd ratio and mean Wasserstein."""
    mean_error = np.array([e["mean_error"] for e in errors.values()])
    sd_ratio = np.array([e["sd_ratio"] for e in errors.values()])
    wasserstein = np.array([e["wasserstein"] for e in errors.values()])
    return {
        "max_mean_error": float(mean_error.max()),
        "mean_mean_error": float(mean_error.mean()),
        "min_sd_ratio": float(sd_ratio.min()),
        "max_sd_ratio": float(sd_ratio.max()),
        "mean_wasserstein": float(wasserstein.mean()),
    }


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    r"""Returns the mean of the last `window` values (fewer at the start) at every step."""
    values = np.asarray(values, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def steps_to_within(elbo_trace: np.ndarray, final_elbo: float, tol: float = 1.0) -> int | None:
    r"""Returns the first step whose running-mean ELBO is within `tol` nats of `final_elbo`.

    The running mean is over a fiftieth of the steps (at least 10), so that one lucky
    single-step estimate does not count.

    Returns:
        The number of steps taken (1-based), or `None` if the trace never comes that close.

    Example:
        >>> steps_to_within(np.r_[np.full(20, -10.0), np.zeros(80)], 0.0)
        29
    """
    window = max(10, len(elbo_trace) // 50)
    smooth = running_mean(elbo_trace, window)
    hits = np.flatnonzero(np.isfinite(smooth) & (smooth >= final_elbo - tol))
    return int(hits[0]) + 1 if len(hits) else None
