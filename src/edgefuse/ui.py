"""Console output shared by commands: rich tables and progress bars (on stderr, so stdout stays clean)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from edgefuse.evaluate.stats import fmt_ci

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, disable: bool = False) -> Iterator:
    """Yield ``advance(k, total=None, **info)``; draws a bar with count, elapsed and remaining time.

    With ``total=None`` the bar appears at the first ``advance`` call (``advance(0, total=N)``), so work that
    can still be refused on its inputs (a fusion) prints nothing but its one error line.
    """
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, disable=disable, transient=False)
    task = None

    def advance(k: int = 1, total: int | None = None, **fields) -> None:
        nonlocal task
        if task is None:
            prog.start()
            task = prog.add_task(description, total=total, info="")
        elif total is not None:
            prog.update(task, total=total)
        prog.update(task, advance=k, **({"info": " ".join(f"{a}={b}" for a, b in fields.items())} if fields else {}))

    if total is not None:
        advance(0, total=total)
    try:
        yield advance
    finally:
        if task is not None:
            prog.stop()


class StudyProgress:
    """A study's progress: one overall bar (stage i of N, elapsed, remaining) and one for the current stage's work.

    When stderr is not a terminal (a log file, CI, ``| tee``) bars would draw nothing until the end, so each stage
    prints one plain line on stdout when it starts and one when it finishes instead."""

    def __init__(self, total_stages: int, enabled: bool = True):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=err_console, disable=not enabled)
        self.overall = self.progress.add_task("study", total=total_stages, info="")
        self.current = None
        self.n_done = 0
        self.total = total_stages
        self.plain = enabled and not err_console.is_terminal
        self.started = 0.0
        self.name = ""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def _line(self, name: str, what: str) -> None:
        if self.plain:
            print(f"{time.strftime('%H:%M:%S')} stage {self.n_done + 1}/{self.total} {name}: {what}", flush=True)

    def stage(self, name: str, total: int | None) -> Callable[..., None]:
        """Start stage ``name``; returns its ``advance(k=1, total=None, **info)``."""
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.progress.update(self.overall, description=f"study: stage {self.n_done + 1} of {self.total}")
        self.current = self.progress.add_task(f"  {name}", total=total, info="")
        self.name, self.started = name, time.perf_counter()
        self._line(name, "started")

        def advance(k: int = 1, total: int | None = None, **fields) -> None:
            if total is not None:
                self.progress.update(self.current, total=total)
            info = " ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in fields.items())
            self.progress.update(self.current, advance=k, **({"info": info} if info else {}))

        return advance

    def stage_done(self, name: str | None = None, note: str | None = None) -> None:
        """``name``/``note`` for a stage that had no `stage` call of its own (a cached or batch-trained one)."""
        self._line(name or self.name, note or f"finished in {time.perf_counter() - self.started:.0f} s")
        self.n_done += 1
        self.progress.update(self.overall, advance=1)


def accuracy_table(title: str, acc: dict, subjects: bool = True) -> Table:
    """Overall / category / subject accuracy with 95% intervals."""
    t = Table(title=title)
    t.add_column("group")
    t.add_column("n", justify="right")
    t.add_column("accuracy % [95% CI]", justify="right")
    t.add_row("[bold]overall", str(acc["overall"]["n"]), fmt_ci(acc["overall"]))
    for k, v in acc["categories"].items():
        t.add_row(f"category: {k}", str(v["n"]), fmt_ci(v))
    if subjects:
        for k, v in acc["subjects"].items():
            t.add_row(f"  {k}", str(v["n"]), fmt_ci(v))
    return t


def layer_grid(title: str, layers: list[str], types: list[str], cell: Callable[[str, str], str]) -> Table:
    """A layer × module-type table (``edgefuse conflicts``' grids), each cell ``cell(layer, type)``."""
    table = Table(title=title)
    table.add_column("layer")
    for ty in types:
        table.add_column(ty, justify="right")
    for layer in layers:
        table.add_row(layer, *(cell(layer, ty) for ty in types))
    return table
