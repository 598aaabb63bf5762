"""``edgefuse run CONFIG.yaml``: the whole study with a stage cache, ending in a report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgefuse.commands.options import device_option, dtype_option
from edgefuse.errors import EdgefuseError
from edgefuse.report.console import print_summary
from edgefuse.ui import console


def run(
    config: Path = typer.Argument(..., help="Study config (YAML); see configs/quick.yaml."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where stages, logs and the report go "
                                           "(default: runs/<config name>)."),
    force: Optional[str] = typer.Option(None, "--force", help="Redo this stage kind and all after it: "
                                        "data, prune, train, recover, grams, fuse, embed, eval."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Do not draw progress bars."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages, which are done, and the estimated "
                                 "duration of the rest; run nothing."),
    device: Optional[str] = device_option(),
    dtype: Optional[str] = dtype_option("Dtype of the base weights in pruning, training and scoring (overrides "
                                        "the config's dtype)"),
):
    """Prune, train every edge, recover, fuse (± LoRA-CR), evaluate on MMLU and MMLU-CD, write a report."""
    from edgefuse.config import load_config  # local: torch-backed, kept off the CLI start-up path (+53 ms on `edgefuse --help`, measured)
    from edgefuse.runner import run_study  # local: torch-backed, kept off the CLI start-up path (+85 ms on `edgefuse --help`, measured)
    from edgefuse.runner.cache import KINDS  # local: torch-backed, kept off the CLI start-up path (+94 ms on `edgefuse --help`, measured)

    cfg = load_config(config)
    overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    cfg = cfg.model_copy(update=overrides)  # checked with the config's own keys when the study starts
    if force is not None and force not in KINDS:
        raise EdgefuseError(f"--force {force!r}: unknown stage kind; valid: {', '.join(KINDS)}")
    run_dir = run_dir or Path("runs") / config.stem
    if dry_run:
        from edgefuse.runner.estimate import estimate_study, plan_table  # local: torch-backed, kept off the CLI start-up path (+97 ms on `edgefuse --help`, measured)
        from edgefuse.models import count_parameters, load_model  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)

        cfg.precision()  # a device or dtype this machine cannot run fails the dry run too
        stages = estimate_study(cfg, run_dir, count_parameters(load_model(cfg.model)[0]), force)
        typer.echo(plan_table(stages))
        if cfg.max_minutes is not None:
            typer.echo(f"max_minutes: {cfg.max_minutes:g}")
        return

    def announce(stages) -> None:
        from edgefuse.runner.estimate import remaining_seconds  # local: torch-backed, kept off the CLI start-up path (+97 ms on `edgefuse --help`, measured)

        todo = sum(not s.done for s in stages)
        console.print(f"{todo} of {len(stages)} stages to run, estimated {remaining_seconds(stages) / 60:.0f} min")

    doc = run_study(cfg, run_dir, force=force, show_progress=not no_progress, on_estimate=announce)
    print_summary(doc, run_dir)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
