"""Multiple-choice prompt formats shared by evaluation, training and MMLU-CD.

The layout is the one of the original MMLU evaluation (and lm-eval-harness's ``mmlu`` task): a
header naming the subject, the question, lettered choices, then ``Answer:``; the answer is the
single token `` A`` … `` D``. Training uses the same text so that what the edge learns is exactly
what evaluation measures.
"""

from __future__ import annotations

from typing import Sequence

from edgefuse.data.mmlu import LETTERS, MMLUItem


def subject_words(subject: str) -> str:
    return subject.replace("_", " ")


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject_words(subject)}.\n\n"


def question_block(item: MMLUItem) -> str:
    """Question and lettered choices, ending with ``Answer:`` (no trailing space)."""
    lines = [item.question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def answer_text(index: int) -> str:
    """The continuation scored for choice ``index``: a space and the letter."""
    return f" {LETTERS[index]}"


def mc_prompt(item: MMLUItem, shots: Sequence[MMLUItem] = ()) -> str:
    """Zero- or few-shot prompt whose next token is the answer letter."""
    parts = [header(item.subject)]
    for ex in shots:
        parts.append(question_block(ex) + answer_text(ex.answer) + "\n\n")
    parts.append(question_block(item))
    return "".join(parts)
