"""A SentencePiece GGUF's tokenizer segments text as llama.cpp does (edgefuse.gguf_tokenizer).

A tiny GGUF holding only a Gemma-style vocabulary (negated merge ranks as scores, byte fallback pieces) goes
through transformers' own GGUF tokenizer loader; the rewritten tokenizer must give the ids of a plain
re-implementation of llama.cpp's rule (merge the adjacent pair whose result scores highest, leftmost first).
"""

from __future__ import annotations

import json

import pytest

from edgefuse.gguf_tokenizer import gguf_spm_pieces, spm_as_bpe

pytestmark = pytest.mark.unit

TRAIN = """Photosynthesis converts light energy into chemical energy stored in glucose. The mitochondria release that
energy during cellular respiration. A contract requires an offer, an acceptance and consideration. The court held
that the defendant breached the contract. Inflation reduces the purchasing power of money over time, and central
banks raise interest rates to contain it. The derivative of a constant is zero; the integral of a derivative
recovers the function up to a constant."""
HELD_OUT = [
    "The defendant's contract converts interest into energy.",
    "Central banks hold that respiration requires light, money and glucose!",
    "An integral of zero energy is a constant: über-naïve 42",
    "  two leading spaces and\ttabs\nnewlines",
]


def _write_gguf(path, kind: str, tokens: list[str], scores: list[float], types: list[int]):
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for add, i in ((w.add_pad_token_id, 0), (w.add_eos_token_id, 1), (w.add_bos_token_id, 2), (w.add_unk_token_id, 3)):
        add(i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A GGUF with only a Gemma-like tokenizer: specials, 256 byte pieces, then BPE-learned pieces scored -rank."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.train_from_iterator(TRAIN.split("\n"), trainers.BpeTrainer(vocab_size=260, show_progress=False))
    learned = [p for p, _ in sorted(t.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    scores = [-1000.0] * 4 + [0.0] * 256 + [-float(r) for r in range(len(learned))]
    types = [3] * 4 + [6] * 256 + [1] * len(learned)
    path = _write_gguf(tmp_path_factory.mktemp("gguf") / "spm.gguf", "llama", tokens, scores, types)
    return path, {p: i for i, p in enumerate(tokens)}, scores


def _transformers_tokenizer(gguf_path, out):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
    return out / "tokenizer.json"


def test_rewritten_tokenizer_segments_as_llama_cpp(spm_gguf, tmp_path, llama_cpp_segment):
    from transformers import AutoTokenizer

    path, vocab, scores = spm_gguf
    tj = _transformers_tokenizer(path, tmp_path / "tok")
    before = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert spm_as_bpe(tj, path)
    after = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    differs = 0
    for text in HELD_OUT + TRAIN.split("\n"):
        expected = llama_cpp_segment(text, vocab, scores)
        got = after(text).input_ids
        assert got == [vocab["<bos>"]] + expected, text
        # transformers' Gemma GGUF decoder strips one leading space; decoding is otherwise exact
        assert after.decode(got, skip_special_tokens=True) == (text[1:] if text.startswith(" ") else text)
        differs += before(text).input_ids != got
    assert differs, "the Unigram tokenizer transformers made already agreed with llama.cpp: the test lost its point"


def test_other_tokenizers_are_left_alone(spm_gguf, tmp_path):
    """A BPE tokenizer (e.g. SmolLM2's gpt2 GGUF) is not touched, nor a GGUF without a SentencePiece vocabulary."""
    path, _, _ = spm_gguf
    tj = _transformers_tokenizer(path, tmp_path / "tok")
    assert spm_as_bpe(tj, path)
    rewritten = tj.read_text(encoding="utf-8")
    assert not spm_as_bpe(tj, path) and tj.read_text(encoding="utf-8") == rewritten
    assert json.loads(rewritten)["model"]["type"] == "BPE"
    assert gguf_spm_pieces(path)[:2] == [("<pad>", -1000.0), ("<eos>", -1000.0)]
    other = _write_gguf(tmp_path / "bpe.gguf", "gpt2", ["<pad>", "<eos>", "<bos>", "<unk>", "a"], [0.0] * 5, [3] * 4 + [1])
    assert gguf_spm_pieces(other) is None
