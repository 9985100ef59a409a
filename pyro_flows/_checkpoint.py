r"""Training state: snapshots for roll-back, and checkpoint files that load without unpickling.

A checkpoint holds only tensors, numbers, strings, and lists, tuples and dicts of them, so it
loads with :py:`torch.load(path, weights_only=True)`: opening a checkpoint never runs code.
"""

__all__ = ["read_checkpoint", "save_checkpoint"]

import glob
import os
import pickletools
import random
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.optim import PyroOptim
from torch import Tensor

FORMAT = "pyro_flows.fit/1"
_LEAVES = (Tensor, bool, int, float, str, type(None))


def clone(obj: Any) -> Any:
    r"""Copies the tensors of a nested structure of dicts, lists and tuples."""

    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {key: clone(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(clone(value) for value in obj)
    return obj


def check_safe(obj: Any, where: str = "checkpoint") -> None:
    r"""Raises a :py:`TypeError` naming the first entry that `weights_only` loading rejects."""

    if isinstance(obj, _LEAVES):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where} has a key of type {type(key).__name__}: {key!r}")
            check_safe(value, f"{where}[{key!r}]")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            check_safe(value, f"{where}[{i}]")
    else:
        raise TypeError(
            f"{where} is a {type(obj).__name__}, which cannot be stored in a checkpoint that "
            "loads with torch.load(weights_only=True); use an optimizer and scheduler whose "
            "state dicts hold only tensors and numbers"
        )


def get_rng_state() -> dict[str, Any]:
    r"""Returns the states of Python's, NumPy's and torch's global generators as safe types."""

    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "random": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    r"""Restores generator states from :func:`get_rng_state`."""

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_names(params: Iterable[Tensor]) -> dict[str, Tensor]:
    r"""Maps unconstrained parameter tensors to their names in Pyro's param store."""

    store = pyro.get_param_store()
    named = {store.param_name(p): p for p in params}
    return dict(sorted(named.items()))


def get_state(params: Mapping[str, Tensor], optim: PyroOptim) -> dict[str, Any]:
    r"""Copies parameter values and optimizer state (see :func:`optim_state`)."""

    values = {name: p.detach().clone() for name, p in params.items()}
    return {"params": values, "optim": clone(optim_state(optim))}


def set_state(
    params: Mapping[str, Tensor],
    optim: PyroOptim,
    state: Mapping[str, Any],
    lr_factor: float = 1.0,
) -> None:
    r"""Writes a state from :func:`get_state` back, scaling every learning rate by `lr_factor`.

    Parameter values are copied in place, so tensors that modules and optimizers hold stay
    valid. The optimizers are dropped and Pyro re-creates them on the next step from the
    restored state (the mechanism of :py:`PyroOptim.set_state`).
    """

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optim_state = clone(state["optim"])
    if lr_factor != 1.0:
        for entry in optim_state.values():
            scale_lr(entry, lr_factor)
    optim.optim_objs.clear()
    optim.grad_clip.clear()
    optim._state_waiting_to_be_consumed.clear()
    optim.set_state(optim_state)


def scale_lr(entry: dict[str, Any], factor: float) -> None:
    r"""Scales the learning rates in one parameter's optimizer (and scheduler) state dict."""

    optimizer = entry.get("optimizer", entry)
    for group in optimizer["param_groups"]:
        for key in ("lr", "initial_lr"):
            if isinstance(group.get(key), float | int):
                group[key] = group[key] * factor
    scheduler = entry.get("scheduler", {})
    for key in ("base_lrs", "_last_lr"):
        if isinstance(scheduler.get(key), list):
            scheduler[key] = [lr * factor for lr in scheduler[key]]


def module_buffers(*modules: object) -> dict[str, Tensor]:
    r"""Collects the buffers of the arguments that are torch modules (flow permutations, ...)."""

    buffers = {}
    for i, module in enumerate(modules):
        if isinstance(module, torch.nn.Module):
            for name, buffer in module.named_buffers():
                buffers[f"{i}.{name}"] = buffer
    return buffers


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    r"""Writes `state` to `path` atomically: to a temporary file first, then renamed.

    Temporary files that processes killed while writing left next to `path` are removed.
    """

    path = Path(path)
    check_safe(state)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state, format=FORMAT), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _remove_stale(path)


