"""SentencePiece tokenizers from GGUF files, segmented as llama.cpp segments them.

Why: transformers 4.57 turns the SentencePiece vocabulary of a Gemma GGUF into a Unigram model scored by the
file's ``tokenizer.ggml.scores``. In these files the scores are negated merge ranks, not log-probabilities, so
the Unigram search prefers many short pieces (" Industrial" becomes "▁I", "nd", "ust", "ri", "al") and prompts
reach the model in a segmentation it was never trained on. llama.cpp reads the same scores as merge priorities
(adjacent pieces merge, the highest-scoring result first); a BPE whose merges are ordered by the merged piece's
score is that algorithm, so the Unigram model is replaced by it once, when the GGUF is cached.
"""

from __future__ import annotations

import json
from pathlib import Path


def gguf_spm_pieces(gguf: Path) -> list[tuple[str, float]] | None:
    """The GGUF's pieces and scores when its tokenizer is SentencePiece (``llama``), else None."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    kind = fields.get("tokenizer.ggml.model")
    if kind is None or kind.contents() != "llama" or "tokenizer.ggml.scores" not in fields:
        return None
    return list(zip(fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()))


def bpe_model(pieces: list[tuple[str, float]], unk_id: int | None) -> dict:
    """A ``tokenizers`` BPE model (as JSON) that merges adjacent pieces highest score first, with byte fallback.

    Literal spaces in pieces become "▁" (the normalizer turns every space into "▁" before the model runs), as
    transformers' own converter does; where two pieces then coincide the first id keeps the piece.
    """
    from transformers.convert_slow_tokenizer import generate_merges

    pieces = [(p.replace(" ", "▁"), float(s)) for p, s in pieces]
    vocab: dict[str, int] = {}
    for i, (p, _) in enumerate(pieces):
        vocab.setdefault(p, i)
    merges = generate_merges(vocab, pieces)
    return {"type": "BPE", "dropout": None, "unk_token": pieces[unk_id][0] if unk_id is not None else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
            "ignore_merges": False, "vocab": vocab, "merges": [list(m) for m in merges]}


def spm_as_bpe(tokenizer_json: Path, gguf: Path) -> bool:
    """Rewrite a saved tokenizer whose model transformers made a Unigram from a SentencePiece GGUF; True if done.

    Everything else in the file (normalizer, added and special tokens, BOS template, decoder) is kept.
    """
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "Unigram":
        return False
    pieces = gguf_spm_pieces(gguf)
    if pieces is None or len(pieces) != len(data["model"]["vocab"]):
        return False
    data["model"] = bpe_model(pieces, data["model"].get("unk_id"))
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return True
