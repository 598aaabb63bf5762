"""Where an MMLU-CD prompt's segments start, found by searching its text: the reference for the spans that
`edgefuse.evaluate.mmlu_cd.cd_segments` records while it builds the text (the library searched this way until
issue 23 made the spans part of the request)."""

from __future__ import annotations

from collections.abc import Sequence

HEADER = -1


def searched_spans(text: str, items: Sequence) -> list[tuple[int, int]]:
    """(first character, label): the header, ``Question j: <question>``, then the answer cues (``\\n\\nAnswer 1:``,
    ``\\nAnswer j:``) that the text holds so far."""
    spans, cursor = [(0, HEADER)], 0
    for j, it in enumerate(items):
        q = f"Question {j + 1}: {it.question.strip()}"
        pos = text.find(q, cursor)
        assert pos >= 0, f"question {j + 1} not in the prompt"
        spans.append((pos, j))
        cursor = pos + len(q)
    for j in range(len(items)):
        cue = "\n\nAnswer 1:" if j == 0 else f"\nAnswer {j + 1}:"
        pos = text.find(cue, cursor)
        if pos < 0:
            assert j > 0, "'Answer 1:' not in the prompt"
            break
        spans.append((pos, j))
        cursor = pos + len(cue)
    return spans
