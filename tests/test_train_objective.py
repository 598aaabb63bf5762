"""Answer-text (cloze) training: the loss against Hugging Face's own masked-label loss, the answer mask on
a worked example, and training that lowers what it optimises (and leaves the other objective's loss alone
in the letters case)."""

from __future__ import annotations

import pytest
import torch

from edgefuse.data.mmlu import select
from edgefuse.data.prompts import cloze_continuation, cloze_prompt
from edgefuse.edge.batching import encode_cloze_items
from edgefuse.edge.plan import save_pruned
from edgefuse.edge.prune import prune_model
from edgefuse.edge.train import TrainConfig, answer_mask, cloze_loss, train_edge
from edgefuse.evaluate.scoring import lm_parts, make_batch
from edgefuse.models import tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def items(mmlu):
    return select(mmlu, "edge", domains=["stem"], limit=12, seed=0)


@pytest.fixture(scope="module")
def base():
    return tiny_model(layers=2)


def test_answer_mask_marks_the_last_real_tokens_of_each_row():
    b = make_batch([[5, 6, 7, 8], [9, 10]], 0, "right", "cpu")
    got = answer_mask(b, [2, 1])
    assert got.tolist() == [[False, False, True, True], [False, True, False, False]]


def test_cloze_encoding_ends_with_the_gold_answer_text(base, items):
    _, tok = base
    seqs, n_answer = encode_cloze_items(tok, items[:4], seq=512)
    for s, n, it in zip(seqs, n_answer, items):
        assert tok.decode(s[-n:]) == cloze_continuation(it, it.answer)
        assert tok.decode(s[:-n]) == cloze_prompt(it)


def test_cloze_loss_equals_hf_masked_label_loss(base, items):
    """Our loss (head only at answer positions) = HF's causal-LM loss with every non-answer label ignored."""
    model, tok = base
    seqs, n_answer = encode_cloze_items(tok, items[:5], seq=60)
    b = make_batch(seqs, 0, "right", "cpu")
    mask = answer_mask(b, n_answer)
    labels = b.input_ids.masked_fill(~mask, -100)
    body, head, softcap = lm_parts(model)
    with torch.no_grad():
        got = cloze_loss(body, head, softcap, b, mask)
        ref = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                    labels=labels).loss
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)


def _cloze_loss_of(model_dir, items, adapter=None):
    from edgefuse.edge.plan import load_pruned

    model, tok, _ = load_pruned(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    seqs, n_answer = encode_cloze_items(tok, items, seq=60)
    b = make_batch(seqs, 0, "right", "cpu")
    body, head, softcap = lm_parts(model)
    with torch.no_grad():
        return cloze_loss(body, head, softcap, b, answer_mask(b, n_answer)).item()


@pytest.mark.parametrize("objective,drop", [("cloze", 0.1), ("both", 0.03)])
def test_training_on_answer_text_lowers_the_answer_text_loss(tmp_path, base, items, objective, drop):
    """Half of ``both``'s gradient is the letter loss, so its answer-text loss falls less far."""
    model, tok = base
    res = prune_model(model, tok, method="magnitude", structure="width", ratio=0.5,
                      calib_prompts=[cloze_prompt(it) for it in items[:4]])
    d = save_pruned(res, tok, tmp_path / "pruned")
    cfg = TrainConfig(steps=8, batch=4, seq=60, lr=2e-2, objective=objective, checkpoint_every=0)
    pkg = train_edge(d, "stem", items, cfg, tmp_path / "pkg", progress=lambda *a, **k: None)
    before, after = _cloze_loss_of(d, items), _cloze_loss_of(d, items, pkg)
    assert after < before - drop, (before, after)
    import json

    man = json.loads((pkg / "edgefuse.json").read_text())
    assert man["train"]["objective"] == objective and "answer-text" in man["loss"]
