"""MMLU-CD as a study task: one instance file per k, built in the study's data stages, each scored chained, with
the same items alone (the cross-domain penalty) reusing MMLU's zero-shot records."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator

from edgefuse.data.mmlu_cd import build_instances, load_benchmark, write_benchmark
from edgefuse.evaluate.mmlu_cd import evaluate_mmlu_cd
from edgefuse.io import atomic_write_json
from edgefuse.tasks.base import EvalContext, PlannedData, Task, TaskSettings

BUILD_SECONDS = 1.0  # one instance file: a seeded draw over the test split


class MMLUCDBench(TaskSettings):
    enabled: bool = True
    ks: list[int] = [2]
    n: int = Field(60, ge=1)
    domains: Optional[list[str]] = None
    single: bool = Field(True, description="also score each instance's items alone (the cross-domain penalty); "
                                           "items the MMLU evaluation already scored are reused")

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if any(k < 2 for k in v):
            raise ValueError("every k must be at least 2")
        return v


def cd_key(k: int) -> str:
    """The results key (and file stem) of the k-question instances."""
    return f"mmlu_cd_k{k}"


def cd_summary(res: dict, k: int) -> dict:
    """An MMLU-CD results document summed up for results.json: its scores and per-instance, per-answer outcomes."""
    out = {key: res[key] for key in ("strict", "per_position", "answer", "single", "penalty", "chance") if key in res}
    out["file"] = f"{cd_key(k)}.json"
    out["strict_outcomes"] = [int(inst["strict"]) for inst in res["instances"]]
    out["answer_outcomes"] = [[int(c) for c in inst["correct"]] for inst in res["instances"]]
    return out


class MMLUCDTask(Task):
    """Cross-domain instances of k MMLU questions each, for every configured k; the instances are built once per
    study from its splits (stage ``mmlu-cd-k<k>``) and kept in ``st.cd_docs`` / ``st.cd_hashes``, which the
    retrieval mixtures' stages and every evaluation's key read."""

    name = "mmlu_cd"
    cross_domain = True

    def __init__(self, settings: MMLUCDBench, stage_name):
        self.settings = settings
        self.stage_name = stage_name  # k → the build stage's name (`edgefuse.runner.names.cd_build`)

    def keys(self) -> list[str]:
        return [cd_key(k) for k in self.settings.ks]

    def data_plan(self) -> list[PlannedData]:
        return [PlannedData(self.stage_name(k), BUILD_SECONDS, k) for k in self.settings.ks]

    def build_data(self, st, data: PlannedData) -> None:
        """The instance file of one k (``data.key``)."""
        cd, k = self.settings, data.key

        def run(work: Path, advance) -> dict:
            doc = build_instances(st.dataset, k=k, n=cd.n, seed=st.cfg.data.split_seed, domains=cd.domains,
                                  split="test", split_spec=st.split_spec)
            return {"hash": write_benchmark(doc, work / f"{cd_key(k)}.jsonl"), "file": f"{cd_key(k)}.jsonl"}

        # MMLU's data settings only: the instances hold no question of a data.choices file
        inputs = {"data": st.cfg.data.model_dump(exclude={"choices"}), "cd": cd.model_dump(), "k": k}
        out, res = st.stage(data, inputs, run)
        st.cd_docs[k] = load_benchmark(out / res["file"])
        st.cd_hashes[k] = res["hash"]

    def units(self, st) -> int:
        return sum(len(d["instances"]) for d in st.cd_docs.values())

    def work(self, n_mmlu: int) -> dict[str, float]:
        """k chained answers per instance, and (``single``) its items alone where MMLU did not score them (counted
        as all of them: an upper bound when the MMLU selection is a small part of the test split)."""
        answers = sum(self.settings.n * k for k in self.settings.ks)
        return {"cd_answer": answers, "mmlu_item": answers if self.settings.single else 0}

    def evaluate(self, st, model, ctx: EvalContext) -> dict[str, dict]:
        b = st.cfg.benchmarks
        out = {}
        for k, doc in st.cd_docs.items():
            res = evaluate_mmlu_cd(model, st.tokenizer, doc, st.dataset, batch_size=b.batch_size,
                                   progress=ctx.advance, meta={"label": ctx.label}, single_items=list(ctx.alone),
                                   fmt=b.format, metric=b.headline_metric, single=self.settings.single)
            ctx.alone.extend(res["single_items"] or [])
            atomic_write_json(ctx.work / f"{cd_key(k)}.json", res)
            out[cd_key(k)] = cd_summary(res, k)
        return out
