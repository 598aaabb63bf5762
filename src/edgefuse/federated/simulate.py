"""``edgefuse federated simulate``: the federated study on Flower's simulation engine, one virtual edge per edge.

Why: the same ServerApp and ClientApp as a real deployment, with Flower's message passing and its
Ray actors standing in for the devices, so a user can check the federation on one machine before
starting SuperNodes. Virtual node ``partition-id`` i plays the i-th edge of the config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgefuse.errors import EdgefuseError
from edgefuse.report import read_results


def backend_config(n_edges: int, cpus_per_edge: int = 1, parallel: int | None = None) -> dict[str, Any]:
    """Ray resources: one actor per edge, so that every edge trains at the same time, or ``parallel`` actors that
    take the edges' jobs in turn. Each actor is a process that loads the model: with many edges on one machine,
    ``parallel`` bounds the processes and the memory."""
    if parallel is not None and parallel < 1:
        raise EdgefuseError(f"parallel={parallel}: at least one edge must train at a time")
    actors = min(n_edges, parallel or n_edges)
    return {"client_resources": {"num_cpus": cpus_per_edge, "num_gpus": 0.0},
            "init_args": {"num_cpus": actors * cpus_per_edge, "num_gpus": 0,
                          "object_store_memory": 256 * 2**20, "logging_level": "ERROR", "log_to_driver": True}}


def simulate(config: str | Path, run_dir: str | Path, *, min_edges: int = 0, timeout: float = 0, force: str | None = None,
             show_progress: bool = False, cpus_per_edge: int = 1, parallel: int | None = None,
             client_app=None) -> dict:
    """Run the study with Flower simulation; returns the results document (also in ``run_dir``).

    ``parallel``: at most this many edges train at once (default: all; `backend_config`). ``client_app`` replaces
    the edge app (tests wrap it with Flower mods to inject faults).
    """
    from edgefuse.config import load_config  # local: torch-backed, kept off the CLI start-up path (+53 ms on `edgefuse --help`, measured)
    from edgefuse.federated.serverapp import make_server_app  # local: flwr is optional (edgefuse[federated]); +0.4 s at import, measured

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise EdgefuseError("Flower simulation needs Ray: pip install 'edgefuse[federated]' (flwr[simulation])")
    from flwr.simulation import run_simulation

    from edgefuse.federated.clientapp import make_client_app  # local: flwr is optional (edgefuse[federated]); +0.4 s at import, measured

    config, run_dir = Path(config).resolve(), Path(run_dir).resolve()
    cfg = load_config(config)
    backend_config(len(cfg.edges), cpus_per_edge, parallel)  # a bad setting fails before Flower starts
    server = make_server_app({"config": str(config), "run-dir": str(run_dir), "min-edges": min_edges,
                              "timeout": timeout, "force": force or "", "progress": show_progress,
                              "wait-nodes": 60})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server, client_app=client_app or make_client_app(), num_supernodes=len(cfg.edges),
                       backend_config=backend_config(len(cfg.edges), cpus_per_edge, parallel))
    if not (run_dir / "results.json").is_file():
        raise EdgefuseError("the simulated study ended without results (see run.log)", path=run_dir)

    return read_results(run_dir)
