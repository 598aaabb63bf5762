"""MMLU and MMLU-CD accuracy of a retrieval mixture over a pool of adapters (RAMoLE-style, issue 13).

Plain functions for the CLI (``edgefuse eval mmlu/mmlu-cd --pool ...``) and the study runner: each
request (an MMLU question; an MMLU-CD instance, or each of its question segments) is embedded with the
embedded MiniLM, its top-k adapters are retrieved (`edgefuse.compose.retrieval`), and it is scored with
their output mixture (`edgefuse.evaluate.mixture`). The results documents have the layout of
`edgefuse.evaluate.mmlu.evaluate_mmlu` / `edgefuse.evaluate.mmlu_cd.evaluate_mmlu_cd`, plus a
``retrieval`` block (settings, pool, retrieval accuracy) and each record's mixture.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from edgefuse.compose.embedding import embed_texts, example_text
from edgefuse.compose.mixture import LoraMixture
from edgefuse.compose.retrieval import AdapterPool, RetrievalSettings, retrieve, similarities
from edgefuse.data.mmlu_cd import content_hash
from edgefuse.data.prompts import cloze_continuation, cloze_prompt
from edgefuse.data.taxonomy import domain_subjects
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.cloze import check_format, choose
from edgefuse.evaluate.mixture import MixtureScorer, score_cd
from edgefuse.evaluate.mmlu import build_prompts, results_document
from edgefuse.evaluate.mmlu_cd import RESULTS_VERSION, cd_metrics, instance_record, resolve
from edgefuse.evaluate.scorer import Scorer
from edgefuse.evaluate.scoring import continuation_token_ids
from edgefuse.evaluate.stats import bootstrap_ci
from edgefuse.tokens import bos_prefix, encode_prompts, keep_end


def own_adapters(subject: str, pool: AdapterPool) -> list[int]:
    """Indices of the pool's adapters whose domain covers an MMLU subject."""

    def covers(domain) -> bool:
        try:
            return bool(domain) and subject in domain_subjects(domain)
        except EdgefuseError:
            return False  # a domain name that is not an MMLU domain covers no subject

    return [j for j, d in enumerate(pool.domains) if any(covers(x) for x in (d if isinstance(d, list) else [d]))]


def retrieval_accuracy(queries: torch.Tensor, subjects: Sequence[str], pool: AdapterPool) -> dict:
    """Share of questions whose own-domain adapter ranks first, with a 95% bootstrap interval.

    Questions whose subject no adapter of the pool covers are left out (counted in ``skipped``)."""
    sims = similarities(queries, pool)
    if sims.shape[0] != len(subjects):
        raise EdgefuseError(f"{sims.shape[0]} query embeddings for {len(subjects)} subjects")
    first = sims.argmax(1).tolist()
    hits, skipped = [], 0
    for top, subject in zip(first, subjects):
        own = own_adapters(subject, pool)
        if not own:
            skipped += 1
            continue
        hits.append(int(top in own))
    return {**bootstrap_ci(hits), "skipped": skipped, "top1": first}


def mixture_record(weights: torch.Tensor, pool: AdapterPool) -> dict[str, float]:
    """One request's mixture as results files record it: adapter name → weight, for the adapters it mixes."""
    return {pool.names[j]: round(float(weights[j]), 6) for j in torch.nonzero(weights).flatten().tolist()}


def _retrieval_block(pool: AdapterPool, settings: RetrievalSettings, queries: torch.Tensor,
                     subjects: Sequence[str]) -> dict:
    return {"settings": settings.as_dict(), "pool": [{"path": n, "domain": d} for n, d in zip(pool.names, pool.domains)],
            "encoder": "sentence-transformers/all-MiniLM-L6-v2",
            "accuracy": {k: v for k, v in retrieval_accuracy(queries, subjects, pool).items() if k != "top1"}}


