"""MMLU-CD generalised to any multiple-choice file (issue 23, item 2): cross-domain instances of k questions from
k distinct domains of one file, built by MMLU-CD's own composer (`edgefuse.data.mmlu_cd.compose_instances`) and
scored by its chained cloze scorer, with the same items asked alone for the cross-domain penalty.

Why a task of its own and not a setting of `edgefuse.tasks.choices`: its outcome is per instance (strict: all k
answers right), its cost grows with k, and it is cross-domain (an edge alone is scored on it only with
``benchmarks.edges_alone_cd``), as MMLU-CD is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from edgefuse.data.choices import ChoiceItem, domain_pools
from edgefuse.data.mmlu import MMLUDataset
from edgefuse.data.mmlu_cd import compose_instances
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.mmlu_cd import evaluate_mmlu_cd
from edgefuse.io import atomic_write_json, sha256_file
from edgefuse.tasks.base import EvalContext, Task, headline_summary
from edgefuse.tasks.choices import ChoicesBench, load_items, source_path

FORMAT = "edgefuse-choices-cd"


class ChoicesCDBench(ChoicesBench):
    """``benchmarks.tasks.NAME`` with ``kind: choices_cd``: the file settings of ``choices`` (``limit`` samples the
    questions the instances draw from), and the instances' shape."""

    kind: Literal["choices_cd"]
    k: int = Field(2, ge=2, description="questions per instance, each from another domain")
    n: int = Field(60, ge=1, description="instances; every k-combination of domains gets an equal share")
    domains: Optional[list[str]] = Field(None, description="the file's domains to combine (default: all)")
    single: bool = Field(True, description="also score each instance's questions alone (the cross-domain penalty)")


def build_document(items: list[ChoiceItem], s: ChoicesCDBench) -> dict:
    """The instances in MMLU-CD's document layout, so that its scorer and metrics take them unchanged."""
    pools = domain_pools(items)
    if s.domains is not None:
        unknown = [d for d in s.domains if d not in pools]
        if unknown:
            raise EdgefuseError(f"domain {unknown[0]!r} is not in the file (it has {', '.join(pools)})",
                                path=s.path or s.data)
        pools = {d: pools[d] for d in s.domains}
    counts = sorted({len(it.choices) for p in pools.values() for it in p})
    if len(counts) > 1:  # the chained scorer scores one number of choices per instance set
        raise EdgefuseError(f"cross-domain instances need one number of choices; the questions have "
                            f"{', '.join(map(str, counts))}", path=s.path or s.data)
    instances, combos, n_per = compose_instances(pools, k=s.k, n=s.n, seed=s.seed, where=s.path or s.data)
    header = {"format": FORMAT, "k": s.k, "n": s.n, "seed": s.seed, "domains": list(pools),
              "combinations": {"+".join(c): m for c, m in zip(combos, n_per)}}
    return {"header": header, "instances": instances}


class ChoicesCDTask(Task):
    """Cross-domain instances over one multiple-choice file's domains, scored chained in cloze form."""

    cross_domain = True

    def __init__(self, name: str, settings: ChoicesCDBench, data=None):
        self.name, self.settings, self.data = name, settings, data
        self._doc: dict | None = None
        self._dataset: MMLUDataset | None = None

    def keys(self) -> list[str]:
        return [self.name]

    def report_columns(self) -> dict[str, str]:
        return {self.name: f"{self.settings.label or self.name} k={self.settings.k} strict"}

    def _instances(self) -> tuple[dict, MMLUDataset]:
        if self._doc is None:
            items = load_items(self.settings, self.data)
            self._doc = build_document(items, self.settings)
            self._dataset = MMLUDataset(items, source_path(self.settings, self.data))
        return self._doc, self._dataset

    def prepare(self, st) -> None:
        self._instances()  # a bad file or an impossible k fails here, before any model is evaluated

    def key_inputs(self, st) -> dict:
        return {"file": sha256_file(Path(source_path(self.settings, self.data)))}

    def units(self, st) -> int:
        return self.settings.n

    def work(self, n_mmlu: int) -> dict[str, float]:
        """k chained answers per instance and each question alone; building the instances here too makes a bad
        file fail at the estimate, before the run directory is written."""
        self._instances()
        answers = self.settings.n * self.settings.k
        return {"cd_answer:cloze": answers, "mmlu_item:cloze": answers if self.settings.single else 0}

    def evaluate(self, st, model, ctx: EvalContext) -> dict[str, dict]:
        doc, dataset = self._instances()
        s = self.settings
        res = evaluate_mmlu_cd(model, st.tokenizer, doc, dataset, batch_size=st.cfg.benchmarks.batch_size,
                               progress=ctx.advance, meta={"label": ctx.label, "task": self.name,
                                                                  "path": source_path(s, self.data)},
                               fmt="cloze", metric=s.metric, single=s.single)
        file = f"{self.name}.json"
        atomic_write_json(ctx.work / file, res)
        extra = {key: res[key] for key in ("answer", "single", "penalty") if key in res}
        return {self.name: headline_summary(res["strict"], {r["id"]: int(r["strict"]) for r in res["instances"]},
                                            file, metric=s.metric, **extra)}
