r"""The statistics of log importance weights behind a :class:`pyro_flows.Diagnosis`."""

__all__ = [
    "khat_threshold",
    "pareto_smooth",
]

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

TRUST, CARE, DISTRUST = "trust", "use with care", "do not trust"
FLAT = 0.01  # log weights all within this many nats: constant weights, k-hat = -inf
MIN_ESS = 100
ROUNDING = 16  # draws within this many epsilons (of the largest) count as equal


def khat_threshold(num_samples: int) -> float:
    r"""Returns the sample-size-aware k-hat threshold :math:`\min(1 - 1 / \log_{10} S, 0.7)`.

    Arguments:
        num_samples: The number of draws :math:`S`.

    Example:
        >>> round(khat_threshold(1000), 3), khat_threshold(4000)
        (0.667, 0.7)

    References:
        | Pareto Smoothed Importance Sampling (Vehtari et al., 2024)
        | https://arxiv.org/abs/1507.02646
    """

    return min(1 - 1 / math.log10(num_samples), 0.7) if num_samples > 1 else -math.inf


def constant(draws: Tensor) -> bool:
    r"""Whether every draw equals the first, up to rounding.

    Draws computed in vectorized runs of different sizes differ in their last bits (a
    point estimate's simplex draws by one ulp, say), so floating-point draws count as equal
    within :data:`ROUNDING` machine epsilons of the site's largest magnitude.

    Example:
        >>> constant(torch.tensor([0.3, 0.3 + 3e-8])), constant(torch.tensor([0.3, 0.31]))
        (True, False)
    """

    if not draws.is_floating_point():
        return bool((draws == draws[:1]).all())
    tolerance = ROUNDING * torch.finfo(draws.dtype).eps * draws.abs().max()
    return bool(((draws - draws[:1]).abs() <= tolerance).all())


def tied_tail(finite: np.ndarray, n: int) -> bool:
    r"""Whether the largest weights (the tail PSIS fits) take at most 4 distinct values.

    Rounding makes the weights of an (almost) exact guide take few distinct values; when the
    largest ones tie, PSIS has no tail to fit and ArviZ reports infinity. Tied largest
    weights are the opposite of a heavy tail: the weights are bounded.
    """

    tail = int(math.ceil(min(n / 5, 3 * math.sqrt(n))))
    return len(finite) > tail and len(np.unique(np.sort(finite)[-tail:])) <= 4


