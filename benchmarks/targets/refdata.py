"""Locates and reads the posteriordb reference posteriors (`../shared/refdata`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .base import Target

ENV_VAR = "PYRO_FLOWS_REFDATA"


class MissingReferenceData(FileNotFoundError):
    r"""Raised when a posteriordb posterior's files are not on this machine."""


def refdata_dir() -> Path:
    r"""Returns the folder of reference posteriors.

    It is `$PYRO_FLOWS_REFDATA` when set, else `../shared/refdata` next to the repository.
    """
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "shared" / "refdata"


def posterior_dir(posterior: str) -> Path:
    r"""Returns the folder of one posterior, raising `MissingReferenceData` when absent.

    Arguments:
        posterior: The posteriordb name, e.g. `"sblri-blr"`.
    """
    path = refdata_dir() / posterior
    if not (path / "data.json").is_file() or not (path / "reference.npz").is_file():
        raise MissingReferenceData(
            f"reference posterior {posterior!r} not found under {path.parent} "
            f"(set {ENV_VAR} to the folder holding posteriordb reference posteriors)"
        )
    return path


def load_data(posterior: str) -> dict:
    r"""Returns the model data of a posterior (`data.json`)."""
    return json.loads((posterior_dir(posterior) / "data.json").read_text())


def load_summary(posterior: str) -> dict:
    r"""Returns the reference summaries of a posterior (`summary.json`)."""
    return json.loads((posterior_dir(posterior) / "summary.json").read_text())


def load_reference(posterior: str, num_draws: int | None = None) -> dict[str, np.ndarray]:
    r"""Returns the reference draws of a posterior keyed by parameter name, float64.

    Arguments:
        posterior: The posteriordb name.
        num_draws: Keep this many draws, evenly spaced over all chains; `None` keeps all.
    """
    with np.load(posterior_dir(posterior) / "reference.npz") as npz:
        draws = {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files if k[0] != "_"}
    if num_draws is not None:
        total = len(next(iter(draws.values())))
        rows = np.linspace(0, total - 1, min(num_draws, total)).round().astype(int)
        draws = {k: v[rows] for k, v in draws.items()}
    return draws


def stored_reference(posterior: str):
    r"""Returns a `draw_reference(num_draws, seed)` function reading a posterior's draws."""

    def draw(num_draws: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        return load_reference(posterior, num_draws)

    return draw


def posteriordb_target(
    posterior: str, description: str, model, args: tuple, max_plate_nesting: int = 0
) -> Target:
    r"""Returns the target of a posteriordb port, its draws read from `reference.npz`."""
    return Target(
        name=posterior,
        description=description,
        model=model,
        args=args,
        draw_reference=stored_reference(posterior),
        max_plate_nesting=max_plate_nesting,
        posterior=posterior,
    )
