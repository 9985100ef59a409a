"""Fits one guide to one target with plain SVI and measures it against the reference."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_flows import diagnose, fit

from .draws import latent_names, scalar_columns
from .metrics import marginal_errors, steps_to_within, summarize_marginals
from .targets.base import Target

TRACE_POINTS = 200  # points of the ELBO trace kept in the JSON


@dataclass(frozen=True)
class Recipe:
    r"""The optimisation recipe shared by every guide of a run.

    Arguments:
        steps: SVI steps.
        lr: Adam learning rate.
        particles: Vectorized ELBO particles per step.
        draws: Guide draws for the ELBO, IW-ELBO, k-hat and the marginals.
        iw_particles: Particles of the importance-weighted ELBO.
        trainer: ``"svi"``: a plain SVI loop (Adam at `lr`, `Trace_ELBO` with `particles`,
            vectorized when more than one); ``"fit"``: `pyro_flows.fit` with its defaults
            (Adam 0.01, one particle, parameters averaged over the last 20% of the steps),
            `lr` and `particles` unused.
    """

    steps: int = 5000
    lr: float = 0.003
    particles: int = 8
    draws: int = 4000
    iw_particles: int = 100
    trainer: str = "svi"


@dataclass
class Fit:
    r"""What one fit produced: the metrics (JSON-ready) and, for plots, draws and ELBO trace."""

    metrics: dict
    columns: dict[str, np.ndarray]
    elbo_trace: np.ndarray


def rss_mb() -> float:
    r"""Returns the resident memory of this process in MB (Linux; else the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def latent_dim(target: Target) -> int:
    r"""Returns the number of scalar latent coordinates of a target."""
    draws = target.reference(1)
    return sum(int(np.prod(np.shape(draws[name])[1:])) for name in latent_names(target))


def _train(target: Target, guide: object, recipe: Recipe) -> dict:
    if recipe.trainer == "fit":
        return _train_with_fit(target, guide, recipe)
    elbo = Trace_ELBO(
        num_particles=recipe.particles,
        vectorize_particles=recipe.particles > 1,
        max_plate_nesting=target.max_plate_nesting,
    )
    svi = SVI(target.model, guide, Adam({"lr": recipe.lr}), elbo)
    losses, times = np.full(recipe.steps, np.nan), np.full(recipe.steps, np.nan)
    start_rss = peak_rss = rss_mb()
    start, error = time.perf_counter(), None
    for step in range(recipe.steps):
        losses[step] = svi.step(*target.args)
        times[step] = time.perf_counter() - start
        if not math.isfinite(losses[step]):
            error = f"non-finite loss at step {step}"
            break
        if step % 20 == 0:
            peak_rss = max(peak_rss, rss_mb())
    return {"losses": losses, "times": times, "error": error, "rss": (start_rss, peak_rss)}


def _train_with_fit(target: Target, guide: object, recipe: Recipe) -> dict:
    losses, times = np.full(recipe.steps, np.nan), np.full(recipe.steps, np.nan)
    start_rss = peak_rss = rss_mb()
    start = time.perf_counter()

    def record(step: int, loss: float) -> None:
        nonlocal peak_rss
        losses[step], times[step] = loss, time.perf_counter() - start
        if step % 20 == 0:
            peak_rss = max(peak_rss, rss_mb())

    result = fit(target.model, guide, *target.args, num_steps=recipe.steps, callback=record)
    error = None if result.stop_reason == "completed" else result.stop_reason
    return {"losses": losses, "times": times, "error": error, "rss": (start_rss, peak_rss)}


def _step_ms(times: np.ndarray) -> float:
    """The median step time in ms, leaving out the first step (it sets the guide up)."""
    durations = np.diff(times[np.isfinite(times)])
    return float(np.median(durations) * 1e3) if len(durations) else math.nan


def fit_guide(
    target: Target, build: Callable[[Callable], object], recipe: Recipe, seed: int
) -> Fit:
    r"""Fits a guide to a target and measures the result.

    Arguments:
        target: The target.
        build: A guide constructor, `model -> guide`.
        recipe: The optimisation recipe.
        seed: Seeds Pyro, torch and numpy before the guide is built.

    Returns:
        The metrics, the guide's draws (one column per scalar) and the per-step ELBO trace.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = build(target.model)
    train = _train(target, guide, recipe)
    elbo_trace = -train["losses"]
    metrics = {
        "seed": seed,
        **asdict(recipe),
        "dim": latent_dim(target),
        "num_params": sum(p.numel() for p in guide.parameters()),
        "ms_per_step": _step_ms(train["times"]),
        "setup_s": float(train["times"][0]),
        "train_s": float(np.nanmax(train["times"])),
        **_start_metrics(guide),
        "error": train["error"],
    }
    if train["error"] is not None:
        return Fit(metrics, {}, elbo_trace)
    with torch.no_grad():
        diagnosis = diagnose(
            target.model,
            guide,
            *target.args,
            num_samples=recipe.draws,
            iw_particles=(recipe.iw_particles,),
            max_plate_nesting=target.max_plate_nesting,
        )
    start_rss, peak_rss = train["rss"]
    steps = steps_to_within(elbo_trace, diagnosis.elbo)
    columns = scalar_columns({k: v.double().numpy() for k, v in diagnosis.samples.items()})
    reference = scalar_columns(target.reference(None, seed=10_000 + seed))
    errors = marginal_errors(columns, reference)
    metrics |= {
        "elbo": diagnosis.elbo,
        "elbo_se": diagnosis.elbo_se,
        "iwelbo": diagnosis.iwelbo[recipe.iw_particles],
        "iwelbo_se": diagnosis.iwelbo_se[recipe.iw_particles],
        "khat": diagnosis.khat,
        **summarize_marginals(errors),
        "steps_to_1nat": steps,
        "seconds_to_1nat": None if steps is None else float(train["times"][steps - 1]),
        "peak_rss_mb": max(peak_rss, rss_mb()) - start_rss,
        "marginals": errors,
        "elbo_trace": _thin(elbo_trace).tolist(),
    }
    return Fit(metrics, columns, elbo_trace)


def _start_metrics(guide: object) -> dict:
    """The start of an AutoFlowGuide: how, its time and log-density evaluations."""
    start = getattr(guide, "start", None)
    if start is None:
        return {"start": None, "start_s": 0.0, "start_evaluations": 0}
    return {"start": start.how, "start_s": start.seconds, "start_evaluations": start.evaluations}


def _thin(trace: np.ndarray) -> np.ndarray:
    """Running means of the trace at `TRACE_POINTS` evenly spaced steps."""
    edges = np.linspace(0, len(trace), min(TRACE_POINTS, len(trace)) + 1).astype(int)
    return np.array([trace[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)])
