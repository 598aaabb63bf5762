"""On the real SmolLM2-135M: edgefuse's letter scores equal a plain unbatched HF forward (log-softmax over the whole
vocabulary at the last position), on 24 questions."""

from __future__ import annotations

import pytest
import torch

from edgefuse.data.mmlu import select
from edgefuse.data.prompts import mc_prompt
from edgefuse.evaluate.scoring import LetterScorer, continuation_token_ids

pytestmark = [pytest.mark.unit, pytest.mark.slow]


def test_letter_scores_match_plain_reference(mmlu):
    from edgefuse.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    items = select(mmlu, "test", limit=24, seed=0)
    prompts = [mc_prompt(it) for it in items]
    letters = continuation_token_ids(tok, [" A", " B", " C", " D"])
    ref = []
    with torch.no_grad():
        for p in prompts:
            x = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
            ref.append(torch.log_softmax(model(input_ids=x, logits_to_keep=1).logits[0, -1].float(), -1)[letters])
    ref = torch.stack(ref)
    got = LetterScorer(model, tok, batch_size=8).score(prompts)
    assert (got - ref).abs().max().item() <= 1e-4
