"""The tasks a study can evaluate on, by kind: built-in ones with their own ``benchmarks`` section (MMLU, MMLU-CD),
and kinds a config names under ``benchmarks.tasks`` (any number of each, by name).

Adding a benchmark is one task module (a `edgefuse.tasks.base.Task` and its settings) and one `TaskKind` entry
here; the runner, the estimator and the report loop over `study_tasks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from edgefuse.tasks.base import Task, TaskSettings
from edgefuse.tasks.choices import ChoicesBench, ChoicesTask
from edgefuse.tasks.choices_cd import ChoicesCDBench, ChoicesCDTask
from edgefuse.tasks.mmlu import MMLUTask
from edgefuse.tasks.mmlu_cd import MMLUCDTask


@dataclass(frozen=True)
class TaskKind:
    """A kind of task a config names under ``benchmarks.tasks``: its settings and how to build one by name."""

    settings: type[TaskSettings]
    build: Callable[..., Task]  # (name, settings, data config) → the task


KINDS: dict[str, TaskKind] = {
    "choices": TaskKind(ChoicesBench, ChoicesTask),
    "choices_cd": TaskKind(ChoicesCDBench, ChoicesCDTask),
}

# names a configured task may not take: the results keys and summary fields of every evaluated model
RESERVED = ("label", "format", "metric", "mmlu", "cd")  # "cd": a mixture's MMLU-CD stage name (runner.names)
NAME = re.compile(r"[a-z][a-z0-9_]*")


def task_settings(name: str, entry) -> TaskSettings:
    """One ``benchmarks.tasks`` entry validated against its kind's settings (pydantic errors name the field)."""
    if not NAME.fullmatch(name) or name.startswith(RESERVED):
        raise ValueError(f"task name {name!r}: use lower-case letters, digits and _, not starting with "
                         f"{', '.join(RESERVED)}")
    kind = entry.get("kind") if isinstance(entry, dict) else getattr(entry, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"task {name!r}: unknown kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind].settings.model_validate(entry if isinstance(entry, dict) else entry.model_dump())


def study_tasks(benchmarks, stage_name: Callable[[int], str], data=None) -> list[Task]:
    """The study's tasks in evaluation order: MMLU, MMLU-CD (each when enabled), then ``benchmarks.tasks`` in
    config order. ``stage_name``: MMLU-CD's build stage name by k (`edgefuse.runner.names.cd_build`); ``data``: the
    study's data settings (a task may score a ``data.choices`` file's test split)."""
    tasks: list[Task] = []
    if benchmarks.mmlu.enabled:
        tasks.append(MMLUTask(benchmarks.mmlu))
    if benchmarks.mmlu_cd.enabled:
        tasks.append(MMLUCDTask(benchmarks.mmlu_cd, stage_name))
    for name, settings in benchmarks.tasks.items():
        tasks.append(KINDS[settings.kind].build(name, settings, data))
    return tasks

