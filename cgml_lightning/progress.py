"""Progress for long stages that otherwise run silently (evaluation, training the dataset classifier).

`track(iterable, description, total)` yields the items while a Rich progress bar (description, bar, M/N, elapsed,
remaining) redraws on stderr. Where stderr is not a terminal (SLURM logs, pytest), Rich draws no live updates and
prints the final bar once, when the stage ends. Inside another Rich live display on the shared console (Lightning's
RichProgressBar) the bar nests in it where Rich supports nesting; where it cannot (`LiveError`), the items come
without a bar. `CGML_PROGRESS=0` (or false / no / off) switches the bars off.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import rich
from rich.console import Console
from rich.errors import LiveError
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

T = TypeVar("T")


def enabled() -> bool:
    """Whether progress bars are on: CGML_PROGRESS unset, or anything but 0 / false / no / off."""
    return os.environ.get("CGML_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield the items of `iterable` in order, with a progress bar over `total` steps (default len(iterable) where
    it has one). Use it as `with contextlib.closing(track(...)) as items:` where the loop may break or raise, so the
    bar stops at once rather than when the generator is collected."""
    if not enabled():
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    console = rich.get_console()                   # nest in a live display there (Lightning's bar), if any
    if not (getattr(console, "_live_stack", None) or getattr(console, "_live", None)):
        console = Console(stderr=True)
        if not console.is_terminal:
            console.width = max(console.width, 120)  # a log line: room for the times after a long description
    progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        auto_refresh=console.is_terminal, redirect_stdout=False, redirect_stderr=False)
    try:
        progress.start()
    except LiveError:                              # an older Rich with another live display on this console
        yield from iterable
        return
    task, pending = progress.add_task(description, total=total), False
    try:
        for item in iterable:
            pending = True
            yield item
            pending = False
            progress.advance(task)
    finally:
        if pending:                                 # closed after the consumer took an item: it is done with it
            progress.advance(task)
        progress.stop()
