"""MMLU loading, validation, taxonomy and seeded splits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgefuse.data.mmlu import SplitSpec, load_csv_dir, load_jsonl, make_splits, select
from edgefuse.data.taxonomy import CATEGORIES, SUBCATEGORIES, SUBJECTS, domain_subjects
from edgefuse.errors import EdgefuseError

pytestmark = pytest.mark.unit


def test_embedded_file_counts_and_skipped_header_rows(mmlu):
    assert len(mmlu.items) == 14042
    assert len(mmlu.subjects()) == 57
    assert [n for n, _ in mmlu.skipped] == [11777, 12794]
    assert all("header" in why for _, why in mmlu.skipped)
    assert len({it.id for it in mmlu.items}) == len(mmlu.items)


def test_strict_mode_names_file_and_line():
    from edgefuse.assets import mmlu_jsonl

    with pytest.raises(EdgefuseError, match=r"mmlu\.jsonl:11777: stray CSV header"):
        load_jsonl(mmlu_jsonl(), strict=True)


def test_taxonomy_is_the_official_one():
    assert len(SUBJECTS) == 57 and len(SUBCATEGORIES) == 17 and len(CATEGORIES) == 4
    sizes = {c: len(domain_subjects(c)) for c in CATEGORIES}
    assert sizes == {"stem": 18, "humanities": 13, "social_sciences": 12, "other": 14}
    assert domain_subjects("law") == ["international_law", "jurisprudence", "professional_law"]
    with pytest.raises(EdgefuseError, match="unknown domain 'astrology'.*stem"):
        domain_subjects("astrology")


def _row(q, a, subject="anatomy"):
    return {"question": q, "answer_a": "w", "answer_b": "x", "answer_c": "y", "answer_d": "z",
            "correct_answer": a, "topic": subject.replace("_", " ")}


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps(_row("q1", "A")) + "\n{not json\n")
    with pytest.raises(EdgefuseError, match=r"m\.jsonl:2: malformed JSON"):
        load_jsonl(p)
    p.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(EdgefuseError, match=r"m\.jsonl:1: missing field"):
        load_jsonl(p)
    with pytest.raises(EdgefuseError, match="not found"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_csv_layout_gives_the_same_ids_as_jsonl(tmp_path):
    rows = [_row("What is 1+1?", "B"), _row("Which bone?", "D")]
    j = tmp_path / "x.jsonl"
    j.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "csv" / "test").mkdir(parents=True)
    (tmp_path / "csv" / "test" / "anatomy_test.csv").write_text('What is 1+1?,w,x,y,z,B\n"Which bone?",w,x,y,z,D\n')
    a, b = load_jsonl(j), load_csv_dir(tmp_path / "csv")
    assert [it.id for it in a.items] == [it.id for it in b.items]
    assert [it.answer for it in b.items] == [1, 3]
    (tmp_path / "csv" / "test" / "anatomy_test.csv").write_text("only,three,cols\n")
    with pytest.raises(EdgefuseError, match=r"anatomy_test\.csv:1: expected 6 columns"):
        load_csv_dir(tmp_path / "csv")


def test_splits_partition_each_subject(mmlu):
    sp = make_splits(mmlu)
    ids = [i for v in sp.values() for i in v]
    assert len(ids) == len(set(ids)) == len(mmlu.items)
    by_id = mmlu.by_id()
    public_subjects = {by_id[i].subject for i in sp["public"]}
    assert public_subjects == set(mmlu.subjects())
    assert all(sum(by_id[i].subject == s for i in sp["public"]) == 5 for s in mmlu.subjects())


_SPLIT_SNIPPET = (
    "from edgefuse.data.mmlu import load_mmlu, make_splits, SplitSpec; import hashlib, sys;"
    "sp = make_splits(load_mmlu(), SplitSpec(seed=int(sys.argv[1])));"
    "print(hashlib.sha256(repr(sp).encode()).hexdigest())"
)


@pytest.mark.e2e  # fresh processes: this layer overrides the module's
def test_split_determinism_across_processes(mmlu):
    import hashlib

    def run(seed: int) -> str:
        return subprocess.run([sys.executable, "-c", _SPLIT_SNIPPET, str(seed)], capture_output=True, text=True,
                              check=True).stdout.strip()

    here = hashlib.sha256(repr(make_splits(mmlu, SplitSpec(seed=0))).encode()).hexdigest()
    assert run(0) == here
    assert run(1) != here


def test_select_limits_and_filters(mmlu):
    items = select(mmlu, "test", domains=["stem"], limit=57, seed=3)
    assert len(items) == 57 and all(it.category == "stem" for it in items)
    assert [it.id for it in items] == [it.id for it in select(mmlu, "test", domains=["stem"], limit=57, seed=3)]
    assert [it.id for it in items] != [it.id for it in select(mmlu, "test", domains=["stem"], limit=57, seed=4)]
    with pytest.raises(EdgefuseError, match="unknown subject"):
        select(mmlu, "test", subjects=["basket_weaving"])