def evaluate_mmlu_retrieval(model, tokenizer, items: Sequence, pool: AdapterPool,
                            settings: RetrievalSettings = RetrievalSettings(), *, encoder=None, shots: int = 0,
                            public: Sequence = (), fmt: str = "letters", batch_size: int = 8,
                            progress: Callable[[int], None] | None = None, meta: dict | None = None) -> dict:
    """MMLU results document of the retrieval mixture: each question retrieves its own top-k adapters
    (the question and its choices are the query; few-shot examples are not)."""
    check_format(fmt)
    settings.check(len(pool))
    if fmt == "cloze" and shots:
        raise EdgefuseError("cloze scoring is zero-shot only; use --shots 0 or the letters format")
    if not items:
        raise EdgefuseError("the selection holds no items")
    t0 = time.perf_counter()
    queries = embed_texts([example_text(it) for it in items], encoder)
    W = retrieve(queries, pool, settings)
    if fmt == "letters":
        with LoraMixture(model, pool.adapters) as mix:
            scorer = MixtureScorer(model, tokenizer, mix, batch_size)
            head = bos_prefix(tokenizer)  # the tokenizer's default BOS first, as LetterScorer does
            seqs = [keep_end(e, scorer.max_length, head)
                    for e in encode_prompts(tokenizer, build_prompts(items, shots, public))]
            scores = torch.empty((len(items), 4))
            ids = continuation_token_ids(tokenizer, [" A", " B", " C", " D"])
            for s in range(0, len(items), batch_size):
                part = range(s, min(len(items), s + batch_size))
                scores[list(part)] = scorer.next_token([seqs[i] for i in part],
                                                       [W[i].expand(len(seqs[i]), -1) for i in part], ids)
                if progress is not None:
                    progress(len(part))
            tokens = scorer.tokens
    else:  # the one scoring interface, with the mixtures routed above
        res = RetrievalScorer(model, tokenizer, pool, settings, encoder, batch_size).score(
            [cloze_prompt(it) for it in items],
            [[cloze_continuation(it, c) for c in range(len(it.choices))] for it in items], progress, weights=W)
        scores, tokens = torch.tensor(res.loglik), res.tokens
    mixes = [{"mixture": mixture_record(W[i], pool)} for i in range(len(items))]
    doc = results_document(items, scores, fmt, shots, time.perf_counter() - t0, tokens, meta, extra=mixes)
    doc["retrieval"] = _retrieval_block(pool, settings, queries, [it.subject for it in items])
    return doc


