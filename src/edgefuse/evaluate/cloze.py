"""Cloze-form multiple-choice scoring: the summed log-likelihood of each answer *text* after a context.

Why: letter scoring leaves small models at chance (SmolLM2-135M answers "A" to almost every MMLU
item), so nothing a fused adapter loses or keeps is visible. Scoring each choice's text as the
continuation of ``Answer:`` (lm-eval-harness's ``mmlu_continuation``) puts the same model above chance.

Why this shape: the naive way (one sequence per choice, lm-eval's default) runs the shared context
through the model once per choice and the LM head (the largest matmul) at every position. Here
each context goes through the decoder body once and its keys and values serve all choices: the
choices' tokens (all but each one's last, which predicts nothing we need) are packed side by side
after the context in the same row, kept apart by a 4-D attention mask, with positions restarting
after the context for each choice (`ClozeScorer`: one decoder call per batch, like letter scoring;
`continuation_logliks`: the same packing as one cached step after an already cached context, for
MMLU-CD's chain). The head runs only at the positions whose next token is a continuation token:
the last context position for the first one, then the continuation's own.

Tokenization follows lm-eval-harness's ``_encode_pair``: trailing whitespace of the context moves
to the continuation, the context is encoded alone, and the continuation tokens are what encoding
``context + continuation`` adds past the context's token count. The context tokens are therefore
the same for every choice, which is what lets one cached context serve them all. Both encodings
start with the tokenizer's default BOS, if it adds one (`edgefuse.tokens`), so continuations carry none.

``acc_norm`` divides the summed log-likelihood by the length in characters of the choice text
*without* the leading space delimiter, as lm-eval-harness does (``len(choice)`` over
``doc_to_choice``), see `choice_lengths`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.scoring import head_logprobs, lm_parts, unwrap
from edgefuse.tokens import bos_prefix, encode_prompts, keep_end

FORMATS = ("letters", "cloze")
METRICS = {"letters": ("acc",), "cloze": ("acc", "acc_norm")}
HEAD_ROWS = 1024  # continuation positions per LM-head call (bounds the rows × vocabulary logits)


def check_format(fmt: str, metric: str | None = None) -> None:
    """One clear error for an unknown scoring format, or a metric the format does not produce."""
    if fmt not in FORMATS:
        raise EdgefuseError(f"unknown scoring format {fmt!r}; use one of: {', '.join(FORMATS)}")
    if metric is not None and metric not in METRICS[fmt]:
        raise EdgefuseError(f"metric {metric!r} is not produced by the {fmt} format; "
                            f"{fmt} gives: {', '.join(METRICS[fmt])}")


def choice_lengths(continuations: Sequence[str], delimiter: str = " ") -> list[int]:
    """Characters of each choice text, as lm-eval-harness's acc_norm counts them: the continuation
    minus its one leading target delimiter (the space), so ``" Paris"`` counts 5."""
    return [len(c) - len(delimiter) if delimiter and c.startswith(delimiter) else len(c) for c in continuations]


def normalised(loglik: torch.Tensor, lengths) -> torch.Tensor:
    """acc_norm scores: log-likelihood per character (an empty choice gives -inf, never chosen,
    as lm-eval's numpy division does)."""
    return loglik / torch.as_tensor(lengths, dtype=loglik.dtype)


def choose(loglik: torch.Tensor, lengths, metric: str = "acc") -> torch.Tensor:
    """Index of the chosen continuation along the last dimension: max log-likelihood (acc) or max
    log-likelihood per character (acc_norm)."""
    if metric == "acc":
        return loglik.argmax(-1)
    if metric == "acc_norm":
        return normalised(loglik, lengths).argmax(-1)
    raise EdgefuseError(f"unknown metric {metric!r}; use acc or acc_norm")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-eval-harness's boundary rule (module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx, whole = encode_prompts(tokenizer, [context, context + continuation])
    return ctx, whole[len(ctx):]


def encode_choices(tokenizer, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """`encode_pair` for every continuation of one context (the context ids do not depend on it)."""
    ctx, *wholes = encode_prompts(tokenizer, [context.rstrip(), *(context + c for c in continuations)])
    return ctx, [w[len(ctx):] for w in wholes]


def pack(choices: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """One context's continuations side by side, each without its last token (it predicts nothing
    that is scored): (tokens, choice index of each, offset of each inside its choice)."""
    tokens, seg, offset = [], [], []
    for c, cont in enumerate(choices):
        tokens += cont[:-1]
        seg += [c] * max(0, len(cont) - 1)
        offset += list(range(max(0, len(cont) - 1)))
    return tokens, seg, offset


def additive_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """(rows, 1, queries, keys) additive mask from a boolean one; a row that may see nothing (padding)
    gets a uniform softmax rather than NaN, and its output is never read."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def gather_logliks(head, softcap, hidden: torch.Tensor, targets: Sequence[int], owners: Sequence[int],
                   n_out: int, misses: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of ``hidden`` of log p(target | hidden) into ``owners``; the LM head runs on
    these rows only, a chunk at a time. ``misses`` (n_out,), when given, counts into each owner the
    targets that are not the most likely token (0: the continuation is the greedy one, lm-eval's is_greedy)."""
    device = hidden.device
    targets_t = torch.tensor(targets, dtype=torch.long, device=device)
    picked = torch.empty(len(targets), dtype=torch.float32, device=device)
    missed = None if misses is None else torch.empty(len(targets), dtype=torch.float32, device=device)
    for s in range(0, len(targets), HEAD_ROWS):
        lp = head_logprobs(head, softcap, hidden[s: s + HEAD_ROWS])
        picked[s: s + HEAD_ROWS] = lp.gather(1, targets_t[s: s + HEAD_ROWS, None])[:, 0]
        if missed is not None:
            missed[s: s + HEAD_ROWS] = (lp.argmax(1) != targets_t[s: s + HEAD_ROWS]).float()
    owners_t = torch.tensor(owners, dtype=torch.long, device=device)
    if missed is not None:
        misses.index_add_(0, owners_t.to(misses.device), missed.to(misses.device))
    return torch.zeros(n_out, dtype=torch.float32, device=device).index_add_(0, owners_t, picked)


def continuation_logliks(body, head, softcap, cache, mask: torch.Tensor, last_hidden: torch.Tensor,
                         conts: Sequence[Sequence[Sequence[int]]], pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed log-likelihoods (rows, choices) of continuation tokens after cached contexts.

    ``cache`` holds the rows' contexts (live positions: ``mask`` == 1, positions numbered over live
    tokens only, the last column being each row's last context token); ``last_hidden`` is the
    decoder output there, which predicts every continuation's first token. The other tokens are
    predicted from the continuation's own earlier tokens: all choices of a row are packed side by
    side (`pack`) into one row of a single cached forward, with a 4-D mask that lets each choice
    see the live context and its own earlier tokens only, and positions that restart after the
    context for each choice — one context serves all its choices with no copy of the cache and
    little padding. The cache is cropped back afterwards, so the caller's cache is as it was.
    Returns the scores and the number of tokens run."""
    device = mask.device
    rows, n_choices = len(conts), len(conts[0])
    flat = [c for row in conts for c in row]
    nonempty = torch.tensor([bool(c) for c in flat], device=device)
    hiddens = [last_hidden.repeat_interleave(n_choices, 0)[nonempty]]
    owners = [r for r, c in enumerate(flat) if c]
    targets = [c[0] for c in flat if c]
    packs = [pack(row) for row in conts]
    width = max(len(p[0]) for p in packs)
    tokens = 0
    if width:
        seg = torch.full((rows, width), -1, dtype=torch.long)  # choice of each packed token, -1: padding
        offset = torch.zeros((rows, width), dtype=torch.long)
        ids = torch.full((rows, width), pad_id, dtype=torch.long)
        for r, ((toks, sg, off), row) in enumerate(zip(packs, conts)):
            if toks:
                ids[r, : len(toks)], seg[r, : len(toks)], offset[r, : len(toks)] = (
                    torch.tensor(toks), torch.tensor(sg), torch.tensor(off))
            owners += [r * n_choices + c for c in sg]
            targets += [t for cont in row for t in cont[1:]]
        seg, offset, ids = seg.to(device), offset.to(device), ids.to(device)
        live = mask.sum(1)  # live tokens per context = position of its continuations' first token
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        real = seg[:, :, None] >= 0
        own = (seg[:, :, None] == seg[:, None, :]) & causal & real
        allowed = torch.cat([(mask[:, None, :] > 0) & real, own], 2)
        past = cache.get_seq_length()
        out = body(input_ids=ids, attention_mask=additive_mask(allowed, last_hidden.dtype),
                   position_ids=live[:, None] + offset, past_key_values=cache, use_cache=True,
                   cache_position=torch.arange(past, past + width, device=device)).last_hidden_state
        cache.crop(past)
        r_idx, t_idx = (seg >= 0).nonzero(as_tuple=True)  # row-major: the order of targets above
        hiddens.append(out[r_idx, t_idx])
        tokens = len(r_idx)
    sums = gather_logliks(head, softcap, torch.cat(hiddens), targets, owners, len(flat))
    return sums.view(rows, n_choices), tokens


@dataclass(frozen=True)
class PackedRows:
    """What each position of one packed batch holds, for a caller that runs the batch its own way.

    ``items``: the input index each row holds; ``part`` (rows, width): 0 for a context token, c + 1
    for a token of choice c, -1 for padding; ``index`` (rows, width): a context token's index in its
    (encoded, possibly truncated) context, a choice token's offset inside its choice. CPU tensors."""

    items: list[int]
    part: torch.Tensor
    index: torch.Tensor


class ClozeScorer:
    """Summed log-likelihood of each continuation given its context, in one forward pass per batch.

    Each row holds a context followed by its choices packed side by side (`pack`); a 4-D attention
    mask lets the context attend causally to itself and each choice to the context and its own
    earlier tokens only, and each choice's positions restart right after the context. So the
    context's keys and values are computed once and serve all choices, with no cache copies and
    one decoder call per batch, as in letter scoring. Rows are sorted by total length and left
    padded. Equal to scoring each context + continuation alone (tests).

    ``prepare``, if given, is called with each batch's `PackedRows` right before its decoder call: a
    model whose forward depends on the row or the token (a per-row adapter mixture,
    `edgefuse.evaluate.mixture`) sets itself up there, and the packing stays this one algorithm.
    With ``greedy``, `score_tokens` also leaves in ``self.greedy`` (n, n_choices) whether every token of
    each continuation is the most likely one (lm-eval's ``is_greedy``); off, nothing extra is computed.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 prepare: Callable[[PackedRows], None] | None = None, greedy: bool = False):
        self.model, self.tokenizer, self.batch_size, self.prepare = model, tokenizer, batch_size, prepare
        self.max_length = max_length or getattr(unwrap(model).config, "max_position_embeddings", 4096)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.tokens_scored = 0  # tokens run through the decoder (contexts + continuations, no padding)
        self.track_greedy = greedy
        self.greedy: torch.Tensor | None = None

    def encode(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]]
               ) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Context ids and continuation ids per choice; over-long contexts keep their BOS (if any) and
        their end (the question and ``Answer:`` matter most), so context + continuation fits the model."""
        if len(contexts) != len(continuations):
            raise EdgefuseError("cloze scoring needs one list of continuations per context")
        if continuations and len({len(c) for c in continuations}) != 1:
            raise EdgefuseError("cloze scoring needs the same number of choices for every context")
        ctxs, conts, head = [], [], bos_prefix(self.tokenizer)
        for context, cs in zip(contexts, continuations):
            ctx, cont = encode_choices(self.tokenizer, context, cs)
            if not ctx:
                raise EdgefuseError("cloze scoring needs a non-empty context")
            keep = max(1, self.max_length + 1 - max(len(c) for c in cont))
            ctxs.append(keep_end(ctx, keep, head))
            conts.append(cont)
        return ctxs, conts

    @torch.inference_mode()
    def score_tokens(self, ctxs: Sequence[Sequence[int]], conts: Sequence[Sequence[Sequence[int]]],
                     progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """(n, n_choices) float32 summed log-likelihoods; ``progress(k)`` after each batch of k."""
        if not ctxs:
            return torch.empty((0, 0), dtype=torch.float32)
        body, head, softcap = lm_parts(self.model)
        device = next(self.model.parameters()).device
        n_choices = len(conts[0])
        out = torch.empty((len(ctxs), n_choices), dtype=torch.float32)
        misses = torch.zeros(len(ctxs) * n_choices) if self.track_greedy else None
        packs = [pack(c) for c in conts]
        order = sorted(range(len(ctxs)), key=lambda i: (-(len(ctxs[i]) + len(packs[i][0])), i))
        for s in range(0, len(order), self.batch_size):
            idx = order[s: s + self.batch_size]
            width = max(len(ctxs[i]) + len(packs[i][0]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            seg = torch.full((len(idx), width), -1, dtype=torch.long)  # 0: context, c+1: choice c, -1: pad
            pos = torch.zeros((len(idx), width), dtype=torch.long)
            last = []  # column of each row's last context token
            owners, targets, later_owners, later_targets = [], [], [], []
            for r, i in enumerate(idx):
                toks, sg, off = packs[i]
                n = len(ctxs[i])
                start = width - n - len(toks)
                ids[r, start:] = torch.tensor(list(ctxs[i]) + toks, dtype=torch.long)
                seg[r, start: start + n] = 0
                pos[r, start: start + n] = torch.arange(n)
                if toks:
                    seg[r, start + n:] = torch.tensor(sg) + 1
                    pos[r, start + n:] = n + torch.tensor(off)
                last.append(start + n - 1)
                for c, cont in enumerate(conts[i]):
                    if cont:
                        owners.append(r * n_choices + c)
                        targets.append(cont[0])
                later_owners += [r * n_choices + c for c in sg]
                later_targets += [t for cont in conts[i] for t in cont[1:]]
            if self.prepare is not None:
                n_ctx = torch.tensor([len(ctxs[i]) for i in idx])[:, None]
                self.prepare(PackedRows(list(idx), seg.clone(), torch.where(seg > 0, pos - n_ctx, pos)))
            ids, seg, pos = ids.to(device), seg.to(device), pos.to(device)
            causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
            qi, kj = seg[:, :, None], seg[:, None, :]
            allowed = causal & (qi >= 0) & (kj >= 0) & ((kj == 0) | (kj == qi))
            hidden = body(input_ids=ids, attention_mask=additive_mask(allowed, head.weight.dtype),
                          position_ids=pos, use_cache=False).last_hidden_state
            at_last = hidden[torch.arange(len(idx), device=device), torch.tensor(last, device=device)]
            first = at_last.repeat_interleave(n_choices, 0)[
                torch.tensor([bool(c) for i in idx for c in conts[i]], device=device)]
            r_idx, t_idx = (seg > 0).nonzero(as_tuple=True)  # row-major: the order of later_targets
            batch_misses = None if misses is None else torch.zeros(len(idx) * n_choices)
            ll = gather_logliks(head, softcap, torch.cat([first, hidden[r_idx, t_idx]]),
                                targets + later_targets, owners + later_owners, len(idx) * n_choices, batch_misses)
            out[torch.tensor(idx)] = ll.view(len(idx), n_choices).cpu()
            if misses is not None:
                misses.view(len(ctxs), n_choices)[torch.tensor(idx)] = batch_misses.view(len(idx), n_choices)
            self.tokens_scored += int((seg >= 0).sum())
            if progress is not None:
                progress(len(idx))
        if misses is not None:
            self.greedy = misses.view(len(ctxs), n_choices) == 0
        return out

    def score(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]],
              progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """(n, n_choices) float32 summed log-likelihood of ``continuations[i][c]`` after ``contexts[i]``."""
        return self.score_tokens(*self.encode(contexts, continuations), progress=progress)
