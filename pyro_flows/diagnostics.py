r"""Whether to trust a fitted guide: PSIS k-hat, ESS, ELBO and IW-ELBO, importance resampling."""

__all__ = [
    "Diagnosis",
    "diagnose",
]

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .importance import importance, iwelbo, psis

IW_PARTICLES = (1, 10, 100)  # the IW-ELBO's numbers of particles K, by default
TRUST, CARE, DISTRUST = "trust", "use with care", "do not trust"
MIN_ESS = 100
ROUNDING = 16  # draws within this many epsilons (of the largest) count as equal


def _iw_particles(
    iw_particles: Sequence[int] | int | None,
    num_samples: int,
    num_particles: Sequence[int] | int | None = None,
) -> tuple[int, ...]:
    r"""Returns the IW-ELBO's numbers of particles :math:`K`, checked; by default 1, 10 and
    100, those :math:`\le S`. ``num_particles``, the old name, is taken with a warning.

    Example:
        >>> _iw_particles(None, 4000), _iw_particles(None, 50), _iw_particles(5, 50)
        ((1, 10, 100), (1, 10), (5,))
    """

    if num_particles is not None:
        warnings.warn(
            "num_particles= is renamed iw_particles= (the IW-ELBO's K; in Pyro, num_particles "
            "is a number of draws): the old name will be removed in the next release.",
            FutureWarning,
            stacklevel=3,
        )
        if iw_particles is not None:
            raise TypeError("give iw_particles= only (num_particles= is its old name).")
        iw_particles = num_particles
    if iw_particles is None:
        return tuple(k for k in IW_PARTICLES if k <= num_samples)
    if isinstance(iw_particles, int):
        iw_particles = (iw_particles,)
    for k in iw_particles:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_samples:
            raise ValueError(
                f"iw_particles must hold integers between 1 and num_samples={num_samples}, "
                f"got {k!r}"
            )
    return tuple(iw_particles)