def cd_mixtures(instances: Sequence[Sequence], pool: AdapterPool, settings: RetrievalSettings,
                encoder=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(segment weights (n, k, pool), header weights (n, pool), per-question query vectors (n·k, d)).

    ``instance`` routing: the whole instance (all its questions) is one query and every segment uses
    its mixture; ``segment``: each question is its own query and the header uses the mean mixture."""
    n, k = len(instances), len(instances[0])
    per_question = embed_texts([example_text(it) for items in instances for it in items], encoder)
    if settings.routing == "segment":
        segments = retrieve(per_question, pool, settings).view(n, k, len(pool))
        return segments, segments.mean(1), per_question
    whole = embed_texts(["\n\n".join(example_text(it) for it in items) for items in instances], encoder)
    W = retrieve(whole, pool, settings)
    return W[:, None, :].expand(n, k, len(pool)).clone(), W, per_question


def evaluate_mmlu_cd_retrieval(model, tokenizer, doc: dict, dataset, pool: AdapterPool,
                               settings: RetrievalSettings = RetrievalSettings(), *, encoder=None,
                               fmt: str = "letters", metric: str = "acc", batch_size: int = 8, single: bool = True,
                               progress: Callable[[int], None] | None = None, meta: dict | None = None) -> dict:
    """MMLU-CD results document of the retrieval mixture, routed per instance or per question segment
    (``settings.routing``); the same items asked alone are routed per item (`evaluate_mmlu_retrieval`)."""
    check_format(fmt, metric)
    settings.check(len(pool))
    instances = resolve(doc, dataset)
    if not instances:
        raise EdgefuseError("the MMLU-CD benchmark holds no instances")
    t0 = time.perf_counter()
    segments, header, queries = cd_mixtures(instances, pool, settings, encoder)
    with LoraMixture(model, pool.adapters) as mix:
        scorer = MixtureScorer(model, tokenizer, mix, batch_size)
        scores = score_cd(scorer, instances, segments, header, fmt, metric, progress)
    if fmt == "cloze":
        lengths = torch.tensor([[[len(c) for c in it.choices] for it in items] for items in instances],
                               dtype=torch.float32)
        preds = choose(scores, lengths, metric).tolist()
    else:
        preds = scores.argmax(-1).tolist()
    t_chain = time.perf_counter() - t0
    correct = [[int(p == it.answer) for p, it in zip(row, items)] for row, items in zip(preds, instances)]
    alone, single_correct, single_doc = {}, None, None
    pred_key, correct_key = ("pred_norm", "correct_norm") if metric == "acc_norm" else ("pred", "correct")
    if single:
        unique = list({it.id: it for items in instances for it in items}.values())
        single_doc = evaluate_mmlu_retrieval(model, tokenizer, unique, pool, settings, encoder=encoder, fmt=fmt,
                                             batch_size=batch_size)
        alone = {r["id"]: r for r in single_doc["items"]}
        single_correct = [[int(alone[it.id][correct_key]) for it in items] for items in instances]
    metrics = cd_metrics([inst["domains"] for inst in doc["instances"]], correct, single_correct,
                         doc["header"].get("domains"))
    k = len(instances[0])
    records = []
    for r, (inst, items, row, sc) in enumerate(zip(doc["instances"], instances, preds, scores.tolist())):
        rec = instance_record(inst, items, row, sc, [alone[it.id][pred_key] for it in items] if single else None)
        records.append({**rec, "mixtures": [mixture_record(segments[r, j], pool) for j in range(k)]})
    return {
        "version": RESULTS_VERSION, "benchmark": "mmlu-cd", **(meta or {}),
        "benchmark_sha256": content_hash(doc), "benchmark_header": doc["header"], "format": fmt, "metric": metric,
        "k": k, "n": len(instances), **metrics,
        "wall_s": round(time.perf_counter() - t0, 3), "chained_wall_s": round(t_chain, 3), "tokens": scorer.tokens,
        "single_items": single_doc["items"] if single_doc else None,
        "retrieval": _retrieval_block(pool, settings, queries, [it.subject for items in instances for it in items]),
        "instances": records,
    }


class RetrievalScorer(Scorer):
    """A retrieval mixture (LoraRetriever, Zhao et al. 2024, arXiv:2402.09997): each row's query is embedded
    (``encoder``: the embedded MiniLM), its top-k adapters of ``pool`` are weighted by ``settings``
    (`edgefuse.compose.retrieval.retrieve`), and that one mixture serves the row's context and every continuation
    (`edgefuse.evaluate.mixture.MixtureScorer`, the same packing as `edgefuse.evaluate.scorer.PackedScorer`)."""

    def __init__(self, model, tokenizer, pool, settings, encoder=None, batch_size: int = 8, greedy: bool = False):
        super().__init__(greedy)
        self.model, self.tokenizer, self.pool, self.settings = model, tokenizer, pool, settings
        self.encoder, self.batch_size = encoder, batch_size

    def route(self, queries):
        return retrieve(embed_texts(list(queries), self.encoder), self.pool, self.settings)

    def score_group(self, contexts, continuations, weights, progress):
        with LoraMixture(self.model, self.pool.adapters) as mix:
            scorer = MixtureScorer(self.model, self.tokenizer, mix, self.batch_size)
            ctxs, conts = scorer.encode_cloze(contexts, continuations)
            ll = scorer.continuations(ctxs, conts, weights, weights, progress, greedy=self.greedy)
        self.tokens += scorer.tokens
        return ll, scorer.greedy
