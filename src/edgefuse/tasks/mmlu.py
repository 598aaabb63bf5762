"""MMLU as a study task: the selected test items, scored in the study's format, summed up with per-item outcomes
and gold scores for the report."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from edgefuse.evaluate.gold import gold_scores
from edgefuse.evaluate.mmlu import evaluate_mmlu
from edgefuse.io import atomic_write_json
from edgefuse.tasks.base import EvalContext, Task, TaskSettings

RESULTS_FILE = "mmlu.json"


class MMLUBench(TaskSettings):
    enabled: bool = True
    limit: Optional[int] = Field(200, ge=1)
    shots: int = Field(0, ge=0, le=5)
    domains: Optional[list[str]] = None


def mmlu_gold(st, res: dict) -> dict[str, list[float]]:
    """Per-item gold scores of an MMLU results document (`edgefuse.evaluate.gold`)."""
    return gold_scores(res["items"], {it.id: it for it in st.mmlu_items}, res["format"])


def mmlu_summary(st, res: dict, file: str = RESULTS_FILE) -> dict:
    """An MMLU results document summed up for results.json: the headline metric's accuracy and per-item outcomes
    (both metrics' accuracy too, in cloze form)."""
    b = st.cfg.benchmarks
    norm = "_norm" if b.headline_metric == "acc_norm" else ""
    out = {"accuracy": res["accuracy" + norm], "file": file,
           "correct": {i["id"]: int(i["correct" + norm]) for i in res["items"]},
           "gold": mmlu_gold(st, res)}
    if b.format == "cloze":
        out["metrics"] = {"acc": res["accuracy"]["overall"], "acc_norm": res["accuracy_norm"]["overall"]}
    return out


class MMLUTask(Task):
    """The study's MMLU selection (``st.mmlu_items``, chosen by the data stage), zero- or few-shot."""

    name = "mmlu"

    def __init__(self, settings: MMLUBench):
        self.settings = settings

    def keys(self) -> list[str]:
        return [self.name]

    def units(self, st) -> int:
        return len(st.mmlu_items)

    def work(self, n_mmlu: int) -> dict[str, float]:
        return {"mmlu_item": n_mmlu}

    def evaluate(self, st, model, ctx: EvalContext) -> dict[str, dict]:
        b, shots = st.cfg.benchmarks, self.settings.shots
        res = evaluate_mmlu(model, st.tokenizer, st.mmlu_items, shots=shots,
                            public=st.items_of("public") if shots else (), batch_size=b.batch_size,
                            progress=ctx.advance, meta={"label": ctx.label}, fmt=b.format)
        atomic_write_json(ctx.work / RESULTS_FILE, res)
        if not shots:  # zero-shot records: what MMLU-CD's "items alone" would score again
            ctx.alone.extend(res["items"])
        return {self.name: mmlu_summary(st, res)}
