"""``edgefuse run`` and the Flower ServerApp's entry: lock the run directory, load the model, estimate, run the
stages under deterministic algorithms with a log file, and write the report.

With ``rounds.count`` > 1 each round's edges start from the previous round's fused adapter. The Flower apps
(`edgefuse.federated`) run this same study with a `FlowerTrainer`, so a federated study and a single-process
study with the same seeds produce the same adapters and scores.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

from edgefuse.config import StudyConfig
from edgefuse.errors import EdgefuseError
from edgefuse.io import atomic_write_json, writing
from edgefuse.models import count_parameters, fingerprint, load_model
from edgefuse.report import write_report
from edgefuse.runlock import run_lock, stale_note
from edgefuse.runner.cache import StageCache
from edgefuse.runner.estimate import estimate_study, remaining_seconds
from edgefuse.runner.interference import interference_doc
from edgefuse.runner.plan import plan_tasks
from edgefuse.runner.study import Study
from edgefuse.runner.trainers import LocalTrainer, Trainer
from edgefuse.runner.walk import walk
from edgefuse.ui import StudyProgress

log = logging.getLogger("edgefuse.run")


class RunLogHandler(logging.FileHandler):
    """``run.log``, dropping what it cannot write: on a full disk the stage writing next stops the run with one
    line naming its file, which a traceback per log record (logging's default) would bury."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


def setup_logging(run_dir: Path) -> logging.Handler:
    with writing(run_dir / "run.log", always=True):
        run_dir.mkdir(parents=True, exist_ok=True)
        h = RunLogHandler(run_dir / "run.log", encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("edgefuse")
    root.setLevel(logging.INFO)
    root.addHandler(h)
    return h


@contextlib.contextmanager
def deterministic(seed: int = 0):
    """The whole study under torch's deterministic algorithms, with every global RNG seeded at its start.

    Each stage also seeds its own generators from the study's seeds (training, pruning, fusion), so a resumed run
    draws the same numbers as one from scratch; the global seeding here is only a safety net. ``warn_only``: an
    operation torch has no deterministic kernel for warns instead of failing the study. The previous setting is
    restored afterwards, so a library caller's process is left as it was."""
    import os
    import random

    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it (CUDA ≥ 10.2)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def run_study(cfg: StudyConfig, run_dir: str | Path, force: str | None = None, show_progress: bool = True,
              trainer: Trainer | None = None, on_estimate: Callable[[list], None] | None = None) -> dict:
    """Run (or resume) the whole study; returns the results document also written to ``results.json``.

    ``trainer`` trains the edges that are not cached (default: `LocalTrainer`, in this process); the Flower
    ServerApp passes one that sends the jobs to real or simulated edges, and whose devices report their own
    memory budgets (`Trainer.device_budgets`), which become those edges' pruning budgets.
    Before any stage runs, the remaining duration is estimated (`edgefuse.runner.estimate`), checked against
    ``max_minutes`` and handed to ``on_estimate``; results.json keeps it beside the measured wall times.
    One run at a time per run directory: a second one is refused at once (`edgefuse.runlock`). The study runs
    under `deterministic`: the same config run twice from scratch gives the same adapters and scores.
    """
    with run_lock(run_dir) as stale, deterministic(cfg.seeds[0] if cfg.seeds else 0):
        return _run_locked(cfg, Path(run_dir), force, show_progress, trainer or LocalTrainer(), on_estimate, stale)


def _run_locked(cfg: StudyConfig, run_dir: Path, force: str | None, show_progress: bool, trainer: Trainer,
                on_estimate: Callable[[list], None] | None, stale: dict | None) -> dict:
    """`run_study` while this process holds the run directory's lock (``stale``: a dead run's lock it took over)."""
    t0 = time.perf_counter()
    precision = cfg.precision()  # an unreachable device or a dtype it cannot run fails here, before any work
    if hasattr(trainer, "check"):
        trainer.check(cfg)
    budgets = trainer.device_budgets(list(cfg.edges))
    if budgets:
        cfg = cfg.with_device_budgets(budgets)
    model, tokenizer = load_model(cfg.model, device=precision.device, dtype=precision.dtype)
    tasks = plan_tasks(cfg)
    stages = estimate_study(cfg, run_dir, count_parameters(model), force, tasks)  # the plan this run walks
    remaining = remaining_seconds(stages)
    if cfg.max_minutes is not None and remaining > 60 * cfg.max_minutes:  # before anything is written
        raise EdgefuseError(f"the study's estimated duration is {remaining / 60:.0f} min, more than its "
                            f"max_minutes {cfg.max_minutes:g} (see `edgefuse run --dry-run`)")
    if on_estimate is not None:
        on_estimate(stages)
    handler = setup_logging(run_dir)
    try:
        if stale is not None:
            log.warning(stale_note(stale, run_dir))
        if budgets:
            log.info("memory budgets reported by the edge devices (GiB): %s; the config sets the pruning of %s",
                     budgets, sorted(set(budgets) & set(cfg.edge_pruning)) or "none of them")
        log.info("estimated duration of the %d stages to run: %.1f min", sum(not s.done for s in stages), remaining / 60)
        atomic_write_json(run_dir / "config.json", cfg.model_dump())
        log.info("study %s in %s", cfg.name, run_dir)
        with StudyProgress(len(stages), enabled=show_progress) as progress:
            st = Study(cfg, run_dir, StageCache(run_dir, force), progress, precision=precision, tasks=tasks)
            st.model, st.tokenizer = model, tokenizer
            st.base_fingerprint = fingerprint(st.model)
            base, seeds = walk(st, [s.spec for s in stages], trainer)
        doc = {"name": cfg.name, "model": cfg.model, "base_fingerprint": st.base_fingerprint,
               "config": cfg.model_dump(), "precision": precision.as_dict(), "base": base, "seeds": seeds, "missing_edges": st.missing_edges,
               "stages": st.cache.records, "wall_s": round(time.perf_counter() - t0, 1),
               "mmlu_n": len(st.mmlu_items), "cd_n": {k: len(d["instances"]) for k, d in st.cd_docs.items()},
               "estimate": {"remaining_s": round(remaining, 1),
                            "stages": {s.name: round(s.seconds, 1) for s in stages if not s.done}}}
        columns = {key: title for task in st.tasks for key, title in task.report_columns().items()}
        if columns:  # absent otherwise, as in every results document written before configured tasks existed
            doc["task_columns"] = columns
        grams = interference_doc(st)
        if grams is not None:  # absent otherwise: a study without Grams writes the results it always wrote
            doc["interference"] = grams
        write_report(doc, run_dir)
        log.info("study finished in %.1f s", doc["wall_s"])
        return doc
    finally:
        logging.getLogger("edgefuse").removeHandler(handler)
        handler.close()
