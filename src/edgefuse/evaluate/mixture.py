"""Scoring MMLU and MMLU-CD under a retrieval mixture whose weights differ per row or per token.

Why a scorer of its own: the library's scorers sort and batch prompts internally and reuse a KV cache
across the answers of an MMLU-CD instance, so no outside code can tell which row or which cached step a
forward pass holds. Here every forward pass is one padded batch of whole texts, and each token carries
the mixture of the segment it belongs to (`LoraMixture` with per-token weights). Cloze answers are
scored with the library's packed algorithm (`edgefuse.evaluate.cloze.ClozeScorer`: the context once,
its four choices packed after it), which calls back here to set each position's mixture. An MMLU-CD
answer j is scored on the full growing text (the prefix and the model's own earlier answers, tokenized
whole, which is what the cached chain equals by construction), so an instance costs k passes instead
of one prefix pass and k-1 short steps: per-segment routing changes the keys and values of every later
position, which a shared cache across steps cannot express.

Segments of an MMLU-CD prompt (`edgefuse.evaluate.mmlu_cd.cd_segments` records them as it builds the text):
the header (label `HEADER_SEGMENT`, it names every question's subject, and uses the mean of the instance's
segment mixtures), ``Question j`` with its choices and the blank line after it (label j-1), and ``Answer j:``
with the answer that follows it (label j-1). Tokens are assigned to the segment their text starts in; a token
that straddles a boundary goes to the later segment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from edgefuse.compose.mixture import LoraMixture
from edgefuse.data.prompts import cloze_continuation
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.cloze import ClozeScorer, PackedRows, choose, encode_choices
from edgefuse.evaluate.mmlu_cd import CONTINUATIONS, cd_segments, common_prefix
from edgefuse.evaluate.scoring import continuation_token_ids, head_logprobs, lm_parts, make_batch, unwrap
from edgefuse.tokens import bos_prefix

def token_labels(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(token ids of ``text``, segment label of each token). A boundary's token index is how many
    tokens of the whole text the text before the boundary shares, so any tokenizer works; a BOS the
    tokenizer puts first (`edgefuse.tokens.bos_prefix`) belongs to the first segment."""
    def enc(t: str) -> list[int]:
        return tokenizer(t, add_special_tokens=False).input_ids

    ids = enc(text)
    edges = [0]
    for start, _ in spans[1:]:
        edges.append(max(edges[-1], common_prefix(enc(text[:start]), ids)))
    edges.append(len(ids))
    labels: list[int] = []
    for (_, label), a, b in zip(spans, edges[:-1], edges[1:]):
        labels += [label] * max(0, b - a)
    head = bos_prefix(tokenizer)  # the tokenizer's default BOS starts the text, as in the cached chains
    return head + ids, [spans[0][1]] * len(head) + labels


def label_weights(labels: Sequence[int], segments: torch.Tensor, header: torch.Tensor) -> torch.Tensor:
    """(tokens, pool size) weights: each token its segment's mixture, header tokens ``header``."""
    table = torch.cat([segments, header[None]])  # label HEADER_SEGMENT (-1) → last row
    return table[torch.tensor(labels, dtype=torch.long)]


