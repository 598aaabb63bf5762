"""MMLU-CD evaluation: chained letter scoring of k answers in one prompt, with a KV cache.

Prompt (see ``docs/mmlu_cd.md``)::

    The following are multiple choice questions (with answers) about <s1>, <s2> and <s3>.

    Question 1: <q1>
    A. ...            (B., C., D.)

    Question 2: <q2>
    ...

    Answer 1: X1
    Answer 2: X2
    ...

Answer j is scored by the log-probabilities of the letter tokens `` A``..`` D`` after ``Answer j:``,
and the text that follows contains the model's *own* earlier predictions X1..X(j-1), never the gold
letters. The shared prefix (header, all questions, ``Answer 1:``) runs through the decoder once;
each later answer feeds only the new tokens (`` Xj-1`` + ``\\nAnswer j:``) against the cached keys
and values, and the LM head runs only at the k scoring positions. Instances are batched with left
padding, so every row's scoring position is the last column and the per-step blocks (same length
for every row) need no padding at all.

Cloze form (``fmt="cloze"``, `ChainedClozeScorer`): the header reads "The following are questions
(with answers) about …", the questions carry no lettered choices, and answer j is scored as the
summed log-likelihood of each choice text `` <choice>`` after ``Answer j:``; the model's own choice
(by ``metric``: acc or acc_norm) is appended before ``\nAnswer j+1:``. Same caching: the prefix
once, then each step feeds only the chosen text and the cue; the four continuations of a step run
packed side by side in one cached step, after which the cache is cropped back (see
`edgefuse.evaluate.cloze.continuation_logliks`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from edgefuse.data.mmlu import LETTERS, MMLUDataset, MMLUItem, choice_label
from edgefuse.data.mmlu_cd import content_hash
from edgefuse.data.prompts import cloze_continuation, subject_words
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.cloze import check_format, choose, continuation_logliks, encode_choices
from edgefuse.evaluate.mmlu import evaluate_mmlu
from edgefuse.evaluate.scoring import continuation_token_ids, head_logprobs, lm_parts, make_batch, unwrap
from edgefuse.evaluate.stats import bootstrap_ci, paired_diff_ci
from edgefuse.tokens import encode_bare, encode_prompts

RESULTS_VERSION = 1
CONTINUATIONS = (" A", " B", " C", " D")


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


HEADER_SEGMENT = -1  # the label of the header's characters in `cd_segments`


def _subjects(items: Sequence[MMLUItem]) -> str:
    return _join(list(dict.fromkeys(subject_words(it.subject) for it in items)))


def cd_header(items: Sequence[MMLUItem]) -> str:
    return f"The following are multiple choice questions (with answers) about {_subjects(items)}.\n\n"


def cloze_cd_header(items: Sequence[MMLUItem]) -> str:
    return f"The following are questions (with answers) about {_subjects(items)}.\n\n"


def answer_cue(j: int) -> str:
    """Text that follows answer j-1's letter and precedes answer j's (1-based j ≥ 2)."""
    return f"\nAnswer {j}:"


def cd_segments(items: Sequence[MMLUItem], chosen: Sequence[int], fmt: str = "letters"
                ) -> tuple[str, list[tuple[int, int]]]:
    """The growing MMLU-CD prompt after the ``chosen`` answers (indices), and where each of its segments starts.

    The text is the scoring point of answer len(chosen)+1, or, with all k chosen, the whole instance. Segments,
    as (first character, label): the header (`HEADER_SEGMENT`); ``Question j`` with its lettered choices (letters
    form) and the blank line after it (label j-1); ``Answer j:`` with the answer that follows it (label j-1; the
    first cue brings the blank line before it). They are recorded as the text is built, so a composition that
    routes each segment its own way (`edgefuse.evaluate.mixture`) never searches the prompt for them."""
    check_format(fmt)
    parts = [(cd_header(items) if fmt == "letters" else cloze_cd_header(items), HEADER_SEGMENT)]
    for j, it in enumerate(items):
        lines = [f"Question {j + 1}: {it.question.strip()}"]
        if fmt == "letters":
            lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, it.choices)]
        parts.append(("\n".join(lines) + ("\n\n" if j + 1 < len(items) else ""), j))
    parts.append(("\n\nAnswer 1:", 0))
    for j, c in enumerate(chosen):
        answer = f" {LETTERS[c]}" if fmt == "letters" else cloze_continuation(items[j], c)
        parts[-1] = (parts[-1][0] + answer, j)
        if j + 1 < len(items):
            parts.append((answer_cue(j + 2), j + 1))
    spans, start = [], 0
    for text, label in parts:
        spans.append((start, label))
        start += len(text)
    return "".join(text for text, _ in parts), spans


def cd_prefix(items: Sequence[MMLUItem]) -> str:
    """Header, all numbered questions with lettered choices, then ``Answer 1:`` (no trailing space)."""
    return cd_segments(items, [], "letters")[0]


def cd_text(items: Sequence[MMLUItem], letters: Sequence[int]) -> str:
    """The growing prompt after answering ``letters`` (indices): the scoring point of answer len+1,
    or, with all k letters, the full instance text."""
    return cd_segments(items, letters, "letters")[0]


def cloze_cd_prefix(items: Sequence[MMLUItem]) -> str:
    """Cloze header, the numbered questions without choices, then ``Answer 1:`` (no trailing space)."""
    return cd_segments(items, [], "cloze")[0]


def cloze_cd_text(items: Sequence[MMLUItem], chosen: Sequence[int]) -> str:
    """The growing cloze prompt after the chosen answers (indices): the context of answer len+1, or,
    with all k chosen, the full instance text."""
    return cd_segments(items, chosen, "cloze")[0]


def instance_record(inst: dict, items: Sequence[MMLUItem], preds: Sequence[int], scores: Sequence[Sequence[float]],
                    single_preds: list | None = None) -> dict:
    """One instance's entry in an MMLU-CD results document (also written by the retrieval mixture's scorer)."""
    return {
        "id": inst["id"], "items": [it.id for it in items], "domains": inst["domains"],
        "answers": [choice_label(it.answer) for it in items], "preds": [choice_label(p) for p in preds],
        "correct": [p == it.answer for p, it in zip(preds, items)],
        "strict": all(p == it.answer for p, it in zip(preds, items)),
        "scores": [[round(float(x), 6) for x in pos] for pos in scores],
        **({"single_preds": single_preds} if single_preds is not None else {}),
    }


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two token sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChainedClozeScorer:
    """Cloze-form MMLU-CD: one cached prefix pass, then per answer a cached scoring of the four
    choice texts and a short step that feeds the chosen text and the next cue.

    The chain must equal tokenizing each growing context whole. Usually the cached tokens are a
    prefix of the longer context's tokens and only the new ones are fed; where a tokenizer merges
    across the boundary, the row's diverging cached positions are masked out (the attention mask
    may hold zeros anywhere) and their replacements fed at the right positions, so the result is
    still exact for every tokenizer.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, metric: str = "acc"):
        check_format("cloze", metric)
        self.model, self.tokenizer, self.batch_size, self.metric = model, tokenizer, batch_size, metric
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = getattr(unwrap(model).config, "max_position_embeddings", None)
        self.tokens = 0  # tokens run through the decoder (prefix, steps and continuations, no padding)

    def _enc(self, texts: Sequence[str]) -> list[list[int]]:
        # whole growing contexts, so each starts with the tokenizer's default BOS (edgefuse.tokens);
        # contexts end in "Answer j:", so lm-eval's move of trailing spaces never applies; rstrip anyway
        return encode_prompts(self.tokenizer, [t.rstrip() for t in texts])

    def _check_length(self, live: Sequence[int], conts: Sequence[Sequence[int]]) -> None:
        if self.max_length and len(live) + max(len(c) for c in conts) > self.max_length + 1:
            raise EdgefuseError(f"an MMLU-CD cloze prompt reaches {len(live) + max(len(c) for c in conts)} "
                                f"tokens, more than the model's {self.max_length}; use a smaller k")

    @torch.inference_mode()
    def score(self, instances: Sequence[Sequence[MMLUItem]],
              progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """(n, k, 4) summed log-likelihoods; answer j is conditioned on the metric's choices at 1..j-1."""
        if not instances:
            return torch.empty((0, 0, 4))
        k = len(instances[0])
        body, head, softcap = lm_parts(self.model)
        device = next(self.model.parameters()).device
        out = torch.empty((len(instances), k, len(instances[0][0].choices)), dtype=torch.float32)
        prefixes = [cloze_cd_prefix(items) for items in instances]
        prefix_ids = self._enc(prefixes)
        order = sorted(range(len(instances)), key=lambda i: (-len(prefix_ids[i]), i))
        for s in range(0, len(order), self.batch_size):
            idx = order[s: s + self.batch_size]
            rows = [instances[i] for i in idx]
            texts = [prefixes[i] for i in idx]
            live = [prefix_ids[i] for i in idx]  # token ids of each row's current context
            b = make_batch(live, self.pad_id, "left", device)
            res = body(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                       use_cache=True)
            cache, mask, last = res.past_key_values, b.attention_mask, res.last_hidden_state[:, -1]
            width = mask.shape[1]
            cols = [list(range(width - len(t), width)) for t in live]  # cache columns of the live tokens
            self.tokens += int(mask.sum())
            for j in range(k):
                conts = []
                for r, items in enumerate(rows):
                    ctx, cs = encode_choices(self.tokenizer, texts[r], [cloze_continuation(items[j], c)
                                                                        for c in range(len(items[j].choices))])
                    if ctx != live[r]:  # cannot happen: live is re-tokenized whole at every step
                        raise EdgefuseError("internal error: cloze chain lost track of its context tokens")
                    self._check_length(live[r], cs)
                    conts.append(cs)
                ll, n_tok = continuation_logliks(body, head, softcap, cache, mask, last, conts, self.pad_id)
                ll = ll.cpu()
                out[idx, j] = ll
                self.tokens += n_tok
                if j == k - 1:
                    break
                lengths = [[len(c) for c in items[j].choices] for items in rows]
                picks = choose(ll, torch.tensor(lengths, dtype=torch.float32), self.metric).tolist()
                texts = [t + cloze_continuation(items[j], p) + answer_cue(j + 2)
                         for t, items, p in zip(texts, rows, picks)]
                targets = self._enc(texts)
                starts, blocks = [], []
                for r, target in enumerate(targets):
                    p = min(common_prefix(live[r], target), len(target) - 1)
                    if p < len(live[r]):  # the tokenizer merged across the boundary: drop the stale tail
                        mask[r, cols[r][p:]] = 0
                        cols[r] = cols[r][:p]
                    starts.append(p)
                    blocks.append(target[p:])
                    live[r] = target
                step = max(len(x) for x in blocks)
                ids = torch.full((len(idx), step), self.pad_id, dtype=torch.long)
                bmask = torch.zeros((len(idx), step), dtype=torch.long)
                pos = torch.zeros((len(idx), step), dtype=torch.long)
                for r, (p, x) in enumerate(zip(starts, blocks)):  # left-padded: last column = last token
                    ids[r, step - len(x):] = torch.tensor(x)
                    bmask[r, step - len(x):] = 1
                    pos[r, step - len(x):] = torch.arange(p, p + len(x))
                    cols[r] += list(range(width + step - len(x), width + step))
                width += step
                mask = torch.cat([mask, bmask.to(device)], 1)
                res = body(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device),
                           past_key_values=cache, use_cache=True)
                cache, last = res.past_key_values, res.last_hidden_state[:, -1]
                self.tokens += int(bmask.sum())
            del cache, res
            if progress is not None:
                progress(len(idx))
        return out


