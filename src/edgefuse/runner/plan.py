"""The study's stage graph, written once (issue 23, item 5): `study_plan` lists every stage a study passes through,
in the order it runs, as frozen `StageSpec` records.

Why one list: the run (`edgefuse.runner.walk`) and the duration estimate (`edgefuse.runner.estimate`) used to write
the graph twice, the run as nested loops and the estimate as a parallel copy with the same stage-name f-strings, so
a stage added to one could be missing from the other. Now the estimate prices each spec of this list and the run
executes the very list the estimate priced (`run_study` walks ``[s.spec for s in estimate]``). Stage names come
from `edgefuse.runner.names` here and nowhere else in the runner (tests/test_architecture.py).

  data → each task's data stages (MMLU-CD: build per k) → base eval → (retrieval mixtures) per edge embed →
  (Grams) grams → per seed: per edge prune; per round: per edge train (one dispatch) → per edge recover → eval alone;
  (edge Grams, first round) grams-<tag>; per fused model: fuse → (Grams) interference → eval;
  after the last round: lorahub → its eval; retrieval mixtures' evaluations (MMLU per way of forming a mixture,
  MMLU-CD per mixture, each mixture-scored task per way of forming a mixture).

A spec names what its stage is about (edge, fused model, mixture, task, …); everything else a stage needs comes
from the study's config and the stages before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from edgefuse.compose.schema import LORAHUB_NAME, MixtureSettings
from edgefuse.config import CRSetting, StudyConfig
from edgefuse.runner import names
from edgefuse.runner.names import round_tag
from edgefuse.tasks.base import PlannedData, Task
from edgefuse.tasks.registry import study_tasks

# What runs a stage (`edgefuse.runner.walk.STEPS`) and prices it (`edgefuse.runner.estimate.StageCosts`).
STEPS = ("data", "task_data", "base_eval", "embed", "grams", "prune", "train", "recover", "eval_edge", "edge_grams",
         "fuse", "interference", "eval_fused", "lorahub", "eval_composed", "mixture_mmlu", "mixture_cd",
         "mixture_task")


@dataclass(frozen=True)
class StageSpec:
    """One stage of the study: its cache kind and name, the step that runs it, and what it is about."""

    kind: str
    name: str
    step: str
    seed: Optional[int] = None
    round: Optional[int] = None
    edge: Optional[str] = None
    model: Optional[str] = None  # a fused or composed model's name
    method: Optional[str] = None  # a fused model's fusion method …
    cr: Optional[CRSetting] = None  # … and LoRA-CR setting
    mixture: Optional[MixtureSettings] = None
    task: Optional[str] = None  # a task's name (its data stage, its mixture evaluation)
    data: Optional[PlannedData] = None  # a task's data stage, as the task plans it

    def __post_init__(self) -> None:
        if self.step not in STEPS:
            raise ValueError(f"unknown step {self.step!r}")


def plan_tasks(cfg: StudyConfig) -> list[Task]:
    """The study's tasks (`edgefuse.tasks.registry.study_tasks`), their data stages named as the plan names them."""
    return study_tasks(cfg.benchmarks, names.cd_build, cfg.data)


def study_plan(cfg: StudyConfig, tasks: list[Task]) -> list[StageSpec]:
    """Every stage of the study in the order it runs (``tasks``: the study's, `plan_tasks`).

    Stages the run may leave out at run time are listed too: an edge a (federated) trainer did not deliver has no
    recover or evaluation, a mixture with more adapters than delivered edges is not scored."""
    b, f = cfg.benchmarks, cfg.fusion
    out = [StageSpec("data", names.DATA, "data")]
    out += [StageSpec("data", d.name, "task_data", task=t.name, data=d) for t in tasks for d in t.data_plan()]
    out.append(StageSpec("eval", names.BASE_EVAL, "base_eval"))
    if cfg.compose.retrieval_mixture:
        out += [StageSpec("embed", names.embed(e), "embed", edge=e) for e in cfg.edges]
    edge_grams = cfg.collects_grams and cfg.interference.from_edges  # each edge's pass is part of its training
    if cfg.collects_grams and not edge_grams:
        out.append(StageSpec("grams", names.GRAMS, "grams"))
    for seed in cfg.seeds:
        out += [StageSpec("prune", names.prune(e, seed), "prune", seed=seed, edge=e) for e in cfg.edges]
        for r in range(1, cfg.rounds.count + 1):
            tag, at = round_tag(seed, r), {"seed": seed, "round": r}
            out += [StageSpec("train", names.train(e, tag), "train", edge=e, **at) for e in cfg.edges]
            for e in cfg.edges:
                out.append(StageSpec("recover", names.recover(e, tag), "recover", edge=e, **at))
                if b.edges_alone:
                    out.append(StageSpec("eval", names.eval_edge(e, tag), "eval_edge", edge=e, **at))
            if edge_grams and r == 1:  # the edges' Gram matrices gathered into the study's Gram directory
                out.append(StageSpec("grams", names.edge_grams(tag), "edge_grams", **at))
            for method, setting, model in f.fusions():
                out.append(StageSpec("fuse", names.fuse(model, tag), "fuse", model=model, method=method, cr=setting,
                                     **at))
                if cfg.collects_grams:
                    out.append(StageSpec("fuse", names.interference(model, tag), "interference", model=model, **at))
                out.append(StageSpec("eval", names.evaluation(model, tag), "eval_fused", model=model, **at))
        out += composition_plan(cfg, tasks, seed, cfg.rounds.count)
    return out


def composition_plan(cfg: StudyConfig, tasks: list[Task], seed: int, round_no: int) -> list[StageSpec]:
    """The composition stages over one seed's last round (`edgefuse.runner.composition`): LoraHub's search and
    its evaluation; per retrieval mixture, MMLU once per way of forming a request's mixture (routing does not
    matter for single questions), MMLU-CD, and each mixture-scored task once per way of forming a mixture."""
    b, c = cfg.benchmarks, cfg.compose
    tag, at = round_tag(seed, round_no), {"seed": seed, "round": round_no}
    out = []
    if c.lorahub is not None:
        out.append(StageSpec("fuse", names.composed(LORAHUB_NAME, tag), "lorahub", model=LORAHUB_NAME, **at))
        out.append(StageSpec("eval", names.evaluation(LORAHUB_NAME, tag), "eval_composed", model=LORAHUB_NAME, **at))
    seen: set[Any] = set()
    for mix in c.retrieval_mixture:
        if b.mmlu.enabled and mix.retrieval_tag not in seen:
            seen.add(mix.retrieval_tag)
            out.append(StageSpec("eval", names.mixture_mmlu(mix.retrieval_tag, tag), "mixture_mmlu", mixture=mix,
                                 **at))
        if b.mmlu_cd.enabled and b.mmlu_cd.ks:
            out.append(StageSpec("eval", names.mixture_cd(mix.name, tag), "mixture_cd", mixture=mix, **at))
        for task in tasks:
            if task.mixture and (mix.retrieval_tag, task.name) not in seen:
                seen.add((mix.retrieval_tag, task.name))
                out.append(StageSpec("eval", names.mixture_task(mix.retrieval_tag, task.name, tag), "mixture_task",
                                     mixture=mix, task=task.name, **at))
    return out
