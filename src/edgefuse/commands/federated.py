"""``edgefuse federated …``: the study with the edges on Flower (simulation here; deployment via ``flwr run``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgefuse.errors import EdgefuseError
from edgefuse.federated.simulate import simulate
from edgefuse.report.console import print_summary

federated_app = typer.Typer(help="Run the study with edges as Flower clients (see docs/federated.md).",
                            no_args_is_help=True)


@federated_app.command("simulate")
def simulate_cmd(
    config: Path = typer.Argument(..., help="Study config (YAML), e.g. configs/federated-tiny.yaml."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Output directory (default: runs/<config "
                                           "name>-federated)."),
    min_edges: int = typer.Option(0, "--min-edges", min=0, help="Finish the study when at least this many edges "
                                  "delivered a package, leaving the others out (0 = every edge must)."),
    timeout: float = typer.Option(0, "--timeout", min=0, help="Seconds to wait for the edges' packages per round "
                                  "(0 = no limit)."),
    force: Optional[str] = typer.Option(None, "--force", help="Redo this stage kind and all after it: data, prune, "
                                        "train, recover, grams, fuse, embed, eval."),
    cpus_per_edge: int = typer.Option(1, "--cpus-per-edge", min=1, help="CPUs Ray gives each virtual edge."),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, help="At most this many edges train at once, "
                                           "each in its own process with its own copy of the model (default: all)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Do not draw progress bars."),
):
    """Run the study on Flower's simulation engine, one virtual SuperNode per configured edge."""
    from edgefuse.runner.cache import KINDS  # local: torch-backed, kept off the CLI start-up path (+94 ms on `edgefuse --help`, measured)

    if force is not None and force not in KINDS:
        raise EdgefuseError(f"--force {force!r}: unknown stage kind; valid: {', '.join(KINDS)}")
    run_dir = run_dir or Path("runs") / f"{config.stem}-federated"
    doc = simulate(config, run_dir, min_edges=min_edges, timeout=timeout, force=force,
                   show_progress=not no_progress, cpus_per_edge=cpus_per_edge, parallel=parallel)
    print_summary(doc, run_dir, "federated simulation")


def register(app: typer.Typer) -> None:
    """Add ``edgefuse federated`` to the app."""
    app.add_typer(federated_app, name="federated")