class ChainedScorer:
    """Scores all k answers of many instances: one cached prefix pass, then k-1 short cached steps."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.letter_ids = continuation_token_ids(tokenizer, CONTINUATIONS)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = getattr(unwrap(model).config, "max_position_embeddings", None)
        self.tokens = 0  # tokens run through the decoder (prefix + steps, padding excluded)

    def encode(self, instances: Sequence[Sequence[MMLUItem]]) -> tuple[list[list[int]], list[list[int]]]:
        """Prefix token ids per instance (with the tokenizer's default BOS, `edgefuse.tokens`) and the cue
        ids per answer position 2..k (later segments: no BOS)."""
        k = len(instances[0])

        def enc(text: str) -> list[int]:
            return encode_bare(self.tokenizer, [text])[0]

        prefixes = encode_prompts(self.tokenizer, [cd_prefix(items) for items in instances])
        cues = [enc(answer_cue(j)) for j in range(2, k + 1)]
        # the chain concatenates separately tokenized pieces; make sure that equals tokenizing the text
        for x, letter_id in enumerate(self.letter_ids):
            for j, cue in enumerate(cues, 2):
                if enc(f" {LETTERS[x]}{answer_cue(j)}") != [letter_id, *cue]:
                    raise EdgefuseError(f"tokenizer merges the answer letter with {answer_cue(j)!r}; "
                                        "MMLU-CD's chained scoring needs them as separate tokens")
        if self.max_length:
            longest = max(len(p) for p in prefixes) + sum(1 + len(c) for c in cues)
            if longest > self.max_length:
                raise EdgefuseError(f"an MMLU-CD prompt has {longest} tokens, more than the model's "
                                    f"{self.max_length}; use a smaller k or shorter domains")
        return prefixes, cues

    @torch.inference_mode()
    def score(self, instances: Sequence[Sequence[MMLUItem]],
              progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """(n, k, 4) letter log-probabilities; position j is conditioned on the argmax of 1..j-1."""
        if not instances:
            return torch.empty((0, 0, len(self.letter_ids)))
        k = len(instances[0])
        prefixes, cues = self.encode(instances)
        body, head, softcap = lm_parts(self.model)
        device = next(self.model.parameters()).device
        letters = torch.tensor(self.letter_ids, device=device)
        out = torch.empty((len(instances), k, len(self.letter_ids)), dtype=torch.float32)
        order = sorted(range(len(instances)), key=lambda i: (-len(prefixes[i]), i))
        for s in range(0, len(order), self.batch_size):
            idx = order[s: s + self.batch_size]
            b = make_batch([prefixes[i] for i in idx], self.pad_id, "left", device)
            res = body(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                       use_cache=True)
            cache, mask, pos = res.past_key_values, b.attention_mask, b.position_ids[:, -1:]
            self.tokens += int(mask.sum())
            lp = head_logprobs(head, softcap, res.last_hidden_state[:, -1])[:, letters]
            out[idx, 0] = lp.float().cpu()
            for j, cue in enumerate(cues, 1):
                pred = lp.argmax(-1)
                new = torch.cat([letters[pred][:, None], torch.tensor(cue, device=device).expand(len(idx), -1)], 1)
                step_pos = pos + torch.arange(1, new.shape[1] + 1, device=device)
                mask = torch.cat([mask, torch.ones_like(new)], 1)
                res = body(input_ids=new, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                           use_cache=True)
                cache, pos = res.past_key_values, step_pos[:, -1:]
                self.tokens += new.numel()
                lp = head_logprobs(head, softcap, res.last_hidden_state[:, -1])[:, letters]
                out[idx, j] = lp.float().cpu()
            del cache, res
            if progress is not None:
                progress(len(idx))
        return out


def resolve(doc: dict, dataset: MMLUDataset) -> list[list[MMLUItem]]:
    """The MMLU items of each instance, in answer order; ids missing from the dataset are an error."""
    by_id = dataset.by_id()
    out = []
    for no, inst in enumerate(doc["instances"], 2):
        missing = [i for i in inst["items"] if i not in by_id]
        if missing:
            raise EdgefuseError(f"instance {inst['id']!r} (benchmark line {no}): item {missing[0]!r} is not in "
                                f"the MMLU source {dataset.source} (build and evaluate with the same data)")
        out.append([by_id[i] for i in inst["items"]])
    return out


def cd_metrics(domains: Sequence[Sequence[str]], correct: Sequence[Sequence[int]],
               single: Sequence[Sequence[int]] | None = None, all_domains: Sequence[str] | None = None,
               seed: int = 0) -> dict:
    """Instance metrics from per-position 0/1 outcomes (instances × k), each with a 95% bootstrap CI.

    strict: all k answers right; per_position[j]: answer j right; answer: all answers pooled;
    domain_matrix[a][b]: strict accuracy of the instances containing both domains a and b (the
    diagonal: instances containing a); with ``single`` (the same items asked alone) also the
    single-item accuracy and the paired cross-domain penalties (single − in-instance).
    """
    k = len(correct[0])
    strict = [int(all(c)) for c in correct]
    pooled = [c for row in correct for c in row]
    names = list(all_domains) if all_domains else sorted({d for row in domains for d in row})
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    by_domain: dict[str, list[int]] = defaultdict(list)
    by_domain_single: dict[str, list[int]] = defaultdict(list)
    for r, (doms, s) in enumerate(zip(domains, strict)):
        for a in doms:
            for b in doms:
                cells[a, b].append(s)
        for j, d in enumerate(doms):
            by_domain[d].append(correct[r][j])
            if single is not None:
                by_domain_single[d].append(single[r][j])
    out = {
        "chance": 0.25 ** k,
        "strict": bootstrap_ci(strict, seed=seed),
        "per_position": [bootstrap_ci([row[j] for row in correct], seed=seed) for j in range(k)],
        "answer": bootstrap_ci(pooled, seed=seed),
        "domain_matrix": {a: {b: bootstrap_ci(cells.get((a, b), []), seed=seed) for b in names} for a in names},
        "per_domain": {d: {"in_instance": bootstrap_ci(by_domain[d], seed=seed)} for d in names},
    }
    if single is not None:
        single_pooled = [c for row in single for c in row]
        single_strict = [int(all(row)) for row in single]
        out["single"] = bootstrap_ci(single_pooled, seed=seed)
        out["single_strict"] = bootstrap_ci(single_strict, seed=seed)
        out["penalty"] = paired_diff_ci(single_pooled, pooled, seed=seed)
        out["penalty_strict"] = paired_diff_ci(single_strict, strict, seed=seed)
        for d in names:
            out["per_domain"][d]["single"] = bootstrap_ci(by_domain_single[d], seed=seed)
    return out


def evaluate_mmlu_cd(model, tokenizer, doc: dict, dataset: MMLUDataset, *, batch_size: int = 8,
                     progress: Callable[[int], None] | None = None, meta: dict | None = None,
                     single: bool = True, single_items: Sequence[dict] | None = None,
                     fmt: str = "letters", metric: str = "acc") -> dict:
    """Score every instance (chained, KV-cached) and the same items alone; return the results document.

    ``single_items``: per-item records of an earlier `evaluate_mmlu` run of the same model (zero-shot),
    reused instead of re-scoring those items alone (e.g. when evaluating k=2 and k=3 on one model);
    only records of the same format are reused (cloze records carry ``correct_norm``).
    ``fmt``: letters | cloze; ``metric``: which choice counts and is chained (acc, or acc_norm for cloze).
    """
    check_format(fmt, metric)
    header = doc["header"]
    instances = resolve(doc, dataset)
    if not instances:
        raise EdgefuseError("the MMLU-CD benchmark holds no instances")
    t0 = time.perf_counter()
    if fmt == "cloze":
        scorer = ChainedClozeScorer(model, tokenizer, batch_size=batch_size, metric=metric)
        scores = scorer.score(instances, progress=progress)
        lengths = torch.tensor([[[len(c) for c in it.choices] for it in items] for items in instances],
                               dtype=torch.float32)
        preds = choose(scores, lengths, metric).tolist()
    else:
        scorer = ChainedScorer(model, tokenizer, batch_size=batch_size)
        scores = scorer.score(instances, progress=progress)
        preds = scores.argmax(-1).tolist()
    t_chain = time.perf_counter() - t0
    correct = [[int(p == it.answer) for p, it in zip(row, items)] for row, items in zip(preds, instances)]
    single_res, single_correct = None, None
    correct_key, pred_key = ("correct_norm", "pred_norm") if metric == "acc_norm" else ("correct", "pred")
    if single:
        alone = {r["id"]: r for r in (single_items or []) if ("correct_norm" in r) == (fmt == "cloze")}
        todo = list({it.id: it for items in instances for it in items if it.id not in alone}.values())
        if todo:
            if fmt == "cloze":
                fresh = evaluate_mmlu(model, tokenizer, todo, batch_size=batch_size, fmt="cloze")
            else:
                fresh = evaluate_mmlu(model, tokenizer, todo, batch_size=batch_size)
            alone.update({r["id"]: r for r in fresh["items"]})
        used = list(dict.fromkeys(it.id for items in instances for it in items))
        single_res = {"items": [alone[i] for i in used]}
        single_correct = [[int(alone[it.id][correct_key]) for it in items] for items in instances]
    metrics = cd_metrics([inst["domains"] for inst in doc["instances"]], correct, single_correct,
                         header.get("domains"))
    wall = time.perf_counter() - t0
    records = [instance_record(inst, items, row, sc, [alone[it.id][pred_key] for it in items] if single else None)
               for inst, items, row, sc in zip(doc["instances"], instances, preds, scores.tolist())]
    return {
        "version": RESULTS_VERSION,
        "benchmark": "mmlu-cd",
        **(meta or {}),
        "benchmark_sha256": content_hash(doc),
        "benchmark_header": header,
        "format": fmt,
        "metric": metric,
        "k": len(instances[0]),
        "n": len(instances),
        **metrics,
        "wall_s": round(wall, 3),
        "chained_wall_s": round(t_chain, 3),
        "tokens": scorer.tokens,
        "single_items": single_res["items"] if single_res else None,
        "instances": records,
    }
