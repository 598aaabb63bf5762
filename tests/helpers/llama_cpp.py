"""llama.cpp's SentencePiece segmentation rule, re-implemented plainly as a reference for tokenizer tests."""

from __future__ import annotations


def llama_cpp_segment(text: str, vocab: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece rule, written plainly: spaces become "▁", then repeatedly merge the adjacent
    pair whose concatenation is a piece with the highest score (leftmost on ties); unknown symbols fall back
    to their UTF-8 bytes."""
    syms = list(text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            j = vocab.get(syms[i] + syms[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    ids = []
    for s in syms:
        ids += [vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
    return ids
