"""Training examples and a deterministic, length-bucketed batch schedule.

Why deterministic: exact resume needs step ``s`` to see the same prompts whether or not the run was
interrupted, so the schedule is a pure function of (seed, epoch) rather than a stateful loader.
Why bucketing: prompts of similar length share a batch, so padding (wasted compute) stays small,
while the order of the batches stays random. Each epoch: shuffle the items, cut them into pools of
``batch × bucket`` items, sort each pool by length, slice it into micro-batches, shuffle those.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from edgefuse.data.mmlu import MMLUItem
from edgefuse.data.prompts import cloze_continuation, cloze_prompt, mc_prompt
from edgefuse.tokens import bos_prefix, encode_prompts, keep_end


def encode_items(tokenizer, items: Sequence[MMLUItem], seq: int) -> list[list[int]]:
    """Zero-shot prompt tokens ending at ``Answer:``, with the tokenizer's default BOS (`edgefuse.tokens`);
    over-long prompts keep the BOS and their end (question, choices)."""
    head = bos_prefix(tokenizer)
    return [keep_end(e, seq, head) for e in encode_prompts(tokenizer, [mc_prompt(it) for it in items])]


def encode_cloze_items(tokenizer, items: Sequence[MMLUItem], seq: int) -> tuple[list[list[int]], list[int]]:
    """Cloze prompt + gold answer text as tokens, and how many of the last tokens are the answer.

    The pair is encoded whole and the answer is what follows the context's own tokens (as evaluation
    harnesses split a context/continuation pair); both start with the tokenizer's default BOS
    (`edgefuse.tokens`), so the answer carries none; over-long examples keep the BOS and their end.
    """
    ctxs = [cloze_prompt(it) for it in items]
    whole = encode_prompts(tokenizer, [c + cloze_continuation(it, it.answer) for c, it in zip(ctxs, items)])
    ctx = encode_prompts(tokenizer, ctxs)
    n_answer = [max(1, len(w) - len(c)) for w, c in zip(whole, ctx)]
    head = bos_prefix(tokenizer)
    return [keep_end(w, seq, head) for w in whole], [min(n, seq - 1) for n in n_answer]


def epoch_batches(lengths: Sequence[int], batch: int, seed: int, epoch: int, bucket: int = 16) -> list[list[int]]:
    """Micro-batches (lists of item indices) of one epoch."""
    order = list(range(len(lengths)))
    rng = random.Random(f"edgefuse-train:{seed}:{epoch}")
    rng.shuffle(order)
    pool = max(batch, batch * bucket)
    out: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: (lengths[i], i))
        out += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    rng.shuffle(out)
    return out


class Schedule:
    """Infinite stream of micro-batches over epochs; ``step(s, accum)`` gives the ones of optimizer step s."""

    def __init__(self, lengths: Sequence[int], batch: int, seed: int, bucket: int = 16):
        self.lengths, self.batch, self.seed, self.bucket = list(lengths), batch, seed, bucket
        self.per_epoch = len(epoch_batches(self.lengths, batch, seed, 0, bucket))
        self._cache: dict[int, list[list[int]]] = {}

    def micro(self, k: int) -> list[int]:
        epoch, off = divmod(k, self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: epoch_batches(self.lengths, self.batch, self.seed, epoch, self.bucket)}
        return self._cache[epoch][off]

    def step(self, s: int, accum: int) -> list[list[int]]:
        return [self.micro(s * accum + j) for j in range(accum)]
