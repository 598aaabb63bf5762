"""A naive cloze reference: lm-eval-harness's context/continuation boundary and one unbatched forward per choice,
written independently of edgefuse's packed scorer (`edgefuse.evaluate.cloze`)."""

from __future__ import annotations

import torch


def ref_pair(tok, context, continuation, specials=False):
    """lm-eval-harness's boundary rule, written out again independently of the library; ``specials``:
    encode as the tokenizer does by default (with its BOS, for a BOS-adding tokenizer)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tok(stripped, add_special_tokens=specials).input_ids
    whole = tok(stripped + continuation, add_special_tokens=specials).input_ids
    return ctx, whole[len(ctx):]


def naive_scores(model, tok, contexts, continuations, specials=False):
    """One unbatched forward per (context + continuation), summed log-softmax over the whole vocabulary of the
    continuation tokens (each predicted from the position before it). Only the positions that predict them get
    logits (transformers' ``logits_to_keep``: the same forward, the LM head applied to fewer rows)."""
    out = torch.empty((len(contexts), len(continuations[0])))
    with torch.no_grad():
        for i, (context, conts) in enumerate(zip(contexts, continuations)):
            for c, cont in enumerate(conts):
                ctx, tail = ref_pair(tok, context, cont, specials)
                # the last len(tail) + 1 positions: position len(ctx) - 1 + t predicts tail[t]
                logits = model(torch.tensor([ctx + tail]), logits_to_keep=len(tail) + 1).logits[0]
                lp = torch.log_softmax(logits.float(), -1)
                out[i, c] = sum(float(lp[t, x]) for t, x in enumerate(tail))
    return out
