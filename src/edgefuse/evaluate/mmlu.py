"""MMLU evaluation: letter or cloze log-likelihood scoring, accuracy with bootstrap intervals, results JSON."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Sequence

import torch

from edgefuse.data.mmlu import MMLUItem, choice_label
from edgefuse.data.prompts import cloze_continuation, cloze_prompt, mc_prompt
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.cloze import check_format, choose
from edgefuse.evaluate.scorer import PackedScorer
from edgefuse.evaluate.scoring import LetterScorer
from edgefuse.evaluate.stats import bootstrap_ci

RESULTS_VERSION = 1


def few_shot_pool(public: Sequence[MMLUItem]) -> dict[str, list[MMLUItem]]:
    """Few-shot examples come from the ``public`` split only, in id order (deterministic)."""
    pool: dict[str, list[MMLUItem]] = defaultdict(list)
    for it in sorted(public, key=lambda it: it.id):
        pool[it.subject].append(it)
    return pool


def build_prompts(items: Sequence[MMLUItem], shots: int = 0, public: Sequence[MMLUItem] = ()) -> list[str]:
    pool = few_shot_pool(public) if shots else {}
    return [mc_prompt(it, pool.get(it.subject, [])[:shots]) for it in items]


def summarise(items: Sequence[MMLUItem], correct: Sequence[int], seed: int = 0) -> dict:
    """Overall, per-category and per-subject accuracy, each with a 95% bootstrap interval."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    by_sub: dict[str, list[int]] = defaultdict(list)
    for it, c in zip(items, correct):
        by_cat[it.category].append(c)
        by_sub[it.subject].append(c)
    return {
        "overall": bootstrap_ci(correct, seed=seed),
        "categories": {k: bootstrap_ci(v, seed=seed) for k, v in sorted(by_cat.items())},
        "subjects": {k: bootstrap_ci(v, seed=seed) for k, v in sorted(by_sub.items())},
    }


def evaluate_mmlu(
    model,
    tokenizer,
    items: Sequence[MMLUItem],
    shots: int = 0,
    public: Sequence[MMLUItem] = (),
    batch_size: int = 8,
    padding_side: str = "right",
    progress: Callable[[int], None] | None = None,
    meta: dict | None = None,
    fmt: str = "letters",
) -> dict:
    """Score every item; return the results document (per-item predictions and the four scores).

    ``fmt="letters"``: the log-probability of each answer letter after the lettered prompt.
    ``fmt="cloze"``: the summed log-likelihood of each answer text after the cloze prompt (zero-shot
    only), reported as ``accuracy`` (acc) and ``accuracy_norm`` (acc_norm, per character).
    """
    check_format(fmt)
    if fmt == "cloze":
        if shots:
            raise EdgefuseError("cloze scoring is zero-shot only; use --shots 0 or the letters format")
        return _evaluate_cloze(model, tokenizer, items, batch_size, progress, meta)
    t0 = time.perf_counter()
    scorer = LetterScorer(model, tokenizer, batch_size=batch_size, padding_side=padding_side)
    scores = scorer.score(build_prompts(items, shots, public), progress=progress)
    return results_document(items, scores, "letters", shots, time.perf_counter() - t0, scorer.tokens_scored, meta)


def results_document(items: Sequence[MMLUItem], scores, fmt: str, shots: int, wall: float, tokens: int,
                     meta: dict | None = None, extra: Sequence[dict] | None = None) -> dict:
    """The results document of (n, choices) scores, whoever scored them (a model, an adapter, a retrieval mixture):
    per item the prediction and outcome (letters: the highest letter score; cloze: acc by summed log-likelihood
    and acc_norm per character of the choice text, as lm-eval-harness), its scores, and ``extra[i]``'s fields."""
    if fmt == "letters":
        preds = scores.argmax(dim=1).tolist()
        correct = {"accuracy": [int(p == it.answer) for p, it in zip(preds, items)]}
        records = [{"id": it.id, "subject": it.subject, "answer": choice_label(it.answer), "pred": choice_label(p),
                    "correct": bool(p == it.answer)} for it, p in zip(items, preds)]
    else:
        lengths = [[len(c) for c in it.choices] for it in items]  # lm-eval: the choice text, no space
        preds, preds_norm = choose(scores, lengths, "acc").tolist(), choose(scores, lengths, "acc_norm").tolist()
        correct = {"accuracy": [int(p == it.answer) for p, it in zip(preds, items)],
                   "accuracy_norm": [int(p == it.answer) for p, it in zip(preds_norm, items)]}
        records = [{"id": it.id, "subject": it.subject, "answer": choice_label(it.answer), "pred": choice_label(p),
                    "correct": bool(p == it.answer), "pred_norm": choice_label(pn), "correct_norm": bool(pn == it.answer)}
                   for it, p, pn in zip(items, preds, preds_norm)]
    for i, (rec, row) in enumerate(zip(records, scores.tolist())):
        rec["scores"] = [round(float(x), 6) for x in row]
        rec.update(extra[i] if extra is not None else {})
    return _document(items, meta, fmt, shots, correct, wall, tokens, records)


def _document(items, meta, fmt: str, shots: int, correct: dict[str, list[int]], wall: float, tokens: int,
              records: list[dict]) -> dict:
    """The results document of either format: ``correct`` maps each accuracy key to per-item outcomes."""
    return {
        "version": RESULTS_VERSION,
        "benchmark": "mmlu",
        **(meta or {}),
        "format": fmt,
        "shots": shots,
        "n": len(items),
        **{key: summarise(items, c) for key, c in correct.items()},
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "items": records,
    }


def _evaluate_cloze(model, tokenizer, items, batch_size, progress, meta) -> dict:
    """Cloze-form results: per item the summed log-likelihoods, the acc and the acc_norm choice."""
    t0 = time.perf_counter()
    conts = [[cloze_continuation(it, i) for i in range(len(it.choices))] for it in items]
    s = PackedScorer(model, tokenizer, batch_size).score([cloze_prompt(it) for it in items], conts, progress)
    return results_document(items, torch.tensor(s.loglik), "cloze", 0, time.perf_counter() - t0, s.tokens, meta)
