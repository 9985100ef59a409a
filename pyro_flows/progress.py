r"""A progress bar with the running ELBO that stays out of non-interactive logs."""

__all__ = [
    "progress_bar",
]

import sys
from types import TracebackType
from typing import IO, Any

import tqdm
import tqdm.auto


def is_interactive(file: IO[str]) -> bool:
    r"""Whether `file` is a terminal, or the standard error of a Jupyter kernel."""

    if file is sys.stderr and "ipykernel" in sys.modules:
        return True
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class ProgressBar:
    r"""A tqdm bar over steps, with the mean ELBO of the last 100 steps as postfix."""

    def __init__(self, total: int, initial: int, file: IO[str], show: bool) -> None:
        self.bar = None
        if show:
            auto = file is sys.stderr and "ipykernel" in sys.modules
            cls = tqdm.auto.tqdm if auto else tqdm.tqdm
            self.bar = cls(total=total, initial=initial, file=file, unit="step", desc="fit")

    def advance(self, step: int, result: Any) -> None:
        r"""Moves the bar to `step` (backwards after a roll-back) and updates the ELBO."""

        if self.bar is None:
            return
        if step < self.bar.n or step % 10 == 0 or result.num_failures:
            postfix = {"elbo": f"{result.elbo():.5g}"}
            if result.num_failures:
                postfix["undone"] = result.num_failures
            self.bar.set_postfix(postfix, refresh=False)
        if step >= self.bar.n:
            self.bar.update(step - self.bar.n)
        else:
            self.bar.n = step
            self.bar.refresh()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(total: int, initial: int, file: IO[str], show: bool | None) -> ProgressBar:
    r"""Creates a bar shown if `show`, or (if `show` is :py:`None`) if `file` is interactive."""

    return ProgressBar(total, initial, file, is_interactive(file) if show is None else show)
