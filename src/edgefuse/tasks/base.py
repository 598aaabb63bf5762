"""A benchmark as one object that the study's runner, its estimator and its report loop over (issue 23, item 1).

Why: MMLU and MMLU-CD were written into every layer (the runner's evaluation, the estimator's costs, the report's
columns), so a new benchmark touched about fifteen files. A `Task` owns what differs between benchmarks: its data
stages, its evaluation of one model (results files and the summary kept in results.json), its progress units and
its cost. The runner evaluates a model by asking each of the study's tasks in turn (`edgefuse.tasks.registry`).
Tasks take the study context duck-typed (``cfg``, ``tokenizer``, ``stage``, …; `edgefuse.runner.study.Study`), so
this package depends on no runner module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict


class TaskSettings(BaseModel):
    """A task's section of ``benchmarks`` in the study config; unknown keys are refused, as everywhere."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class EvalContext:
    """One model's evaluation, shared by its tasks: where results files go, the progress callback, the model's
    label, and the per-item records of questions already scored alone (MMLU's, reused by MMLU-CD's "items
    alone" instead of scoring them twice)."""

    work: Path
    advance: Callable[..., None]
    label: str
    alone: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class PlannedData:
    """A data stage a task runs before any evaluation (`Task.build_data`), as the study's plan lists it: its stage
    name, its estimated seconds, and what the task needs to know which one it is (MMLU-CD: its k)."""

    name: str
    seconds: float
    key: Any = None
    kind = "data"  # its cache kind (not a field: the same for every task's data stage)


class Task(ABC):
    """One benchmark of a study.

    ``keys``: the results keys it writes into each evaluated model's summary (``mmlu``; ``mmlu_cd_k2``, …).
    ``cross_domain``: evaluated on an edge alone only with ``benchmarks.edges_alone_cd``.
    """

    name: str = ""
    cross_domain: bool = False
    mixture: bool = False  # scored under the study's retrieval mixtures too (`evaluate_mixture`)

    def prepare(self, st) -> None:
        """Check the task's own inputs once the study's data is loaded (a bad file fails here, before any model is
        evaluated)."""

    def data_plan(self) -> list[PlannedData]:
        """The task's data stages, in the order the study runs them (`build_data`); none by default."""
        return []

    def build_data(self, st, data: PlannedData) -> None:
        """Build or load one of the data stages `data_plan` lists (through ``st.stage``, named ``data.name``)."""
        raise NotImplementedError(f"task {self.name!r} plans no data stage")

    def key_inputs(self, st) -> Any:
        """What every evaluation's cache key must add for this task beyond the config (e.g. its data file's hash),
        or None. The built-in tasks add nothing: their data is the config's and MMLU-CD's instance hashes."""
        return None

    @abstractmethod
    def keys(self) -> list[str]:
        """The results keys this task writes per evaluated model."""

    @abstractmethod
    def units(self, st) -> int:
        """Progress units of one model's evaluation (items, instances)."""

    @abstractmethod
    def work(self, n_mmlu: int) -> dict[str, float]:
        """One model's evaluation as work units by rate name (`edgefuse.runner.estimate.RATES`), before ``prepare``
        ran; ``n_mmlu``: the MMLU test items the study selects."""

    @abstractmethod
    def evaluate(self, st, model, ctx: EvalContext) -> dict[str, dict]:
        """Evaluate ``model``: results files into ``ctx.work``, summaries for results.json by key."""

    def evaluate_mixture(self, st, pool, settings, ctx: EvalContext) -> dict[str, dict]:
        """The same under a retrieval mixture over ``pool`` (`edgefuse.compose.retrieval`), each question routed
        alone; only tasks with ``mixture`` set have it."""
        raise NotImplementedError(f"task {self.name!r} is not scored under retrieval mixtures")

    def report_columns(self) -> dict[str, str]:
        """Results keys the report's generic columns show (key → column title): those of tasks whose summaries
        carry ``headline`` and ``outcomes`` (`headline_summary`). MMLU and MMLU-CD have tables of their own."""
        return {}


def headline_summary(accuracy: dict, outcomes: dict[str, int], file: str, **extra) -> dict:
    """A task's summary in the generic form the report reads: the headline accuracy with its interval
    (`edgefuse.evaluate.stats.bootstrap_ci`), per-item outcomes by id (paired intervals against the base model),
    and its results file."""
    return {"headline": accuracy, "outcomes": outcomes, "file": file, **extra}