@dataclass(repr=False)
class Diagnosis:
    r"""Creates the verdict of :func:`diagnose` on a guide, with the numbers behind it.

    Arguments:
        log_weights: The raw log weights :math:`\log p(x, z_s) - \log q(z_s)`, shape
            :py:`(S,)`.
        samples: The guide's draws of every latent site, constrained, shape
            :py:`(S, *site_shape)`.
        khat: The Pareto k-hat of the weights (ArviZ's PSIS); :py:`-inf` when all log weights
            lie within 0.01 nats of each other, or the largest ones tie (bounded weights).
        khat_threshold: :math:`\min(1 - 1 / \log_{10} S, 0.7)` (Vehtari et al., 2024).
        ess: The importance-sampling effective sample size of the PSIS weights.
        elbo: The ELBO estimate, the mean of the log weights.
        elbo_se: Its Monte Carlo standard error.
        iwelbo: The importance-weighted ELBO for each number of particles :math:`K`.
        iwelbo_se: Its Monte Carlo standard error, from the :math:`S / K` groups.
        verdict: :py:`"trust"`, :py:`"use with care"` or :py:`"do not trust"`.
        reason: Why, in words.
        psis_log_weights: The Pareto-smoothed, normalized log weights.
        vectorized: Whether the draws were computed in vectorized passes.
        nonfinite: Per site, the number of NaN or :math:`+\infty` log-density values.

    Example:
        >>> log_weights = torch.randn(1000) * 0.1
        >>> d = Diagnosis.from_log_weights(log_weights, {"z": torch.randn(1000)})
        >>> d.verdict
        'trust'
    """

    log_weights: Tensor
    samples: dict[str, Tensor]
    khat: float
    khat_threshold: float
    ess: float
    elbo: float
    elbo_se: float
    iwelbo: dict[int, float]
    iwelbo_se: dict[int, float]
    verdict: str
    reason: str
    psis_log_weights: Tensor
    vectorized: bool = True
    nonfinite: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_log_weights(
        cls,
        log_weights: Tensor,
        samples: dict[str, Tensor],
        iw_particles: Sequence[int] | int | None = None,
        vectorized: bool = True,
        nonfinite: dict[str, int] | None = None,
        *,
        num_particles: Sequence[int] | int | None = None,
    ) -> "Diagnosis":
        r"""Diagnoses precomputed log weights (see :func:`pyro_flows.log_importance_weights`).

        Arguments:
            log_weights: The log weights, shape :py:`(S,)`.
            samples: The draws they belong to, per site, shape :py:`(S, *site_shape)`.
            iw_particles: The numbers of particles :math:`K` of the IW-ELBO estimates. If
                :py:`None`, 1, 10 and 100, those :math:`\le S`.
            vectorized: Whether the draws were computed in vectorized passes.
            nonfinite: Per site, the number of NaN or :math:`+\infty` log-density values.
            num_particles: The old name of `iw_particles` (deprecated).
        """

        lw = log_weights.detach().double().cpu().reshape(-1).numpy()
        iw_particles = _iw_particles(iw_particles, len(lw), num_particles=num_particles)
        with np.errstate(invalid="ignore"):  # NaN and -inf weights give NaN statistics
            stats = psis(lw)
            stats["iwelbo"], stats["iwelbo_se"] = iwelbo(lw, iw_particles)
        nonfinite = nonfinite or {}
        point = bool(samples) and len(lw) > 1 and all(_constant(v) for v in samples.values())
        stats["verdict"], stats["reason"] = _verdict(lw, stats, nonfinite, point)
        stats["psis_log_weights"] = torch.as_tensor(stats["psis_log_weights"])
        return cls(
            log_weights.detach(), samples, vectorized=vectorized, nonfinite=nonfinite, **stats
        )

    @property
    def num_samples(self) -> int:
        r"""The number of draws :math:`S`."""

        return len(self.log_weights)

    def resample(self, num_draws: int | None = None) -> dict[str, Tensor]:
        r"""Returns PSIS-weighted draws: the guide's draws resampled in proportion to their
        Pareto-smoothed weights (stratified resampling), per site, constrained.

        Arguments:
            num_draws: The number of draws. If :py:`None`, :math:`S`.
        """

        num_draws = self.num_samples if num_draws is None else num_draws
        if not isinstance(num_draws, int) or num_draws < 1:
            raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
        weights = torch.exp(self.psis_log_weights - self.psis_log_weights.max())
        if not torch.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError(f"the weights are not finite ({self.reason}); nothing to resample")
        cdf = torch.cumsum(weights, 0)
        u = torch.arange(num_draws, dtype=cdf.dtype) + torch.rand(num_draws, dtype=cdf.dtype)
        index = torch.searchsorted(cdf, u / num_draws * cdf[-1]).clamp(max=len(cdf) - 1)
        return {name: value[index] for name, value in self.samples.items()}

    def to_dict(self) -> dict[str, float | int | str]:
        r"""The scalar results, flat, e.g. for ArviZ attributes."""

        out = {
            "khat": self.khat,
            "khat_threshold": self.khat_threshold,
            "ess": self.ess,
            "num_samples": self.num_samples,
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
        }
        for k in self.iwelbo:
            out[f"iwelbo_{k}"], out[f"iwelbo_{k}_se"] = self.iwelbo[k], self.iwelbo_se[k]
        return out | {"verdict": self.verdict, "reason": self.reason}

    def summary(self) -> str:
        r"""A readable table of the results, led by the verdict."""

        rows = [
            (
                "Pareto k-hat",
                f"{self.khat:.3f}",
                f"trust <= 0.5, threshold {self.khat_threshold:.3f}",
            ),
            ("ESS", f"{self.ess:.1f}", f"of {self.num_samples} draws"),
            ("ELBO", f"{self.elbo:.3f}", f"+- {self.elbo_se:.3f}"),
        ]
        for k, value in self.iwelbo.items():
            rows.append((f"IW-ELBO (K = {k})", f"{value:.3f}", f"+- {self.iwelbo_se[k]:.3f}"))
        lines = [f"Verdict: {self.verdict.upper()}. {self.reason}"]
        lines += [f"  {name:<18} {value:>12}  {note}" for name, value, note in rows]
        if not self.vectorized:
            lines.append("  (draws computed one at a time, not vectorized)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"Diagnosis(verdict={self.verdict!r}, khat={self.khat:.3f}, ess={self.ess:.1f})"

    def plot(self, ax: Any = None) -> Any:
        r"""Plots k-hat against the thresholds; see :func:`pyro_flows.plots.plot_khat`."""

        from .plots import plot_khat

        return plot_khat(self, ax=ax)


def diagnose(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 4000,
    iw_particles: Sequence[int] | int | None = None,
    max_plate_nesting: int | None = None,
    chunk_size: int | None = None,
    vectorize: bool | None = None,
    num_particles: Sequence[int] | int | None = None,
    **kwargs: Any,
) -> Diagnosis:
    r"""Judges whether a fitted guide can be trusted as the posterior of a model.

    Draws :math:`S` samples from the guide and computes the importance weights
    :math:`\log p(x, z) - \log q(z)` (:func:`pyro_flows.log_importance_weights`). The
    Pareto k-hat of their right tail (ArviZ's PSIS) gives the verdict:

    * :math:`\hat{k} \le 0.5`: trust (Yao et al., 2018), unless the ESS is below 100 (or
      below :math:`S / 2` for fewer than 200 draws): then use with care;
    * :math:`0.5 < \hat{k} \le \min(1 - 1 / \log_{10} S, 0.7)`: use with care, preferably
      through the PSIS-corrected draws of :meth:`Diagnosis.resample`;
    * above that threshold (Vehtari et al., 2024), or with NaN weights: do not trust.

    The arguments come in the order of Pyro's :class:`~pyro.infer.SVI` and
    :meth:`~pyro.infer.ELBO.loss` (model, guide, then the model's arguments), as in
    :func:`pyro_flows.fit`.

    Arguments:
        model: A Pyro model.
        guide: A fitted guide for `model`: any Pyro autoguide or guide function.
        args: Positional arguments of the model and guide.
        num_samples: The number of draws :math:`S`.
        iw_particles: The numbers of particles :math:`K` of the IW-ELBO estimates; each
            uses the :math:`S` draws as :math:`S / K` groups. If :py:`None`, 1, 10 and 100,
            those :math:`\le S`. (In Pyro's ``psis_diagnostic``, which this replaces,
            ``num_particles`` is the number of draws: here that is ``num_samples``.)
        max_plate_nesting: The number of nested plates in the model. If :py:`None`, found by
            tracing the model once.
        chunk_size: The number of draws per vectorized pass (see
            :func:`pyro_flows.log_importance_weights`).
        vectorize: What to do with a model that runs vectorized neither under a plate over
            draws nor under ``torch.func.vmap``: if
            :py:`None`, warn and compute the draws one at a time; if :py:`True`, raise a
            :py:`ValueError`; if :py:`False`, compute them one at a time without trying.
        num_particles: The old name of `iw_particles`, accepted with a ``FutureWarning``
            until the next release.
        kwargs: Keyword arguments of the model and guide.

    Returns:
        The verdict, its reason and the numbers behind it.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> guide = AutoNormal(model, init_scale=1.0)
        >>> d = diagnose(model, guide, num_samples=1000)
        >>> d.verdict, d.khat
        ('trust', -inf)

    References:
        | Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018)
        | https://arxiv.org/abs/1802.02538

        | Pareto Smoothed Importance Sampling (Vehtari et al., 2024)
        | https://arxiv.org/abs/1507.02646
    """

    if isinstance(num_samples, int) and num_samples >= 1:  # else importance() says why
        iw_particles = _iw_particles(iw_particles, num_samples, num_particles=num_particles)
    options = {"max_plate_nesting": max_plate_nesting, "chunk_size": chunk_size}
    found, vectorized, nonfinite = importance(
        model, guide, args, kwargs, num_samples, vectorize=vectorize, **options
    )
    return Diagnosis.from_log_weights(*found, iw_particles, vectorized, nonfinite)


def _constant(draws: Tensor) -> bool:
    r"""Whether every draw equals the first, up to rounding.

    Draws computed in vectorized runs of different sizes differ in their last bits (a
    point estimate's simplex draws by one ulp, say), so floating-point draws count as equal
    within :data:`ROUNDING` machine epsilons of the site's largest magnitude.

    Example:
        >>> _constant(torch.tensor([0.3, 0.3 + 3e-8])), _constant(torch.tensor([0.3, 0.31]))
        (True, False)
    """

    if not draws.is_floating_point():
        return bool((draws == draws[:1]).all())
    tolerance = ROUNDING * torch.finfo(draws.dtype).eps * draws.abs().max()
    return bool(((draws - draws[:1]).abs() <= tolerance).all())


def _verdict(
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