def _remove_stale(path: Path) -> None:
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    r"""Reads a checkpoint (see :func:`pyro_flows.load_checkpoint`); a clear
    :py:`ValueError` for a file that is not one, is truncated, or asks to unpickle code."""

    try:
        _check_crc(path)
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(_unreadable(os.fspath(path), error)) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{os.fspath(path)!r} was not written by pyro_flows.fit (format {FORMAT!r})"
        )
    return state


def _check_crc(path: str | os.PathLike) -> None:
    # torch.load does not check the CRC-32 of each record of its zip file: changed bytes in a
    # tensor would load as wrong numbers.
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"record {bad!r} fails its CRC-32 check")


def _pickled_globals(path: str) -> list[str]:
    r"""Names the code (module globals) that a pickle asks for, reading it without running it."""

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[0]) if names else b""
        else:
            data = Path(path).read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a cut or garbled pickle: keep what was read
        pass
    return [name for name in found if name.split(".")[0] not in ("torch", "collections")]


def _unreadable(path: str, error: Exception) -> str:
    text = str(error)
    what = "delete it, pass another path, or pass resume=False to overwrite it"
    code = re.search(r"GLOBAL ([\w.]+)", text)
    code = [code.group(1)] if code is not None else _pickled_globals(path)
    if code:
        return (
            f"{path!r} asks to unpickle code ({', '.join(code)}), which torch.load with "
            "weights_only=True refuses: a checkpoint of pyro_flows.fit holds only tensors and "
            "numbers, so this file was written by something else or altered. Do not load it "
            f"with weights_only=False unless you trust its source; {what}"
        )
    reason = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
    return (
        f"{path!r} is truncated or corrupted: torch.load cannot read it "
        f"({type(error).__name__}: {reason or 'the file ends early'}). Checkpoints are written "
        f"to a temporary file and renamed, so a crash while writing does not do this; {what}"
    )


def guide_signature(guide: object) -> dict[str, Any]:
    r"""Returns what a checkpoint must match beyond parameter shapes.

    The latent sites of a Pyro autoguide (names and shapes, from its prototype trace), and
    the flow configuration of a guide with a ``flow_config`` (family and options; not
    ``init``, ``init_scale`` or ``stl``, which a resumed fit may change).
    """

    signature: dict[str, Any] = {}
    trace = getattr(guide, "prototype_trace", None)
    if trace is not None:
        signature["latents"] = {
            name: list(site["value"].shape) for name, site in trace.iter_stochastic_nodes()
        }
    config = getattr(guide, "flow_config", None)
    if isinstance(config, Mapping):
        signature["config"] = {
            key: value if _is_safe(value) else repr(value)
            for key, value in config.items()
            if key not in ("init", "init_scale", "stl")
        }
    return signature


def _is_safe(obj: Any) -> bool:
    try:
        check_safe(obj)
    except TypeError:
        return False
    return True


def signature_problems(current: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    r"""Describes how two :func:`guide_signature` results differ (checkpoints before it: none)."""

    return [
        f"written for {what} {dict(saved[key])}, but this model and guide have "
        f"{dict(current[key])}"
        for key, what in (("latents", "latent sites"), ("config", "flow configuration"))
        if key in current and key in saved and current[key] != saved[key]
    ]


def optim_state(optim: PyroOptim) -> dict[str, Any]:
    r"""Pyro's :py:`optim.get_state()`, plus states loaded but not yet claimed by a step."""

    return {**optim._state_waiting_to_be_consumed, **optim.get_state()}


def check_match(
    current: Mapping[str, Tensor],
    saved: Mapping[str, Tensor],
    what: str,
    path: str | None,
    problems: Iterable[str] = (),
) -> None:
    r"""Raises a :py:`ValueError` unless `saved` has the names and shapes of `current`.

    Other `problems` found (see :func:`signature_problems`) are reported first.
    """

    missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    problems = list(problems)
    problems += [f"{what} not in the checkpoint: {missing}"] if missing else []
    problems += [f"{what} not created by the model and guide: {extra}"] if extra else []
    for name in sorted(set(current) & set(saved)):
        if current[name].shape != saved[name].shape:
            shapes = f"{tuple(saved[name].shape)} saved, {tuple(current[name].shape)} now"
            problems.append(f"{what} {name!r} has shape {shapes}")
    if problems:
        raise ValueError(
            f"the checkpoint {path!r} does not match this model and guide ("
            + "; ".join(problems)
            + "): pass the same model, guide and arguments, or another checkpoint path "
            "(resume=False overwrites it)"
        )
