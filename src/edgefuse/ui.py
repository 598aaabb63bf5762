"""Console output shared by commands: rich tables and progress bars (on stderr, so stdout stays clean)."""

from __future__ import annotations

import contextlib
from typing import Iterator

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