class MixtureScorer:
    """Batched scoring of token sequences under a `LoraMixture` with one weight row per token.

    Rows are sorted by length and right-padded; padding positions get zero weights and are never read.
    """

    def __init__(self, model, tokenizer, mixture: LoraMixture, batch_size: int = 8):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise EdgefuseError(f"batch size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer, self.mixture, self.batch_size = model, tokenizer, mixture, batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = getattr(unwrap(model).config, "max_position_embeddings", None) or 4096
        self.tokens = 0  # tokens run through the decoder, padding excluded
        self.greedy: torch.Tensor | None = None  # set by `continuations(..., greedy=True)`

    def _hidden(self, seqs: Sequence[Sequence[int]], weights: Sequence[torch.Tensor]):
        device = next(self.model.parameters()).device
        b = make_batch(seqs, self.pad_id, "right", device)
        w = torch.zeros((len(seqs), b.input_ids.shape[1], self.mixture.n_adapters))
        for r, x in enumerate(weights):
            w[r, : x.shape[0]] = x
        self.mixture.set_weights(w)
        body = lm_parts(self.model)[0]
        self.tokens += int(b.attention_mask.sum())
        return body(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                    use_cache=False).last_hidden_state, b

    def _order(self, lengths: Sequence[int], size: int) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return [order[s: s + size] for s in range(0, len(order), size)]

    @torch.inference_mode()
    def next_token(self, seqs: Sequence[Sequence[int]], weights: Sequence[torch.Tensor],
                   token_ids: Sequence[int]) -> torch.Tensor:
        """(n, len(token_ids)) log-probabilities of ``token_ids`` after each sequence."""
        _, head, softcap = lm_parts(self.model)
        out = torch.empty((len(seqs), len(token_ids)), dtype=torch.float32)
        for idx in self._order([len(s) for s in seqs], self.batch_size):
            hidden, b = self._hidden([seqs[i] for i in idx], [weights[i] for i in idx])
            h = hidden[torch.arange(len(idx), device=hidden.device), b.last_index]
            out[torch.tensor(idx)] = head_logprobs(head, softcap, h)[:, list(token_ids)].float().cpu()
        return out

    def encode_cloze(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]]
                     ) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Context and choice ids exactly as `edgefuse.evaluate.cloze.ClozeScorer` encodes and truncates them."""
        return ClozeScorer(self.model, self.tokenizer, max_length=self.max_length).encode(contexts, continuations)

    def continuations(self, ctxs: Sequence[Sequence[int]], conts: Sequence[Sequence[Sequence[int]]],
                      ctx_weights: Sequence[torch.Tensor], cont_weights: Sequence[torch.Tensor],
                      progress: Callable[[int], None] | None = None, greedy: bool = False) -> torch.Tensor:
        """(n, choices) summed log-likelihood of each continuation after its context.

        The packing is `edgefuse.evaluate.cloze.ClozeScorer`'s (the context once, its keys and values
        serve every choice, the LM head only where a continuation token is predicted); this scorer only
        sets, before each of its decoder calls, the mixture of every packed position: a context token
        uses ``ctx_weights[i]`` (one row per context token, (tokens, pool), or one (pool,) for all), a
        choice token ``cont_weights[i]`` (pool,), padding zeros. With ``greedy``, ``self.greedy`` holds
        afterwards whether each continuation is the greedy one (`ClozeScorer`)."""
        for ctx, w in zip(ctxs, ctx_weights):
            if w.ndim == 2 and w.shape[0] != len(ctx):
                raise EdgefuseError(f"internal error: {w.shape[0]} mixture rows for a context of {len(ctx)} tokens")

        def prepare(rows: PackedRows) -> None:
            w = torch.zeros((*rows.part.shape, self.mixture.n_adapters))
            for r, i in enumerate(rows.items):
                ctx, choice = rows.part[r] == 0, rows.part[r] > 0
                cw = torch.as_tensor(ctx_weights[i], dtype=torch.float32)
                w[r, ctx] = cw[rows.index[r, ctx]] if cw.ndim == 2 else cw
                w[r, choice] = torch.as_tensor(cont_weights[i], dtype=torch.float32)
            self.mixture.set_weights(w)

        scorer = ClozeScorer(self.model, self.tokenizer, self.batch_size, self.max_length, prepare=prepare,
                             greedy=greedy)
        out = scorer.score_tokens(ctxs, conts, progress)
        self.tokens += scorer.tokens_scored
        self.greedy = scorer.greedy
        return out


def score_cd(scorer: MixtureScorer, instances: Sequence[Sequence], segments: torch.Tensor, header: torch.Tensor,
             fmt: str = "letters", metric: str = "acc",
             progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(n, k, 4) MMLU-CD scores under per-segment mixtures: ``segments`` (n, k, pool) and ``header``
    (n, pool). Answer j is conditioned on the model's own (metric's) choices at 1..j-1, as in
    `edgefuse.evaluate.mmlu_cd`; instance routing is the case where every segment has one mixture."""
    if not instances:
        return torch.empty((0, 0, 4))
    k = len(instances[0])
    letter_ids = continuation_token_ids(scorer.tokenizer, CONTINUATIONS) if fmt == "letters" else None
    out = torch.empty((len(instances), k, len(instances[0][0].choices)), dtype=torch.float32)
    for s in range(0, len(instances), scorer.batch_size):
        idx = list(range(s, min(len(instances), s + scorer.batch_size)))
        chosen: dict[int, list[int]] = {i: [] for i in idx}
        for j in range(k):
            built = {i: cd_segments(instances[i], chosen[i], fmt) for i in idx}
            texts = {i: text for i, (text, _) in built.items()}
            seqs, weights = [], []
            for i in idx:
                ids, labels = token_labels(scorer.tokenizer, texts[i], built[i][1])
                if scorer.max_length and len(ids) + 8 > scorer.max_length:
                    raise EdgefuseError(f"an MMLU-CD prompt has {len(ids)} tokens, near or over the model's "
                                        f"{scorer.max_length}; use a smaller k")
                seqs.append(ids)
                weights.append(label_weights(labels, segments[i], header[i]))
            if fmt == "letters":
                lp = scorer.next_token(seqs, weights, letter_ids)
                picks = lp.argmax(-1).tolist()
            else:
                conts = []
                for r, i in enumerate(idx):
                    it = instances[i][j]
                    ctx, cs = encode_choices(scorer.tokenizer, texts[i], [cloze_continuation(it, c)
                                                                          for c in range(len(it.choices))])
                    if ctx != seqs[r]:
                        raise EdgefuseError("internal error: the cloze context tokenized two ways")
                    conts.append(cs)
                lp = scorer.continuations(seqs, conts, weights, [segments[i][j] for i in idx])
                lengths = torch.tensor([[len(c) for c in instances[i][j].choices] for i in idx], dtype=torch.float32)
                picks = choose(lp, lengths, metric).tolist()
            out[idx, j] = lp
            for i, p in zip(idx, picks):
                chosen[i].append(p)
        if progress is not None:
            progress(len(idx))
    return out
