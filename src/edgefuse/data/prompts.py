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


# ------------------------------------------------------------------------------------------------ cloze
# Cloze form (lm-eval-harness's ``mmlu_continuation``; the SmolLM2 model card's "MMLU (cloze)"): the
# choices are not listed; each answer *text* is scored as the continuation of ``Answer:``. Small models
# that sit at chance on letters are above it here, so it is the form in which fusion can visibly lose
# (or keep) knowledge.

def cloze_header(subject: str) -> str:
    return f"The following are questions (with answers) about {subject_words(subject)}.\n\n"


def cloze_question(item: MMLUItem) -> str:
    """``Question: …\\nAnswer:`` (no trailing space; the continuation brings its own)."""
    return f"Question: {item.question.strip()}\nAnswer:"


def cloze_prompt(item: MMLUItem) -> str:
    """Zero-shot cloze context of one item."""
    return cloze_header(item.subject) + cloze_question(item)


def cloze_continuation(item: MMLUItem, index: int) -> str:
    """The continuation scored for choice ``index``: a space and the answer text."""
    return f" {item.choices[index]}"


def answered_prompt(item) -> str:
    """A question with its gold answer, as text a model reads (pruning calibration): the letters form, or for a
    question with more than four choices (`edgefuse.data.choices`), which letters do not cover, the cloze form."""
    if len(item.choices) <= len(LETTERS):
        return mc_prompt(item) + answer_text(item.answer)
    return cloze_prompt(item) + cloze_continuation(item, item.answer)
