"""The registry of benchmark targets: a dict of named constructors."""

from __future__ import annotations

from collections.abc import Callable

from .ark import ark
from .banana import banana
from .base import Target
from .eight_schools import eight_schools_centered, eight_schools_noncentered
from .funnel import funnel
from .gaussian import gaussian
from .mixture import gauss_mix
from .refdata import MissingReferenceData
from .regression import earnings, kidiq, sblrc, sblri
from .student_t import student_t

POSTERIORDB: dict[str, Callable[[], Target]] = {
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "eight_schools-eight_schools_centered": eight_schools_centered,
    "sblri-blr": sblri,
    "sblrc-blr": sblrc,
    "arK-arK": ark,
    "earnings-logearn_interaction": earnings,
    "kidiq-kidscore_interaction": kidiq,
    "low_dim_gauss_mix-low_dim_gauss_mix": gauss_mix,
}

SYNTHETIC: dict[str, Callable[[], Target]] = {
    "funnel10": funnel,
    "banana": banana,
    "gaussian50": gaussian,
    "student_t": student_t,
}

TARGETS: dict[str, Callable[[], Target]] = {**POSTERIORDB, **SYNTHETIC}


def load_target(name: str) -> Target | None:
    r"""Builds a registered target, or prints why it is skipped and returns `None`.

    Arguments:
        name: A key of `TARGETS`.

    Returns:
        The target, or `None` when its reference data are not on this machine.

    Example:
        >>> load_target("banana").name
        'banana'
    """
    try:
        return TARGETS[name]()
    except MissingReferenceData as error:
        print(f"skipping {name}: {error}")
        return None