def pareto_smooth(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    r"""Returns ArviZ's Pareto-smoothed, normalized log weights and their k-hat.

    The draws are independent (``r_eff = 1``). ArviZ 0.x's ``arviz.psislw`` takes log
    importance ratios; ArviZ 1.x's ``arviz_stats`` version takes log-likelihoods and negates
    them, so it is given the negated log weights.

    Arguments:
        log_weights: Finite log weights, shape :py:`(S,)`, float64.

    Example:
        >>> log_weights = np.random.default_rng(0).normal(size=1000)
        >>> smoothed, khat = pareto_smooth(log_weights)
        >>> round(float(np.logaddexp.reduce(smoothed)), 6), khat < 0.5
        (0.0, True)

    References:
        | Pareto Smoothed Importance Sampling (Vehtari et al., 2024)
        | https://arxiv.org/abs/1507.02646
    """

    import arviz

    with np.errstate(over="ignore"):  # ArviZ's GPD fit overflows harmlessly
        if hasattr(arviz, "psislw"):
            smoothed, khat = arviz.psislw(log_weights, reff=1.0)
        else:
            from arviz_stats.base import array_stats

            smoothed, khat = array_stats.psislw(-log_weights, r_eff=1.0)
    smoothed = np.asarray(smoothed, dtype=np.float64)
    return smoothed - np.logaddexp.reduce(smoothed), float(khat)


def psis(lw: np.ndarray) -> dict[str, Any]:
    r"""Returns the k-hat (threshold), ESS, ELBO (and error) and smoothed log weights."""

    n = len(lw)
    finite = lw[np.isfinite(lw)]
    stats = {
        "khat_threshold": khat_threshold(n),
        "elbo": float(np.mean(lw)) if not np.isnan(lw).any() else math.nan,
        "elbo_se": float(np.std(lw, ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
    }
    if np.isnan(lw).any() or np.isposinf(lw).any() or len(finite) == 0:
        nan = np.full(n, np.nan)
        return stats | {"khat": math.nan, "ess": math.nan, "psis_log_weights": nan}
    if np.ptp(finite) < FLAT:
        smoothed, khat = lw - np.logaddexp.reduce(lw), -math.inf
    else:
        smoothed, khat = pareto_smooth(lw)
        khat = khat if not tied_tail(finite, n) else -math.inf
    ess = float(1.0 / np.sum(np.exp(2 * smoothed)))
    return stats | {"khat": khat, "ess": ess, "psis_log_weights": smoothed}


def iwelbo(
    lw: np.ndarray, num_particles: Sequence[int]
) -> tuple[dict[int, float], dict[int, float]]:
    r"""Returns the IW-ELBO per :math:`K`, from :math:`S / K` groups, and its standard error."""

    values, errors = {}, {}
    for k in num_particles:
        groups = len(lw) // k
        bounds = np.logaddexp.reduce(lw[: groups * k].reshape(groups, k), axis=1) - math.log(k)
        values[k] = float(np.mean(bounds))
        errors[k] = float(np.std(bounds, ddof=1) / math.sqrt(groups)) if groups > 1 else math.nan
    return values, errors


def verdict(
    lw: np.ndarray, stats: dict[str, Any], nonfinite: dict[str, int], point: bool
) -> tuple[str, str]:
    r"""Returns the verdict and its reason (see :func:`pyro_flows.diagnose`)."""

    khat, threshold, ess = stats["khat"], stats["khat_threshold"], stats["ess"]
    if point:
        return DISTRUST, (
            "every draw of the guide is the same point (a point estimate such as AutoDelta): "
            "it is not a posterior approximation, and importance weights cannot judge it."
        )
    if math.isnan(khat) and np.isneginf(lw).all():
        return DISTRUST, (
            f"all {len(lw)} log weights are -inf: every draw falls where the model's density is "
            "zero; the guide's mass lies outside the model's support."
        )
    if math.isnan(khat):
        sites = ", ".join(f"{name!r} ({count} values)" for name, count in nonfinite.items())
        where = f" at sites {sites}" if sites else ""
        return DISTRUST, (
            f"{int(np.sum(~np.isfinite(lw) & ~np.isneginf(lw)))} of {len(lw)} log weights are "
            f"NaN or +inf: the model or guide has a non-finite log-density{where}."
        )
    zero = int(np.isneginf(lw).sum())
    note = f" {zero} draws fall where the model's density is zero." if zero else ""
    if khat > threshold:
        return DISTRUST, (
            f"k-hat = {khat:.2f} exceeds {threshold:.2f}, the threshold for "
            f"{len(lw)} draws: the weights have a heavy tail, so neither the guide nor "
            "PSIS-corrected estimates are reliable. Fit longer, or use a more flexible guide."
            + note
        )
    if khat > 0.5:
        return CARE, (
            f"k-hat = {khat:.2f} is between 0.5 and {threshold:.2f}: the guide is a rough "
            "approximation; PSIS-corrected draws (Diagnosis.resample) are usable." + note
        )
    if ess < min(MIN_ESS, len(lw) / 2):
        return CARE, (
            f"k-hat = {khat:.2f} is fine but the effective sample size is only {ess:.0f}: "
            "estimates from these draws are noisy; draw more (num_samples)." + note
        )
    shown = "-inf (the largest weights are equal)" if khat == -math.inf else f"{khat:.2f}"
    return TRUST, f"k-hat = {shown} <= 0.5: the guide is close to the posterior." + note
