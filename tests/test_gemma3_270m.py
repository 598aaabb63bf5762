"""The embedded Gemma 3 270M: a Gemma 3 text model loaded from its assembled GGUF, fingerprinted, cached, with
a tokenizer that segments as llama.cpp, and usable from the CLI (issue 16's `eval mmlu --model gemma3-270m`).

Slow: the first load dequantizes the GGUF (about 80 s of CPU); later loads read the cached safetensors.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma():
    from edgefuse.models import load_model

    return load_model(NAME, device="cpu")


def test_is_a_gemma3_text_model_with_a_stable_fingerprint(gemma):
    from edgefuse.edge.families import family_for
    from edgefuse.models import fingerprint, load_model

    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert family_for(model.config).label == "Gemma 3 (text)"
    assert model.config.name_or_path == NAME and tok.pad_token is not None
    again, _ = load_model(NAME, device="cpu")  # from the cache this time
    assert fingerprint(again) == fingerprint(model)


def test_tokenizer_segments_mmlu_prompts_as_llama_cpp(gemma, mmlu, llama_cpp_segment):
    """The cached tokenizer gives llama.cpp's segmentation of real prompts under the real 262k vocabulary."""
    from edgefuse.assets import embedded_gguf
    from edgefuse.data.prompts import mc_prompt
    from edgefuse.gguf_tokenizer import gguf_spm_pieces

    _, tok = gemma
    pieces = gguf_spm_pieces(embedded_gguf(NAME))
    vocab = {p.replace(" ", "▁"): i for i, (p, _) in reversed(list(enumerate(pieces)))}
    scores = [s for _, s in pieces]
    for item in mmlu.items[::1409][:10]:
        text = mc_prompt(item)
        assert tok(text, add_special_tokens=False).input_ids == llama_cpp_segment(text, vocab, scores)


def test_cli_eval_mmlu_20_items(gemma, tmp_path):
    from typer.testing import CliRunner

    import edgefuse.cli as cli
    from edgefuse.models import fingerprint

    out = tmp_path / "mmlu.json"
    r = CliRunner().invoke(cli.app, ["eval", "mmlu", "--model", NAME, "--limit", "20", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["n"] == 20 and len(res["items"]) == 20
    assert res["model"] == NAME and res["model_fingerprint"] == fingerprint(gemma[0])
    overall = res["accuracy"]["overall"]
    assert overall["n"] == 20 and 0.0 <= overall["lo"] <= overall["acc"] <= overall["hi"] <= 1.0


def test_prompts_start_with_gemmas_bos_once_and_cloze_equals_its_reference(gemma, mmlu):
    """Gemma's tokenizer adds ``<bos>`` by default and the model needs it; every scored prompt starts with it once,
    continuations carry none, and the packed cloze scorer equals a naive one-forward-per-choice reference that
    encodes as the tokenizer does by default."""
    from test_cloze import assert_same, naive_scores

    from edgefuse.data.mmlu import select
    from edgefuse.data.prompts import cloze_continuation, cloze_prompt, mc_prompt
    from edgefuse.evaluate.cloze import ClozeScorer
    from edgefuse.evaluate.scoring import LetterScorer

    model, tok = gemma
    bos = tok.bos_token_id
    assert tok.convert_ids_to_tokens(bos) == "<bos>"
    items = select(mmlu, "test", limit=3, seed=0)
    for seq in LetterScorer(model, tok).encode([mc_prompt(it) for it in items]):
        assert seq[0] == bos and bos not in seq[1:]
    contexts = [cloze_prompt(it) for it in items]
    conts = [[cloze_continuation(it, c) for c in range(4)] for it in items]
    scorer = ClozeScorer(model, tok, batch_size=3)
    ctxs, tails = scorer.encode(contexts, conts)
    assert all(c[0] == bos and bos not in c[1:] for c in ctxs) and all(bos not in t for ts in tails for t in ts)
    assert_same(scorer.score(contexts, conts), naive_scores(model, tok, contexts, conts, specials=True), conts)
