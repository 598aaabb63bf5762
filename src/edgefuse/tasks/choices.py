"""Any multiple-choice file as a study task (issue 23, items 1 and 2): a JSONL file read through a field mapping, or
a BIG-bench ``task.json``, scored in cloze form (any number of choices) on every evaluated model.

Why cloze: the letters form asks for one of `` A``–`` D``, which a file with five choices, or two, does not fit;
the cloze form scores each choice's text after ``Question: …\\nAnswer:``, as lm-eval-harness does for such tasks.
The file's sha256 is part of every evaluation's cache key, so editing it re-evaluates instead of reusing scores
of the old questions.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from edgefuse.compose.embedding import example_text
from edgefuse.data.choices import ChoiceItem, load_choice_file
from edgefuse.data.mmlu import MMLUDataset, make_splits
from edgefuse.data.prompts import cloze_continuation, cloze_prompt
from edgefuse.evaluate.cloze import choose
from edgefuse.evaluate.retrieval import RetrievalScorer, mixture_record
from edgefuse.evaluate.scorer import PackedScorer
from edgefuse.evaluate.stats import bootstrap_ci
from edgefuse.io import atomic_write_json, sha256_file
from edgefuse.tasks.base import EvalContext, Task, TaskSettings, headline_summary

RESULTS_VERSION = 1


class ChoicesBench(TaskSettings):
    """``benchmarks.tasks.NAME`` with ``kind: choices``: a file of its own (``path``), all of it, or a file of the
    study's data (``data``: a ``data.choices`` name), its test split: the domains edges train on, without the
    questions they trained on."""

    kind: Literal["choices"]
    path: Optional[str] = Field(None, description="a JSONL file (one question per line) or a BIG-bench task.json")
    data: Optional[str] = Field(None, description="instead of path: a data.choices file, scored on its test split")
    fields: str = Field("", description="the JSONL field mapping, e.g. 'question=q,choices=a|b|c,answer=label' "
                                        "(edgefuse.data.choices.FieldMap; empty: question, choices, answer, domain)")
    domain: Optional[str] = Field(None, description="the file's one domain, when its rows name none")
    limit: Optional[int] = Field(None, ge=1, description="a seeded sample of this many questions")
    seed: int = 0
    metric: Literal["acc", "acc_norm"] = Field("acc_norm", description="headline: summed log-likelihood (acc) or "
                                                                       "per character of the choice (acc_norm)")
    label: Optional[str] = Field(None, description="the report's column title (default: the task's name)")

    @model_validator(mode="after")
    def _one_source(self) -> "ChoicesBench":
        if (self.path is None) == (self.data is None):
            raise ValueError("give either path (a file of the task's own) or data (a data.choices file)")
        if self.data is not None and (self.fields or self.domain):
            raise ValueError("with data, the file's fields and domain are those of data.choices")
        return self


def source_path(s: ChoicesBench, data=None) -> str:
    """The file the task reads (``data``: the study's `edgefuse.config.DataConfig`)."""
    return s.path if s.data is None else data.choices[s.data].path


def load_items(s: ChoicesBench, data=None) -> list[ChoiceItem]:
    """The task's questions: its own file, or the test split of a ``data.choices`` file under the study's split
    settings (`make_splits` splits per domain, so the file alone splits as the study's whole dataset does); then a
    seeded sample of ``limit``, in id order either way."""
    if s.data is None:
        items = load_choice_file(s.path, s.fields, s.domain)
    else:
        f = data.choices[s.data]
        items = load_choice_file(f.path, f.fields, f.domain)
        test = set(make_splits(MMLUDataset(items, f.path), data.split_spec())["test"])
        items = [it for it in items if it.id in test]
    if s.limit is not None and s.limit < len(items):
        items = sorted(random.Random(s.seed).sample(items, s.limit), key=lambda it: it.id)
    return items


def _cloze_pairs(items: list[ChoiceItem]) -> tuple[list[str], list[list[str]]]:
    """The cloze contexts and each item's continuations, one per choice."""
    return [cloze_prompt(it) for it in items], [[cloze_continuation(it, c) for c in range(len(it.choices))]
                                                for it in items]


def score_items(model, tokenizer, items: list[ChoiceItem], batch_size: int, progress=None) -> list[list[float]]:
    """Summed log-likelihood of every choice of every item, in cloze form (`edgefuse.evaluate.scorer`)."""
    return PackedScorer(model, tokenizer, batch_size).score(*_cloze_pairs(items), progress).loglik


def score_items_mixture(model, tokenizer, items: list[ChoiceItem], pool, settings, batch_size: int,
                        progress=None, encoder=None) -> tuple[list[list[float]], list[dict]]:
    """`score_items` under a retrieval mixture: each question (text and choices) is its own query, and its top-k
    adapters' outputs are mixed at every position (`edgefuse.evaluate.retrieval.RetrievalScorer`); also each
    question's mixture, adapter name → weight."""
    scorer = RetrievalScorer(model, tokenizer, pool, settings, encoder, batch_size)
    s = scorer.score(*_cloze_pairs(items), progress, queries=[example_text(it) for it in items])
    return s.loglik, [mixture_record(w, pool) for w in s.weights]


def results_document(items: list[ChoiceItem], scores: list[list[float]], meta: dict, wall: float,
                     extra: list[dict] | None = None) -> dict:
    """Per item both metrics' choice and outcome (acc: summed log-likelihood; acc_norm: per character of the choice
    text, as lm-eval-harness), overall and per domain with bootstrap intervals."""
    records, by_domain = [], defaultdict(lambda: {"acc": [], "acc_norm": []})
    for it, row in zip(items, scores):
        ll, lengths = torch.tensor([row]), [[len(c) for c in it.choices]]
        pred, pred_norm = int(choose(ll, lengths, "acc")[0]), int(choose(ll, lengths, "acc_norm")[0])
        rec = {"id": it.id, "domain": it.subject, "answer": it.answer, "pred": pred, "pred_norm": pred_norm,
               "correct": pred == it.answer, "correct_norm": pred_norm == it.answer,
               "scores": [round(x, 6) for x in row], **({"mixture": extra[len(records)]} if extra else {})}
        records.append(rec)
        by_domain[it.subject]["acc"].append(int(rec["correct"]))
        by_domain[it.subject]["acc_norm"].append(int(rec["correct_norm"]))
    accuracy = {m: bootstrap_ci([int(r["correct" + ("_norm" if m == "acc_norm" else "")]) for r in records])
                for m in ("acc", "acc_norm")}
    accuracy["domains"] = {d: {m: bootstrap_ci(v) for m, v in ms.items()} for d, ms in sorted(by_domain.items())}
    return {"version": RESULTS_VERSION, "benchmark": "choices", **meta, "format": "cloze", "n": len(items),
            "accuracy": accuracy, "wall_s": round(wall, 3), "items": records}


class ChoicesTask(Task):
    """One multiple-choice file, its questions evaluated on every model of the study."""

    mixture = True

    def __init__(self, name: str, settings: ChoicesBench, data=None):
        self.name, self.settings, self.data = name, settings, data
        self.items: list[ChoiceItem] | None = None

    def keys(self) -> list[str]:
        return [self.name]

    def report_columns(self) -> dict[str, str]:
        return {self.name: f"{self.settings.label or self.name} {self.settings.metric}"}

    def _items(self) -> list[ChoiceItem]:
        if self.items is None:
            self.items = load_items(self.settings, self.data)
        return self.items

    def prepare(self, st) -> None:
        self._items()  # a bad file fails here, before any model is evaluated

    def key_inputs(self, st) -> dict:
        return {"file": sha256_file(Path(source_path(self.settings, self.data)))}

    def units(self, st) -> int:
        return len(self._items())

    def work(self, n_mmlu: int) -> dict[str, float]:
        """A cloze item's cost grows with its choices; the rate is per item of four. Reading the file here makes a
        bad one fail at the estimate, before the run directory is written."""
        return {"mmlu_item:cloze": sum(len(it.choices) for it in self._items()) / 4}

    def evaluate(self, st, model, ctx: EvalContext) -> dict[str, dict]:
        items, t0 = self._items(), time.perf_counter()
        scores = score_items(model, st.tokenizer, items, st.cfg.benchmarks.batch_size, ctx.advance)
        res = results_document(items, scores, {"label": ctx.label, "task": self.name,
                                               "path": source_path(self.settings, self.data)},
                               time.perf_counter() - t0)
        return self._summary(res, ctx)

    def evaluate_mixture(self, st, pool, settings, ctx: EvalContext) -> dict[str, dict]:
        items, t0 = self._items(), time.perf_counter()
        scores, mixtures = score_items_mixture(st.model, st.tokenizer, items, pool, settings,
                                               st.cfg.benchmarks.batch_size, ctx.advance)
        res = results_document(items, scores, {"label": ctx.label, "task": self.name,
                                               "path": source_path(self.settings, self.data),
                                               "retrieval": settings.as_dict()}, time.perf_counter() - t0, mixtures)
        return self._summary(res, ctx)

    def _summary(self, res: dict, ctx: EvalContext) -> dict[str, dict]:
        file = f"{self.name}.json"
        atomic_write_json(ctx.work / file, res)
        norm = "_norm" if self.settings.metric == "acc_norm" else ""
        return {self.name: headline_summary(res["accuracy"][self.settings.metric],
                                            {r["id"]: int(r["correct" + norm]) for r in res["items"]}, file,
                                            metric=self.settings.metric)}
