"""The `--start laplace` option: every guide starts at `pyro_flows.laplace_start`."""

from __future__ import annotations

import time

import pyro

from pyro_flows import LaplaceStart, laplace_start

from .guides import INIT
from .targets import Target


def find_start(target: Target) -> LaplaceStart | None:
    r"""Returns the target's Laplace start, or `None` (with a message) where it has none.

    Where `laplace_start` raises a `ValueError` (no strict maximum; eight schools centred,
    whose density grows without bound as `tau` goes to 0), the target is skipped in a
    `--start laplace` run. A funnel's mode is at its neck: it gets that (poor) start.
    """
    pyro.clear_param_store()
    began = time.perf_counter()
    try:
        start = laplace_start(target.model, *target.args, init_loc_fn=INIT)
    except ValueError as error:
        reason = str(error).splitlines()[0]
        print(f"{target.name}: skipped, no Laplace start ({reason})", flush=True)
        return None
    seconds = time.perf_counter() - began
    print(
        f"{target.name}: Laplace start in {seconds:.1f} s, {start.iterations} L-BFGS iterations",
        flush=True,
    )
    return start
