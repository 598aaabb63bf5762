"""``edgefuse report RUN_DIR``: re-render a finished study's report from its ``results.json`` alone."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefuse.report import read_results, write_report
from edgefuse.report.console import print_summary
from edgefuse.ui import err_console


def report(
    run_dir: Path = typer.Argument(..., help="A study's run directory (it holds results.json)."),
):
    """Rewrite report.md, results.csv and the figures of RUN_DIR from RUN_DIR/results.json (nothing else is read)."""
    doc = read_results(run_dir)
    for note in write_report(doc, run_dir, results=False):
        err_console.print(note)
    print_summary(doc, run_dir)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
