"""Any multiple-choice data as edgefuse items: JSONL rows through a field mapping, and BIG-bench ``task.json``.

Why: MMLU is the one benchmark the study ships, and a small model's LoRA barely moves it (own-domain gains of 0–5
points); users bring domains of their own, in whatever layout their data has. Every row becomes a `ChoiceItem`
— any number of choices (at least two), the answer as an index — whose ``subject`` is its domain, so the cloze
prompts (`edgefuse.data.prompts`) and scorers take it as they take an `edgefuse.data.mmlu.MMLUItem`. Ids are
content-derived as MMLU's are (domain + hash of question and choices), the same on every machine.

A bad row is refused with one line naming ``file:line`` and the problem; nothing is skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgefuse.data.mmlu import MMLUDataset, content_id
from edgefuse.data.taxonomy import is_domain
from edgefuse.errors import EdgefuseError
from edgefuse.io import jsonl_rows

ANSWER_KINDS = ("auto", "index", "letter", "text")


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question; ``subject`` is its domain (the name `MMLUItem` gives it)."""

    id: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices

    @property
    def category(self) -> str:
        """Its domain: where MMLU groups subjects into categories for the results' breakdown, a file's domain is
        its own group."""
        return self.subject


@dataclass(frozen=True)
class FieldMap:
    """Where a JSONL row keeps each part of a question.

    ``choices``: one field holding a list, or several fields in order (``("A", "B", "C", "D")``). ``answer``: a
    0-based index, a letter (A = the first choice) or the text of a choice; ``answer_kind`` says which, ``auto``
    takes an integer as an index and a string as a choice's text, else as a letter, and refuses what could be
    both. ``domain``: the field naming each row's domain, or None when one file holds one domain (given to the
    loader)."""

    question: str = "question"
    choices: str | tuple[str, ...] = "choices"
    answer: str = "answer"
    domain: str | None = "domain"
    answer_kind: str = "auto"

    @classmethod
    def parse(cls, spec: str) -> "FieldMap":
        """``question=q,choices=a|b|c|d,answer=label,domain=topic,answer_kind=letter`` (the command-line form;
        ``domain=`` empty: no domain field). Parts not named keep their defaults."""
        values: dict = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise EdgefuseError(f"field mapping {part!r}: use key=value with keys "
                                    f"{', '.join(cls.__dataclass_fields__)}")
            values[key] = (tuple(value.split("|")) if key == "choices" and "|" in value
                           else (value or None) if key == "domain" else value)
        return cls(**values).check()

    def check(self) -> "FieldMap":
        if self.answer_kind not in ANSWER_KINDS:
            raise EdgefuseError(f"unknown answer kind {self.answer_kind!r}; use one of: {', '.join(ANSWER_KINDS)}")
        return self


def answer_index(value, choices: tuple[str, ...], kind: str = "auto") -> int:
    """The index a row's answer names (`FieldMap`); an answer that names no choice, or two, raises."""
    n = len(choices)
    letters = [chr(ord("A") + i) for i in range(n)]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EdgefuseError(f"answer {value!r} is neither an index, a letter nor a choice's text")
    as_index = value if isinstance(value, int) else (int(value) if value.strip().isdigit() else None)
    as_letter = letters.index(value.strip().upper()) if isinstance(value, str) and value.strip().upper() in letters else None
    as_text = [i for i, c in enumerate(choices) if isinstance(value, str) and c == value]
    if kind == "index" or (kind == "auto" and isinstance(value, int)):
        if as_index is None or not 0 <= as_index < n:
            raise EdgefuseError(f"answer index {value!r} is out of range for {n} choices")
        return as_index
    if kind == "letter":
        if as_letter is None:
            raise EdgefuseError(f"answer {value!r} is not a letter A-{letters[-1]}")
        return as_letter
    if len(as_text) > 1:
        raise EdgefuseError(f"answer {value!r} is the text of choices {as_text[0]} and {as_text[1]}")
    if kind == "text" or as_text:
        if not as_text:
            raise EdgefuseError(f"answer {value!r} is not the text of any choice")
        if kind == "auto" and as_letter is not None and as_letter != as_text[0]:
            raise EdgefuseError(f"answer {value!r} is choice {as_text[0]}'s text and the letter of choice {as_letter}; "
                                "set answer_kind to text or letter")
        return as_text[0]
    if as_letter is not None:
        return as_letter
    raise EdgefuseError(f"answer {value!r} is neither a choice's text nor a letter A-{letters[-1]}")


def text_choices(choices) -> tuple[str, ...]:
    """A question's choices, checked: a list of at least two texts."""
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise EdgefuseError("choices must be a list of texts")
    if len(choices) < 2:
        raise EdgefuseError(f"needs at least 2 choices, has {len(choices)}")
    return tuple(choices)


def make_item(domain: str, question, choices: tuple[str, ...], answer: int, seen: dict[str, int]) -> ChoiceItem:
    """One checked item: a non-empty question and domain; ``choices`` come through `text_choices`."""
    if not isinstance(question, str) or not question.strip():
        raise EdgefuseError("empty or non-text question")
    if not isinstance(domain, str) or not domain.strip():
        raise EdgefuseError("empty or non-text domain")
    return ChoiceItem(content_id(domain, question, choices, seen), domain, question, choices, answer)


