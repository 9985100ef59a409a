r"""Whether to trust a fitted guide: PSIS k-hat, ESS, ELBO and IW-ELBO, importance resampling."""

__all__ = [
    "Diagnosis",
    "diagnose",
]

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .importance import importance
from .weights import constant, iwelbo, psis, verdict

NUM_PARTICLES = (1, 10, 100)  # the IW-ELBO's numbers of particles K, by default


def default_particles(num_samples: int) -> tuple[int, ...]:
    r"""Returns the default numbers of particles :math:`K`: 1, 10 and 100, those
    :math:`\le S`.

    Example:
        >>> default_particles(4000), default_particles(50)
        ((1, 10, 100), (1, 10))
    """

    return tuple(k for k in NUM_PARTICLES if k <= num_samples)


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
        num_particles: Sequence[int] | None = None,
        vectorized: bool = True,
        nonfinite: dict[str, int] | None = None,
    ) -> "Diagnosis":
        r"""Diagnoses precomputed log weights (see :func:`pyro_flows.log_importance_weights`).

        Arguments:
            log_weights: The log weights, shape :py:`(S,)`.
            samples: The draws they belong to, per site, shape :py:`(S, *site_shape)`.
            num_particles: The numbers of particles :math:`K` of the IW-ELBO estimates. If
                :py:`None`, 1, 10 and 100, those :math:`\le S`.
            vectorized: Whether the draws were computed in vectorized passes.
            nonfinite: Per site, the number of NaN or :math:`+\infty` log-density values.
        """

        lw = log_weights.detach().double().cpu().reshape(-1).numpy()
        if num_particles is None:
            num_particles = default_particles(len(lw))
        with np.errstate(invalid="ignore"):  # NaN and -inf weights give NaN statistics
            stats = psis(lw)
            stats["iwelbo"], stats["iwelbo_se"] = iwelbo(lw, num_particles)
        nonfinite = nonfinite or {}
        point = bool(samples) and len(lw) > 1 and all(constant(v) for v in samples.values())
        stats["verdict"], stats["reason"] = verdict(lw, stats, nonfinite, point)
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
    num_particles: Sequence[int] | int | None = None,
    max_plate_nesting: int | None = None,
    chunk_size: int | None = None,
    vectorize: bool | None = None,
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
        num_particles: The numbers of particles :math:`K` of the IW-ELBO estimates; each
            uses the :math:`S` draws as :math:`S / K` groups. If :py:`None`, 1, 10 and 100,
            those :math:`\le S`.
        max_plate_nesting: The number of nested plates in the model. If :py:`None`, found by
            tracing the model once.
        chunk_size: The number of draws per vectorized pass (see
            :func:`pyro_flows.log_importance_weights`).
        vectorize: What to do with a model that does not broadcast over draws: if
            :py:`None`, warn and compute the draws one at a time; if :py:`True`, raise a
            :py:`ValueError`; if :py:`False`, compute them one at a time without trying.
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

    if num_particles is None:
        num_particles = default_particles(num_samples)
    if isinstance(num_particles, int):
        num_particles = (num_particles,)
    for k in num_particles:
        if not isinstance(k, int) or not 1 <= k <= num_samples:
            raise ValueError(
                f"num_particles must hold integers between 1 and num_samples={num_samples}, "
                f"got {k!r}"
            )
    options = {"max_plate_nesting": max_plate_nesting, "chunk_size": chunk_size}
    found, vectorized, nonfinite = importance(
        model, guide, args, kwargs, num_samples, vectorize=vectorize, **options
    )
    return Diagnosis.from_log_weights(*found, num_particles, vectorized, nonfinite)
