"""The naive per-choice mixture cloze scorer, kept as the reference the packed one must equal.

It was the library's until the mixture's cloze scoring moved onto `edgefuse.evaluate.cloze.ClozeScorer`'s
packing: every (context, choice) pair is its own right-padded row, the context repeated once per choice,
each token carrying its own mixture weights, and the LM head is read at the continuation positions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgefuse.evaluate.cloze import gather_logliks
from edgefuse.evaluate.scoring import lm_parts, make_batch


@torch.inference_mode()
def naive_mixture_continuations(model, mixture, ctxs: Sequence[Sequence[int]],
                                conts: Sequence[Sequence[Sequence[int]]], ctx_weights: Sequence[torch.Tensor],
                                cont_weights: Sequence[torch.Tensor], pad_id: int = 0,
                                batch_size: int = 8) -> torch.Tensor:
    """(n, choices) summed log-likelihoods; ``ctx_weights[i]`` is (tokens, pool) or (pool,), ``cont_weights[i]``
    (pool,); ``mixture`` is an active `edgefuse.compose.LoraMixture` on ``model``."""
    body, head, softcap = lm_parts(model)
    n_choices = len(conts[0])
    rows = [(i, c) for i in range(len(ctxs)) for c in range(n_choices)]
    seqs = [list(ctxs[i]) + list(conts[i][c][:-1]) for i, c in rows]
    out = torch.zeros(len(rows), dtype=torch.float32)
    order = sorted(range(len(rows)), key=lambda r: (-len(seqs[r]), r))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        b = make_batch([seqs[r] for r in idx], pad_id, "right", "cpu")
        w = torch.zeros((len(idx), b.input_ids.shape[1], mixture.n_adapters))
        for row, r in enumerate(idx):
            i, c = rows[r]
            cw = torch.as_tensor(ctx_weights[i], dtype=torch.float32)
            cw = cw.expand(len(ctxs[i]), -1) if cw.ndim == 1 else cw
            extra = max(0, len(conts[i][c]) - 1)
            w[row, : len(seqs[r])] = torch.cat([cw, torch.as_tensor(cont_weights[i]).expand(extra, -1)])
        mixture.set_weights(w)
        hidden = body(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                      use_cache=False).last_hidden_state
        picks, targets, owners = [], [], []
        for row, r in enumerate(idx):
            i, c = rows[r]
            for t, tok in enumerate(conts[i][c]):
                picks.append((row, len(ctxs[i]) - 1 + t))
                targets.append(tok)
                owners.append(row)
        if picks:
            at = torch.tensor(picks)
            out[torch.tensor(idx)] = gather_logliks(head, softcap, hidden[at[:, 0], at[:, 1]], targets, owners,
                                                    len(idx)).cpu()
    return out.view(len(ctxs), n_choices)
