"""Batched log-likelihood scoring of single-token answers (the answer letters).

Why this shape: every choice of a multiple-choice question is one token after the same prompt, so a
single forward pass scores all four; the LM head (49k × 576 for SmolLM2, the largest matmul per
position) runs only at the one position per prompt where a score is needed; prompts are sorted by
length so batches carry little padding; position ids are derived from the attention mask so left
and right padding give the same scores as running each prompt alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from edgefuse.tokens import bos_prefix, encode_prompts, keep_end

# shared with training (edgefuse.edge), so they live with the model loader; importable from here as before
from edgefuse.models import continuation_token_ids, lm_parts, make_batch, unwrap

__all__ = ["LetterScorer", "continuation_token_ids", "head_logprobs", "lm_parts", "make_batch", "unwrap"]


def head_logprobs(head, softcap, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probabilities for a few hidden states (rows)."""
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1)


class LetterScorer:
    """Scores prompts by the log-probability of each answer continuation at the next position."""

    def __init__(self, model, tokenizer, continuations: Sequence[str] = (" A", " B", " C", " D"),
                 batch_size: int = 8, padding_side: str = "right", max_length: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        self.model, self.tokenizer = model, tokenizer
        self.choice_ids = torch.tensor(continuation_token_ids(tokenizer, continuations))
        self.batch_size, self.padding_side = batch_size, padding_side
        self.max_length = max_length or getattr(unwrap(model).config, "max_position_embeddings", 4096)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.tokens_scored = 0

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt ids, with the tokenizer's default BOS (`edgefuse.tokens`); over-long prompts keep the BOS
        and their end: the question and "Answer:" matter most."""
        head = bos_prefix(self.tokenizer)
        return [keep_end(e, self.max_length, head) for e in encode_prompts(self.tokenizer, prompts)]

    def batches(self, seqs: Sequence[Sequence[int]]) -> list[list[int]]:
        """Index groups, longest first, so each batch holds prompts of similar length."""
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.inference_mode()
    def score_tokens(self, seqs: Sequence[Sequence[int]], progress=None) -> torch.Tensor:
        """(n, n_choices) log-probabilities; ``progress(k)`` is called after each batch of k prompts."""
        body, head, softcap = lm_parts(self.model)
        device = next(self.model.parameters()).device
        out = torch.empty((len(seqs), len(self.choice_ids)), dtype=torch.float32)
        for idx in self.batches(seqs):
            b = make_batch([seqs[i] for i in idx], self.pad_id, self.padding_side, device)
            hidden = body(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                          use_cache=False).last_hidden_state
            h = hidden[torch.arange(len(idx), device=device), b.last_index]
            lp = head_logprobs(head, softcap, h)[:, self.choice_ids.to(device)]
            out[torch.tensor(idx)] = lp.float().cpu()
            self.tokens_scored += int(b.attention_mask.sum())
            if progress is not None:
                progress(len(idx))
        return out

    def score(self, prompts: Sequence[str], progress=None) -> torch.Tensor:
        return self.score_tokens(self.encode(prompts), progress)
