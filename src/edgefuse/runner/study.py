"""The study's shared context and the one path every stage takes through the cache and the progress display.

Why one path: a stage is looked up in the cache by (kind, name, inputs); a miss gets a work directory, runs,
and is stored with its result and wall time. Training is no exception: its stages only differ in that a
trainer may run several of them in one call (`Study.stages` with ``together``), so edges on remote devices
train at the same time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgefuse.config import StudyConfig
from edgefuse.data.mmlu import select
from edgefuse.runner.cache import StageCache
from edgefuse.ui import StudyProgress


def _ignore(*args, **kwargs) -> None:
    pass


@dataclass
class Pending:
    """A stage that was not in the cache: its identity, its work directory, and the result once it ran."""

    name: str
    inputs: Any
    total: int | None = None  # units of work, for its progress bar
    work: Path = Path()  # set by `Study.stages` before the stage runs
    advance: Callable[..., None] = _ignore
    result: dict | None = None  # None after running: the stage delivered nothing and stays unfinished


class ReadOnlyDict(dict):
    """A dict that refuses changes (a study input once fixed); still a dict for JSON and for cache keys."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("the study's inputs are fixed once its data is prepared (Study.fix_inputs)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse


class ReadOnlyList(list):
    """A list that refuses changes (a study input once fixed)."""

    _refuse = ReadOnlyDict._refuse
    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __iadd__ = __imul__ = _refuse


# What the data steps (`Walk` steps ``data`` and ``task_data``) prepare and every later stage only reads.
PREPARED = ("cfg", "run_dir", "dataset", "split_spec", "base_fingerprint", "mmlu_items", "file_hashes", "tasks",
            "cd_docs", "cd_hashes", "precision")


@dataclass
class Study:
    """Everything the stages share: config, data, base model, cache and progress.

    The inputs (`PREPARED`) are written by the data steps and then fixed (`fix_inputs`); what stages hand on to
    later ones (the model with or without an adapter, embeddings, Gram directory, edges left out) stays writable."""

    cfg: StudyConfig
    run_dir: Path
    cache: StageCache
    progress: StudyProgress
    dataset: Any = None
    split_spec: Any = None
    model: Any = None
    tokenizer: Any = None
    base_fingerprint: str = ""
    mmlu_items: list = field(default_factory=list)
    file_hashes: dict[str, str] = field(default_factory=dict)  # sha256 of each data.choices file, by name
    tasks: list = field(default_factory=list)  # the study's edgefuse.tasks.base.Task objects, in evaluation order
    cd_docs: dict[int, dict] = field(default_factory=dict)
    cd_hashes: dict[int, str] = field(default_factory=dict)
    embeddings: dict[str, dict] = field(default_factory=dict)  # edge → its adapter's retrieval embedding record
    missing_edges: list[dict] = field(default_factory=list)  # edges a (federated) trainer could not deliver
    precision: Any = None  # edgefuse.precision.Precision: device and dtype of the base model, pruning and training
    grams_dir: Path | None = None  # the grams stage's Gram directory (`edgefuse.runner.interference`), when collected
    grams_hash: str | None = None  # sha256 of its grams.json (which holds every domain file's sha256)
    grams_summary: dict = field(default_factory=dict)
    interference: list[dict] = field(default_factory=list)  # each fused model's interference record

    def __setattr__(self, name: str, value: Any) -> None:
        if name in PREPARED and self.__dict__.get("_fixed"):
            raise AttributeError(f"Study.{name} is fixed once the study's data is prepared (Study.fix_inputs)")
        object.__setattr__(self, name, value)

    def fix_inputs(self) -> None:
        """Make the study's inputs read-only: after the data steps every stage reads them and none may change them,
        so a stage's result depends on what its key says and not on what an earlier stage did to shared state."""
        for name in ("mmlu_items", "tasks"):
            object.__setattr__(self, name, ReadOnlyList(getattr(self, name)))
        for name in ("file_hashes", "cd_docs", "cd_hashes"):
            object.__setattr__(self, name, ReadOnlyDict(getattr(self, name)))
        object.__setattr__(self, "_fixed", True)

    @property
    def inputs_fixed(self) -> bool:
        return bool(self.__dict__.get("_fixed"))

    def stages(self, kind: str, wanted: list[Pending], run: Callable[[list[Pending]], None],
               together: bool = False, label: str = "") -> dict[str, tuple[Path, dict]]:
        """(stage dir, result) by name for each ``wanted`` stage: from the cache, or by ``run`` on the misses.

        ``run(pending)`` sets each one's ``result`` (None: not delivered, left unfinished). With ``together``
        the misses go to one ``run`` call under one progress line ``label`` (``{n}``: how many); otherwise one each."""
        out: dict[str, tuple[Path, dict]] = {}
        todo: list[Pending] = []
        for p in wanted:
            hit = self.cache.lookup(kind, p.name, p.inputs)
            if hit is not None:
                out[p.name] = hit
                self.progress.stage_done(p.name, "cached")
                continue
            p.work = self.cache.begin(kind, p.name, p.inputs)
            todo.append(p)
        groups = [todo] if together and len(todo) > 1 else [[p] for p in todo]
        for group in groups:
            alone = len(group) == 1
            if alone:
                group[0].advance = self.progress.stage(group[0].name, group[0].total)
            else:
                self.progress.stage((label or kind + " {n} stages").format(n=len(group)), None)
            t0 = time.perf_counter()
            run(group)
            for p in group:
                if p.result is not None:
                    final = self.cache.finish(kind, p.name, p.inputs, p.result, time.perf_counter() - t0)
                    out[p.name] = (final, p.result)
                if alone:
                    self.progress.stage_done()
                else:
                    self.progress.stage_done(p.name, "finished" if p.name in out else "left out")
        return out

    def stage(self, spec, inputs: Any, fn: Callable[[Path, Callable], dict],
              total: int | None = None) -> tuple[Path, dict]:
        """One stage of the plan (``spec``: its ``kind`` and ``name``, a `edgefuse.runner.plan.StageSpec` or a task's
        `PlannedData`): ``fn(work_dir, advance) -> result`` unless the cache has it."""

        def run(group: list[Pending]) -> None:
            [p] = group
            p.result = fn(p.work, p.advance)

        return self.stages(spec.kind, [Pending(spec.name, inputs, total)], run)[spec.name]

    def task(self, name: str):
        """The study's task of that name (`edgefuse.tasks.base.Task`)."""
        return next(t for t in self.tasks if t.name == name)

    def data_inputs(self) -> dict:
        """The data settings as stage inputs; with ``data.choices`` files, their sha256 too (an edited file is new
        data). A study without files keeps the keys it had before they existed."""
        return self.cfg.data.model_dump() | ({"files": self.file_hashes} if self.file_hashes else {})

    def items_of(self, split: str, domains: list[str] | None = None):
        return select(self.dataset, split, domains, None, None, self.cfg.data.split_seed, self.split_spec)
