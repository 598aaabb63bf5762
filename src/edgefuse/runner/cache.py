"""The stage cache: each stage's output lives in a directory keyed by a hash of its inputs and settings.

Why: a study is hours of work on a CPU. A rerun must reuse what is finished, an interrupted run must
resume at the stage it was in, and ``--force KIND`` must redo a kind of stage and everything after it.
A stage works in ``<name>-<key>.partial/`` and is renamed to ``<name>-<key>/`` with a ``stage.json`` only
when it has finished; only that final directory is ever read back. An interrupted training stage keeps its
``.partial`` (its checkpoints let the rerun resume); any other kind's ``.partial`` is deleted and redone from
scratch, since half of a fusion or an evaluation is not worth trusting.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from edgefuse.io import append_line, atomic_write_json, hash_obj, writing

# Stage kinds in dependency order: forcing one kind redoes it and every later kind. ``embed`` (each edge's
# retrieval vector, from its own examples) feeds only evaluations, so it sits just before ``eval``; ``grams``
# (the base model's Gram matrices on public prompts) feeds only fusions and their interference, so it sits just
# before ``fuse``.
KINDS = ("data", "prune", "train", "recover", "grams", "fuse", "embed", "eval")
RESUMABLE = frozenset({"train"})  # kinds whose interrupted work directory is resumed, not redone
STAGE_FILE = "stage.json"
LOG_FILE = "stages.jsonl"

log = logging.getLogger("edgefuse.run")


def finished_stage_files(run_dir: Path) -> list[Path]:
    """The ``stage.json`` of every finished stage; a ``.partial`` one (killed while being renamed) is not finished."""
    root = Path(run_dir) / "stages"
    return [m for m in sorted(root.glob(f"*/{STAGE_FILE}")) if not m.parent.name.endswith(".partial")]


class StageCache:
    def __init__(self, run_dir: Path, force: str | None = None):
        self.root = Path(run_dir) / "stages"
        with writing(self.root, always=True):
            self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(run_dir) / LOG_FILE
        self.forced = set(KINDS[KINDS.index(force):]) if force else set()
        self.records: list[dict] = []

    @staticmethod
    def key(kind: str, name: str, inputs: Any) -> str:
        return hash_obj({"kind": kind, "name": name, "inputs": inputs})[:12]

    def _log(self, rec: dict) -> None:
        self.records.append(rec)
        append_line(self.log_path, json.dumps(rec))

    def lookup(self, kind: str, name: str, inputs: Any) -> tuple[Path, dict] | None:
        """The finished stage's (dir, result), or None when it must (re)run."""
        assert kind in KINDS, kind
        key = self.key(kind, name, inputs)
        final = self.root / f"{name}-{key}"
        marker = final / STAGE_FILE
        if not marker.is_file() or kind in self.forced:
            return None
        rec = json.loads(marker.read_text())
        self._log({"stage": name, "kind": kind, "key": key, "status": "cached", "wall_s": rec["wall_s"],
                   "time": time.time()})
        log.info("stage %s: cached (%s)", name, final)
        return final, rec["result"]

    def begin(self, kind: str, name: str, inputs: Any) -> Path:
        """Create the stage's work directory; after an interruption reuse it (training) or start it afresh."""
        work = self.root / f"{name}-{self.key(kind, name, inputs)}.partial"
        if work.exists() and kind not in RESUMABLE:
            log.warning("stage %s: discarding the unfinished output of an interrupted run (%s)", name, work)
            shutil.rmtree(work)
        log.info("stage %s: %s", name, "resuming" if work.exists() else "running")
        with writing(work, always=True):
            work.mkdir(parents=True, exist_ok=True)
        return work

    def finish(self, kind: str, name: str, inputs: Any, result: dict, wall: float) -> Path:
        """Mark the work directory finished and move it into place."""
        key = self.key(kind, name, inputs)
        work, final = self.root / f"{name}-{key}.partial", self.root / f"{name}-{key}"
        atomic_write_json(work / STAGE_FILE, {"kind": kind, "name": name, "key": key, "wall_s": round(wall, 3),
                                              "inputs": inputs, "result": result})
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
        self._log({"stage": name, "kind": kind, "key": key, "status": "ran", "wall_s": round(wall, 3),
                   "time": time.time()})
        log.info("stage %s: done in %.1f s", name, wall)
        return final

    def run(self, kind: str, name: str, inputs: Any, fn: Callable[[Path], dict]) -> tuple[Path, dict]:
        """Return (stage dir, result) from the cache, or run ``fn(work_dir) -> result`` and store it."""
        hit = self.lookup(kind, name, inputs)
        if hit is not None:
            return hit
        work = self.begin(kind, name, inputs)
        t0 = time.perf_counter()
        result = fn(work)
        return self.finish(kind, name, inputs, result, time.perf_counter() - t0), result
