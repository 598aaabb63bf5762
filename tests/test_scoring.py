"""The batched letter scorer must equal an unbatched full-logits reference, whatever the padding."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.choices import assert_same_choices

from edgefuse.data.prompts import mc_prompt
from edgefuse.evaluate.scoring import LetterScorer, continuation_token_ids

pytestmark = pytest.mark.unit


def reference_scores(model, tok, prompts, specials=False):
    """One unbatched forward per prompt, full logits, log-softmax at the last position; ``specials``:
    encode as the tokenizer does by default (with its BOS, for a BOS-adding tokenizer)."""
    ids = continuation_token_ids(tok, [" A", " B", " C", " D"])
    rows = []
    with torch.no_grad():
        for p in prompts:
            x = tok(p, add_special_tokens=specials, return_tensors="pt").input_ids
            rows.append(torch.log_softmax(model(x).logits[0, -1].float(), -1)[ids])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def prompts(mmlu):
    items = random.Random(0).sample(mmlu.items, 12)
    return [mc_prompt(it)[-300:] for it in items]  # varied lengths, short enough for the tiny model


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_batched_equals_unbatched_reference(tiny, prompts, side, batch_size):
    model, tok = tiny
    ref = reference_scores(model, tok, prompts)
    got = LetterScorer(model, tok, batch_size=batch_size, padding_side=side).score(prompts)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_bos_tokenizer_scores_prompts_as_it_encodes_them_by_default(tiny, prompts, side):
    from helpers.bos_tokenizer import with_default_bos

    model, tok = tiny
    btok = with_default_bos(tok)
    ref = reference_scores(model, btok, prompts, specials=True)
    got = LetterScorer(model, btok, batch_size=3, padding_side=side).score(prompts)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert not torch.allclose(got, reference_scores(model, tok, prompts), atol=1e-3)  # the BOS is seen


def test_order_and_padding_do_not_change_predictions(tiny, prompts):
    model, tok = tiny
    base = LetterScorer(model, tok, batch_size=4, padding_side="right").score(prompts)
    perm = list(range(len(prompts)))
    random.Random(1).shuffle(perm)
    shuffled = LetterScorer(model, tok, batch_size=4, padding_side="left").score([prompts[i] for i in perm])
    assert torch.allclose(base[perm], shuffled, atol=1e-4)
    assert_same_choices(shuffled, base[perm], atol=1e-4)  # the same answer wherever it is not a near tie


def test_scores_are_log_probabilities_of_the_letters(tiny, prompts):
    """Letter log-probs are ≤ 0 and their exp sums to at most 1 (they are part of a full softmax)."""
    model, tok = tiny
    s = LetterScorer(model, tok).score(prompts[:4])
    assert (s <= 0).all()
    assert (s.exp().sum(1) <= 1 + 1e-5).all()


def test_scorer_works_through_a_peft_wrapper(tiny, prompts):
    """LoRA injected by PEFT must be active in the scorer's body-only forward pass."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    m = copy.deepcopy(model)
    peft_model = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                              init_lora_weights=False))
    peft_model.eval()
    ref = reference_scores(peft_model, tok, prompts[:5])
    got = LetterScorer(peft_model, tok, batch_size=2).score(prompts[:5])
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(got, reference_scores(model, tok, prompts[:5]), atol=1e-3)
