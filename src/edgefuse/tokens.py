"""Prompt tokenization shared by scoring, training, pruning calibration and composition.

Why: the scorers and the trainer tokenize a sequence in segments (a context, then its continuations;
an MMLU-CD prefix, then the later answer cues) and join the ids themselves, so segments are encoded
with no special tokens. Called that way a tokenizer also drops the BOS it would put first by default,
and a model trained to see it first degrades: Gemma 3 270M's loss on an MMLU prompt is 5.27 without
its ``<bos>`` and 2.43 with it. So the first segment of a sequence gets the BOS exactly when
``tokenizer(text)`` would add it (Gemma and Llama tokenizers; see `bos_prefix` for the one exception),
and every later segment is bare. GPT-2-style tokenizers such as SmolLM2's get none: ids unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer puts its BOS before a text by default, else ``[]``.

    A "BOS" that is also the tokenizer's EOS does not count: transformers' GGUF converter gives SmolLM2
    (whose GGUF says ``add_bos_token: false`` and whose own tokenizer adds nothing) a tokenizer that
    prepends ``<|im_start|>``, which it also names EOS and pad; a token that ends sequences is no
    sequence-start marker, and SmolLM2 was never run with it first (its scores stay bit-identical)."""
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id:
        return []
    default = tokenizer("a").input_ids
    bare = tokenizer("a", add_special_tokens=False).input_ids
    return [bos] if default[:1] == [bos] and bare[:1] != [bos] else []


def encode_bare(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of text segments that do not start a sequence (continuations, later segments): no special tokens."""
    return tokenizer(list(texts), add_special_tokens=False).input_ids if texts else []


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of texts that start a sequence: the tokenizer's default BOS (`bos_prefix`), then the bare ids."""
    head = bos_prefix(tokenizer)
    return [head + ids for ids in encode_bare(tokenizer, texts)]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """`encode_prompts` of one text."""
    return encode_prompts(tokenizer, [text])[0]


def keep_end(ids: Sequence[int], n: int, head: Sequence[int] = ()) -> list[int]:
    """At most ``n`` ids of a sequence that starts with ``head`` (its BOS, if any): over-long ones keep the head
    and their last tokens (the question and ``Answer:`` matter most). With no head: ``ids[-n:]``."""
    ids, k = list(ids), len(head)
    if len(ids) <= n:
        return ids
    if k == 0 or n <= k or ids[:k] != list(head):
        return ids[-n:]
    return ids[:k] + ids[len(ids) - (n - k):]
