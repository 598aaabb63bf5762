"""The cloud role as a Flower ServerApp (``edgefuse.federated.serverapp:app``).

It runs the very study `edgefuse run` runs (`edgefuse.runner.run_study`: prune, recover, fuse
± LoRA-CR, evaluate, report, with the same stage cache), except that edge training goes to the
SuperNodes through `FlowerTrainer`. Same seeds, same adapters, same report.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, override with ``flwr run --run-config``):
``config`` study YAML, ``run-dir`` output directory (relative paths resolve against the directory
the SuperLink was started in; give absolute ones), ``min-edges`` (0 = all), ``timeout`` seconds for
the training round (0 = none), ``wait-nodes`` seconds to wait for the SuperNodes, ``force`` a stage
kind to redo.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edgefuse.config import load_config
from edgefuse.errors import EdgefuseError
from edgefuse.federated.trainer import FlowerTrainer
from edgefuse.runner import run_study

log = logging.getLogger("edgefuse.run")

# The run config's defaults. flwr reads them from ``[tool.flwr.app.config]`` in pyproject.toml, which must hold these
# very values (tests/test_defaults.py compares the two); this copy serves callers that pass only some settings.
DEFAULTS: dict[str, Any] = {"config": "configs/federated-tiny.yaml", "run-dir": "runs/federated-tiny",
                            "min-edges": 0, "timeout": 0, "wait-nodes": 120, "force": "", "progress": False}


def run_federated_study(grid: Grid, settings: dict[str, Any]) -> dict:
    """Load the config named in ``settings`` and run the study with Flower edges; returns the results doc."""
    s = {**DEFAULTS, **settings}
    cfg = load_config(Path(str(s["config"])).expanduser())
    if int(s["min-edges"]) > len(cfg.edges):
        raise EdgefuseError(f"min-edges {s['min-edges']} exceeds the {len(cfg.edges)} edges of the study")
    trainer = FlowerTrainer(grid, min_edges=int(s["min-edges"]), timeout=float(s["timeout"]) or None,
                            wait_nodes=float(s["wait-nodes"]))
    doc = run_study(cfg, Path(str(s["run-dir"])).expanduser(), force=str(s["force"]) or None,
                    show_progress=bool(s["progress"]), trainer=trainer)
    log.info("federated study done: %s", [r for r in trainer.rounds])
    return doc


def make_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp running the study; ``overrides`` take precedence over the run config (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federated_study(grid, {**dict(context.run_config), **(overrides or {})})

    return app


app = make_server_app()