def domain_pools(items) -> dict[str, list[ChoiceItem]]:
    """Items per domain, each pool in id order and the domains in order of first appearance: the input of
    `edgefuse.data.mmlu_cd.compose_instances`, which builds MMLU-CD-style cross-domain instances over them."""
    pools: dict[str, list[ChoiceItem]] = {}
    for it in items:
        pools.setdefault(it.subject, []).append(it)
    return {d: sorted(p, key=lambda it: it.id) for d, p in pools.items()}


def _row_choices(row: dict, fields: FieldMap):
    if isinstance(fields.choices, str):
        return row[fields.choices]
    return [row[k] for k in fields.choices]


def load_choice_jsonl(path: str | Path, fields: FieldMap = FieldMap(), domain: str | None = None) -> list[ChoiceItem]:
    """Items of a JSONL file, one question per line (blank lines skipped), read through ``fields``; ``domain``
    names the file's one domain when ``fields.domain`` is None (one file per domain)."""
    path = Path(path)
    fields.check()
    if not path.is_file():
        raise EdgefuseError("multiple-choice file not found", path=path)
    if fields.domain is None and not domain:
        raise EdgefuseError("no domain: give the file's domain, or the field that names each row's", path=path)
    items, seen = [], {}
    for n, row in jsonl_rows(path):
        try:
            if not isinstance(row, dict):
                raise EdgefuseError(f"a row must be a JSON object, not {type(row).__name__}")
            choices = text_choices(_row_choices(row, fields))
            answer = answer_index(row[fields.answer], choices, fields.answer_kind)
            row_domain = row[fields.domain] if fields.domain is not None else domain
            items.append(make_item(row_domain, row[fields.question], choices, answer, seen))
        except KeyError as e:
            raise EdgefuseError(f"missing field {e}", path=path, line=n) from None
        except EdgefuseError as e:
            raise EdgefuseError(str(e), path=path, line=n) from None
    if not items:
        raise EdgefuseError("no questions found", path=path)
    return items


def load_bigbench_task(path: str | Path, domain: str | None = None) -> list[ChoiceItem]:
    """Items of a BIG-bench ``task.json``: each example's ``input`` is the question, the keys of its
    ``target_scores`` the choices (in file order) and the one of highest score the answer. ``domain`` defaults to
    the task's ``name`` (else the directory's). Examples are numbered from 1 in errors (``file:example N``)."""
    path = Path(path)
    if not path.is_file():
        raise EdgefuseError("BIG-bench task file not found", path=path)
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgefuseError(f"malformed JSON ({getattr(e, 'msg', e)})", path=path) from None
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise EdgefuseError("no examples (a BIG-bench task.json has an 'examples' list)", path=path)
    domain = domain or task.get("name") or path.parent.name
    items, seen = [], {}
    for n, ex in enumerate(examples, 1):
        where = f"{path}:example {n}"
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2:
            raise EdgefuseError("needs target_scores with at least 2 choices (generative examples are not "
                                "multiple choice)", path=where)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
            raise EdgefuseError("target_scores must be numbers", path=where)
        best = max(scores.values())
        winners = [i for i, v in enumerate(scores.values()) if v == best]
        if len(winners) != 1:
            raise EdgefuseError(f"{len(winners)} choices share the highest target score; one answer is needed",
                                path=where)
        try:
            items.append(make_item(domain, ex.get("input"), tuple(scores), winners[0], seen))
        except EdgefuseError as e:
            raise EdgefuseError(str(e), path=where) from None
    return items


def load_choice_file(path: str | Path, fields: str = "", domain: str | None = None) -> list[ChoiceItem]:
    """A multiple-choice file's items: a BIG-bench ``task.json`` (``.json``) or JSONL read through the field mapping
    ``fields`` (`FieldMap.parse`; empty: the defaults), in id order."""
    path = Path(path)
    items = load_bigbench_task(path, domain) if path.suffix == ".json" else \
        load_choice_jsonl(path, FieldMap.parse(fields), domain)
    return sorted(items, key=lambda it: it.id)


def with_files(dataset: MMLUDataset, files: dict[str, list[ChoiceItem]]) -> MMLUDataset:
    """MMLU and the questions of multiple-choice files as one dataset: each file's domains become domains the
    study's edges can train on and its tasks can evaluate, split per domain as MMLU is per subject (so MMLU's own
    splits are unchanged). A domain must not share a name with MMLU's taxonomy, nor appear in two files."""
    owner: dict[str, str] = {}
    for name, items in files.items():
        for d in dict.fromkeys(it.subject for it in items):
            if is_domain(d):
                raise EdgefuseError(f"data.choices.{name}: domain {d!r} is also an MMLU domain; rename it")
            if d in owner:
                raise EdgefuseError(f"data.choices.{name}: domain {d!r} is also in data.choices.{owner[d]}")
            owner[d] = name
    extra = [it for items in files.values() for it in items]
    return MMLUDataset(dataset.items + extra, dataset.source, dataset.skipped,
                       extra_domains=dataset.extra_domains + tuple(owner))
