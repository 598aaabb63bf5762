"""What a command prints at the end of a study: the headline table (plain markdown, never wrapped, so it can be
pasted), the edges left out, and where the report is."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefuse.report.tables import headline_table, retrieval_line
from edgefuse.ui import console


def print_summary(doc: dict, run_dir: Path, how: str = "") -> None:
    """``how``: a few words after the study's name in the heading (e.g. ``federated simulation``)."""
    wall = f"{doc['wall_s']:.0f} s"
    console.print(f"\n[bold]Headline ({doc['name']}, {how + ', ' if how else ''}{wall})[/bold]")
    typer.echo(headline_table(doc))
    if retrieval_line(doc):
        typer.echo(retrieval_line(doc))
    for m in doc.get("missing_edges") or []:
        console.print(f"[yellow]left out: edge {m['edge']} (seed {m['seed']}): {m['reason']}[/yellow]")
    console.print(f"\nreport: {Path(run_dir) / 'report.md'}")
