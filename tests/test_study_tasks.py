"""Configured tasks (`edgefuse.tasks`): a multiple-choice file, named under ``benchmarks.tasks``, is evaluated on
every model of the study, planned by the estimator, shown in the report with paired intervals, and part of every
evaluation's cache key; adding one changes nothing else of the study."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.cloze_reference import naive_scores
from helpers.study import TINY_STUDY, stage_log

from edgefuse.config import StudyConfig
from edgefuse.data.prompts import cloze_continuation, cloze_prompt
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.cloze import choose
from edgefuse.evaluate.stats import bootstrap_ci, fmt_ci, paired_diff_ci
from edgefuse.report.tables import _diff
from edgefuse.runner import run_study
from edgefuse.runner.estimate import RATES, plan
from edgefuse.tasks.choices import ChoicesBench, load_items

pytestmark = pytest.mark.e2e

# mixed choice counts (2, 3 and 5), two domains named by a field, answers as text and as index
ROWS = [
    {"q": "What is 2 + 3?", "opts": ["5", "6", "23"], "gold": "5", "topic": "arithmetic"},
    {"q": "What is 7 - 4?", "opts": ["11", "3"], "gold": 1, "topic": "arithmetic"},
    {"q": "What is 6 / 2?", "opts": ["12", "4", "3", "8", "1"], "gold": "3", "topic": "arithmetic"},
    {"q": "What is 3 x 3?", "opts": ["6", "9", "33"], "gold": 1, "topic": "arithmetic"},
    {"q": "Which metal is liquid at room temperature?", "opts": ["iron", "mercury", "tin"], "gold": "mercury",
     "topic": "chemistry"},
    {"q": "Which gas do plants take in?", "opts": ["oxygen", "carbon dioxide"], "gold": 1, "topic": "chemistry"},
    {"q": "What is the symbol of sodium?", "opts": ["Na", "S", "So", "N", "Sd"], "gold": "Na", "topic": "chemistry"},
]
FIELDS = "question=q,choices=opts,answer=gold,domain=topic"


def _config(data_path, **task) -> dict:
    cfg = copy.deepcopy(TINY_STUDY)
    cfg["fusion"] = {"methods": ["task_arithmetic"], "cr": ["off"]}
    cfg["benchmarks"]["tasks"] = {"quiz": {"kind": "choices", "path": str(data_path), "fields": FIELDS,
                                           "label": "Quiz", **task}}
    return cfg


def _write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The study without the task, then (a copy of its run directory) with it; {"before", "after", "data"}."""
    root = tmp_path_factory.mktemp("tasks")
    data = root / "quiz.jsonl"
    _write_rows(data, ROWS)
    without = copy.deepcopy(TINY_STUDY)
    without["fusion"] = {"methods": ["task_arithmetic"], "cr": ["off"]}
    run_study(StudyConfig.model_validate(without), root / "before", show_progress=False)
    shutil.copytree(root / "before", root / "after")
    (root / "after" / "stages.jsonl").unlink()
    run_study(StudyConfig.model_validate(_config(data)), root / "after", show_progress=False)
    return {"before": root / "before", "after": root / "after", "data": data}


def _dir(run_dir, name):
    """The directory of stage ``name`` as this run's log names it (a copied run directory also holds the
    directories of keys it no longer uses)."""
    [key] = [r["key"] for r in stage_log(run_dir) if r["stage"] == name]
    return run_dir / "stages" / f"{name}-{key}"


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_task_scores_equal_an_unbatched_reference_on_every_choice_count(runs, tiny):
    """The base model's per-choice log-likelihoods in the task's results file against one plain forward per
    (question, choice) (tests/helpers/cloze_reference.py); both metrics' choices follow from them."""
    model, tok = tiny
    items = load_items(ChoicesBench(kind="choices", path=str(runs["data"]), fields=FIELDS))
    doc = json.loads((_dir(runs["after"], "eval-base") / "quiz.json").read_text())
    assert [r["id"] for r in doc["items"]] == [it.id for it in items] and doc["n"] == len(ROWS)
    for it, rec in zip(items, doc["items"]):
        conts = [[cloze_continuation(it, c) for c in range(len(it.choices))]]
        ref = naive_scores(model, tok, [cloze_prompt(it)], conts)
        assert torch.allclose(torch.tensor([rec["scores"]]), ref, atol=1e-4), (rec["scores"], ref)
        lengths = [[len(c) for c in it.choices]]
        assert rec["pred"] == int(choose(ref, lengths, "acc")[0])
        assert rec["pred_norm"] == int(choose(ref, lengths, "acc_norm")[0])
        assert rec["correct_norm"] == (rec["pred_norm"] == it.answer)
    summary = _results(runs["after"])["base"]["quiz"]
    assert summary["headline"] == bootstrap_ci([int(r["correct_norm"]) for r in doc["items"]])
    assert summary["outcomes"] == {r["id"]: int(r["correct_norm"]) for r in doc["items"]}


def test_adding_a_task_reruns_only_evaluations_and_changes_no_other_result(runs):
    """Data, pruning, training, recovery and fusion come from the cache; every model's MMLU and MMLU-CD outcomes
    and scores are those of the run without the task (same machine, same adapters)."""
    ran = {r["stage"]: r["status"] for r in stage_log(runs["after"])}
    assert {s for s, status in ran.items() if status == "ran"} == {s for s in ran if s.startswith("eval-")}
    before, after = _results(runs["before"]), _results(runs["after"])
    models = lambda doc: {"base": doc["base"]} | {e["edge"]: e["eval"] for e in doc["seeds"][0]["edges"]} | {  # noqa: E731
        f["name"]: f["eval"] for f in doc["seeds"][0]["fused"]}
    for name, ev in models(after).items():
        old = models(before)[name]
        assert ev["mmlu"]["correct"] == old["mmlu"]["correct"], name
        if "mmlu_cd_k2" in old:
            assert ev["mmlu_cd_k2"]["strict_outcomes"] == old["mmlu_cd_k2"]["strict_outcomes"], name
        assert "quiz" in ev and "quiz" not in old, name
    for name in ("eval-base", "eval-task_arithmetic-s0"):
        new_items = json.loads((_dir(runs["after"], name) / "mmlu.json").read_text())["items"]
        old_items = json.loads((_dir(runs["before"], name) / "mmlu.json").read_text())["items"]
        assert [r["scores"] for r in new_items] == [r["scores"] for r in old_items], name
    assert "task_columns" not in {k for k, v in before.items() if v is not None}
    assert after["task_columns"] == {"quiz": "Quiz acc_norm"}


def test_report_shows_the_task_with_paired_intervals(runs):
    doc = _results(runs["after"])
    base, fused = doc["base"]["quiz"], doc["seeds"][0]["fused"][0]["eval"]["quiz"]
    ids = sorted(base["outcomes"])
    diff = paired_diff_ci([fused["outcomes"][i] for i in ids], [base["outcomes"][i] for i in ids])
    report = (runs["after"] / "report.md").read_text()
    head = next(line for line in report.splitlines() if line.startswith("| model | MMLU"))
    assert head.endswith("| Quiz acc_norm % [95% CI] | Δ vs base (paired) |")
    row = next(line for line in report.splitlines() if line.startswith("| task_arithmetic |"))
    assert row.endswith(f"| {fmt_ci(fused['headline'])} | {_diff(diff)} |")
    csv = (runs["after"] / "results.csv").read_text().splitlines()
    cols = csv[0].split(",")
    base_row = dict(zip(cols, csv[1].split(",")))
    assert float(base_row["quiz_acc"]) == pytest.approx(base["headline"]["acc"])


def test_the_files_hash_is_in_the_key_an_edit_reevaluates(runs, tmp_path):
    """Editing the file (one answer changed) re-runs every evaluation and nothing upstream; the base model's
    outcome on that question flips and its log-likelihoods stay those of the first run."""
    data, run_dir = tmp_path / "quiz.jsonl", tmp_path / "run"
    _write_rows(data, ROWS)  # the same questions at another path (the path is part of the config, so of the key)
    shutil.copytree(runs["after"], run_dir)
    run_study(StudyConfig.model_validate(_config(data)), run_dir, show_progress=False)
    rows = copy.deepcopy(ROWS)
    rows[0]["gold"] = "23"
    _write_rows(data, rows)  # edited in place: same path, same config
    (run_dir / "stages.jsonl").unlink()
    doc = run_study(StudyConfig.model_validate(_config(data)), run_dir, show_progress=False)
    ran = {r["stage"] for r in stage_log(run_dir) if r["status"] == "ran"}
    assert ran == {r["stage"] for r in stage_log(run_dir) if r["stage"].startswith("eval-")}
    before = _results(runs["after"])["base"]["quiz"]["outcomes"]
    changed = {i for i in before if before[i] != doc["base"]["quiz"]["outcomes"][i]}
    [item] = [it for it in load_items(ChoicesBench(kind="choices", path=str(data), fields=FIELDS))
              if it.question == ROWS[0]["q"]]
    assert changed == {item.id}
    old_scores = json.loads((_dir(runs["after"], "eval-base") / "quiz.json").read_text())["items"]
    new_scores = json.loads((_dir(run_dir, "eval-base") / "quiz.json").read_text())["items"]
    assert [r["scores"] for r in new_scores] == [r["scores"] for r in old_scores]


def test_the_estimator_plans_the_tasks_items_on_every_evaluation(tmp_path):
    data = tmp_path / "quiz.jsonl"
    _write_rows(data, ROWS)
    with_task, without = StudyConfig.model_validate(_config(data)), StudyConfig.model_validate(TINY_STUDY)
    without = without.model_copy(update={"fusion": with_task.fusion})
    extra = sum(len(r["opts"]) for r in ROWS) / 4 * RATES["mmlu_item"]["cloze"]  # cloze even in a letters study
    a, b = {s.name: s.seconds for s in plan(with_task, 24)}, {s.name: s.seconds for s in plan(without, 24)}
    assert a.keys() == b.keys()
    for name in a:
        want = extra if name.startswith("eval-") else 0.0
        assert a[name] - b[name] == pytest.approx(want), name


@pytest.mark.parametrize("task, message", [
    ({"kind": "nope", "path": "x"}, "unknown kind 'nope'"),
    ({"kind": "choices"}, "path"),
    ({"kind": "choices", "path": "x", "limits": 3}, "limits"),
])
def test_bad_task_settings_fail_when_the_config_loads(task, message):
    cfg = copy.deepcopy(TINY_STUDY)
    cfg["benchmarks"]["tasks"] = {"quiz": task}
    with pytest.raises(ValueError, match=message):
        StudyConfig.model_validate(cfg)


@pytest.mark.parametrize("name", ["mmlu_extra", "label", "Quiz", "9x"])
def test_task_names_that_would_clash_with_results_keys_are_refused(name):
    cfg = copy.deepcopy(TINY_STUDY)
    cfg["benchmarks"]["tasks"] = {name: {"kind": "choices", "path": "x"}}
    with pytest.raises(ValueError, match="task name"):
        StudyConfig.model_validate(cfg)


def test_a_bad_row_is_one_line_naming_file_and_line_before_anything_is_written(tmp_path):
    data = tmp_path / "quiz.jsonl"
    _write_rows(data, ROWS[:2] + [{"q": "no options", "gold": 0, "topic": "x"}])
    with pytest.raises(EdgefuseError) as e:
        run_study(StudyConfig.model_validate(_config(data)), tmp_path / "run", show_progress=False)
    assert str(e.value).startswith(f"{data}:3: ") and "missing field 'opts'" in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


# three domains, four questions each, three choices each (cross-domain instances need one number of choices)
CD_ROWS = [{"q": f"{topic} question {i}: which is right?", "opts": [f"{topic} {i} a", f"{topic} {i} b", "none"],
            "gold": i % 3, "topic": topic} for topic in ("geometry", "botany", "music") for i in range(4)]


@pytest.fixture(scope="module")
def cd_run(runs, tmp_path_factory):
    """The run without tasks, with a ``choices_cd`` task added (only evaluations run)."""
    root = tmp_path_factory.mktemp("cd")
    data = root / "mix.jsonl"
    _write_rows(data, CD_ROWS)
    cfg = copy.deepcopy(TINY_STUDY)
    cfg["fusion"] = {"methods": ["task_arithmetic"], "cr": ["off"]}
    cfg["benchmarks"]["tasks"] = {"mix": {"kind": "choices_cd", "path": str(data), "fields": FIELDS, "k": 2, "n": 6}}
    shutil.copytree(runs["before"], root / "run")
    (root / "run" / "stages.jsonl").unlink()
    run_study(StudyConfig.model_validate(cfg), root / "run", show_progress=False)
    return root / "run", data


def test_cross_domain_task_over_a_files_domains_equals_full_recomputation(cd_run, tiny):
    """A ``choices_cd`` task (one module, one registry entry): balanced instances over the file's domains, each
    answer's log-likelihoods equal to a plain forward over the whole growing cloze text (the chosen acc_norm
    answers before it), strict outcomes and the headline from them, and a report column; an edge alone is not
    scored on it (cross-domain)."""
    from edgefuse.evaluate.cloze import normalised
    from edgefuse.evaluate.mmlu_cd import cloze_cd_text

    model, tok = tiny
    run_dir, data = cd_run
    items = {it.id: it for it in load_items(ChoicesBench(kind="choices", path=str(data), fields=FIELDS))}
    res = json.loads((_dir(run_dir, "eval-base") / "mix.json").read_text())
    assert res["n"] == 6 and res["k"] == 2
    pairs = [tuple(sorted(inst["domains"])) for inst in res["instances"]]
    assert sorted(pairs) == sorted([("botany", "geometry"), ("botany", "music"), ("geometry", "music")] * 2)
    for inst in res["instances"]:
        its = [items[i] for i in inst["items"]]
        chosen = []
        for j, it in enumerate(its):
            conts = [[cloze_continuation(it, c) for c in range(3)]]
            ref = naive_scores(model, tok, [cloze_cd_text(its, chosen)], conts)
            assert torch.allclose(torch.tensor([inst["scores"][j]]), ref, atol=1e-4), (inst["id"], j)
            chosen.append(int(normalised(ref, [[len(c) for c in it.choices]]).argmax()))
        assert inst["strict"] == all(c == it.answer for c, it in zip(chosen, its))
    doc = _results(run_dir)
    summary = doc["base"]["mix"]
    assert summary["outcomes"] == {inst["id"]: int(inst["strict"]) for inst in res["instances"]}
    assert summary["headline"] == bootstrap_ci(list(summary["outcomes"].values()))
    assert doc["task_columns"] == {"mix": "mix k=2 strict"}
    assert "mix" in doc["seeds"][0]["fused"][0]["eval"]
    assert all("mix" not in e["eval"] for e in doc["seeds"][0]["edges"])
    assert "| mix k=2 strict % [95% CI] | Δ vs base (paired) |" in (run_dir / "report.md").read_text()


def test_cross_domain_task_refuses_mixed_choice_counts_when_the_study_starts(runs, tmp_path):
    cfg = copy.deepcopy(TINY_STUDY)
    cfg["benchmarks"]["tasks"] = {"mix": {"kind": "choices_cd", "path": str(runs["data"]), "fields": FIELDS}}
    with pytest.raises(EdgefuseError, match=r"quiz.jsonl: cross-domain instances need one number of choices; "
                                            r"the questions have 2, 3, 5"):
        run_study(StudyConfig.model_validate(cfg), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


# two domains of one file, 16 questions each with three choices: split per domain as MMLU's subjects are
FILE_ROWS = [{"q": f"{topic} fact {i}?", "opts": [f"{topic} answer {i}", f"not {i}", f"maybe {i}"], "gold": i % 3,
              "topic": topic} for topic in ("arith", "chem") for i in range(16)]


@pytest.fixture(scope="module")
def file_study(tmp_path_factory):
    """Edges on a multiple-choice file's domains (``data.choices``), scored on its test split by a ``choices`` and
    a ``choices_cd`` task, next to MMLU."""
    root = tmp_path_factory.mktemp("files")
    data = root / "facts.jsonl"
    _write_rows(data, FILE_ROWS)
    cfg = copy.deepcopy(TINY_STUDY)
    cfg["data"] = {"choices": {"facts": {"path": str(data), "fields": FIELDS}}}
    cfg["edges"] = {"a": ["arith"], "c": ["chem"]}
    cfg["fusion"] = {"methods": ["task_arithmetic"], "cr": ["off"]}
    cfg["benchmarks"]["tasks"] = {"facts": {"kind": "choices", "data": "facts"},
                                  "facts_cd": {"kind": "choices_cd", "data": "facts", "k": 2, "n": 4}}
    doc = run_study(StudyConfig.model_validate(cfg), root / "run", show_progress=False)
    return root / "run", doc, cfg


def test_edges_train_on_a_files_domains_and_its_test_split_is_scored(file_study):
    """Each edge trains on its file domain's edge split (the study's splits.json, per domain as per MMLU subject);
    the ``choices`` task scores exactly the file's test split (no trained question), on the base model, each edge
    alone and the fused model; MMLU's items are those of a study without the file."""
    run_dir, doc, cfg = file_study
    splits = json.loads((_dir(run_dir, "data") / "splits.json").read_text())
    for edge, domain in (("a", "arith"), ("c", "chem")):
        manifest = json.loads((_dir(run_dir, f"train-{edge}-s0") / "package" / "edgefuse.json").read_text())
        assert manifest["n_items"] == sum(i.startswith(f"{domain}/") for i in splits["edge"]) == 5
    test_ids = sorted(i for i in splits["test"] if i.startswith(("arith/", "chem/")))
    assert sorted(doc["base"]["facts"]["outcomes"]) == test_ids and len(test_ids) == 14
    assert not set(test_ids) & set(splits["edge"])
    for e in doc["seeds"][0]["edges"]:
        assert sorted(e["eval"]["facts"]["outcomes"]) == test_ids and "facts_cd" not in e["eval"]
    fused = doc["seeds"][0]["fused"][0]["eval"]
    assert sorted(fused["facts"]["outcomes"]) == test_ids and len(fused["facts_cd"]["outcomes"]) == 4
    cd = json.loads((_dir(run_dir, "eval-base") / "facts_cd.json").read_text())
    assert {i for inst in cd["instances"] for i in inst["items"]} <= set(test_ids)
    plain = copy.deepcopy(TINY_STUDY)  # the same MMLU selection as without the file
    from edgefuse.data.mmlu import SplitSpec, load_mmlu, select
    want = select(load_mmlu(), "test", None, None, plain["benchmarks"]["mmlu"]["limit"], 0, SplitSpec())
    assert sorted(doc["base"]["mmlu"]["correct"]) == sorted(it.id for it in want)


def test_transfer_matrix_and_own_domain_accuracy_take_a_file_domain_from_its_task(file_study):
    """Each edge alone on each edge's file domain: the paired Δ of the report's transfer table equals the one
    computed from the ``facts`` task's outcomes on that domain's test questions (7 each)."""
    from edgefuse.report.tables import transfer_matrix

    run_dir, doc, _ = file_study
    tm = transfer_matrix(doc)
    assert tm["columns"] == ["a", "c"] and tm["n"] == {"a": 7, "c": 7}
    base = doc["base"]["facts"]["outcomes"]
    for e in doc["seeds"][0]["edges"]:
        got = e["eval"]["facts"]["outcomes"]
        for col, domain in (("a", "arith"), ("c", "chem")):
            ids = sorted(i for i in base if i.startswith(f"{domain}/"))
            assert tm["cells"][e["edge"]][col] == paired_diff_ci([got[i] for i in ids], [base[i] for i in ids])
        assert tm["base"]["a"] == bootstrap_ci([base[i] for i in sorted(base) if i.startswith("arith/")])
    report = (run_dir / "report.md").read_text()
    assert "| edge alone \\ domain | a (n=7) | c (n=7) |" in report
    row = next(line for line in report.splitlines() if line.startswith("| a | arith |"))
    assert " n=7 (base " in row


def test_an_edited_data_file_retrains(file_study, tmp_path):
    """The files' sha256 is in the data, prune (hence train) and evaluation keys: one changed answer re-runs the
    study from the data stage on (the config alone would not have told), but not MMLU-CD's build, which holds no
    question of the file."""
    run_dir, _, cfg = file_study
    rows = copy.deepcopy(FILE_ROWS)
    rows[0]["gold"] = (rows[0]["gold"] + 1) % 3
    data = Path(cfg["data"]["choices"]["facts"]["path"])
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    backup = data.read_text()
    try:
        _write_rows(data, rows)
        (copy_dir / "stages.jsonl").unlink()
        run_study(StudyConfig.model_validate(cfg), copy_dir, show_progress=False)
    finally:
        data.write_text(backup)
    ran = {r["stage"] for r in stage_log(copy_dir) if r["status"] == "ran"}
    assert {"data", "prune-a-s0", "train-a-s0", "eval-base"} <= ran and "mmlu-cd-k2" not in ran


def test_file_domains_are_checked_when_the_config_loads(tmp_path):
    data = tmp_path / "facts.jsonl"
    _write_rows(data, FILE_ROWS)
    cfg = copy.deepcopy(TINY_STUDY)
    cfg["edges"] = {"a": ["arithmetic"]}
    with pytest.raises(ValueError, match="unknown domain 'arithmetic'.*or a domain of data.choices \\(arith, chem\\)"):
        StudyConfig.model_validate(cfg | {"data": {"choices": {"facts": {"path": str(data), "fields": FIELDS}}}})
    cfg["edges"] = {"a": ["arith"]}
    with pytest.raises(ValueError, match="unknown domain 'arith'"):
        StudyConfig.model_validate(cfg)  # no data.choices
    cfg["benchmarks"]["tasks"] = {"facts": {"kind": "choices", "data": "nope"}}
    with pytest.raises(ValueError, match="data 'nope' is not a file of data.choices"):
        StudyConfig.model_validate(cfg | {"data": {"choices": {"facts": {"path": str(data), "fields": FIELDS}}}})


def test_a_file_domain_named_like_an_mmlu_domain_is_refused(tmp_path):
    from edgefuse.data.choices import load_choice_file, with_files
    from edgefuse.data.mmlu import load_mmlu

    data = tmp_path / "facts.jsonl"
    _write_rows(data, [dict(r, topic="law") for r in FILE_ROWS[:4]])
    with pytest.raises(EdgefuseError, match="data.choices.facts: domain 'law' is also an MMLU domain"):
        with_files(load_mmlu(), {"facts": load_choice_file(data, FIELDS)})


def test_letters_training_refuses_questions_with_more_than_four_choices(tmp_path):
    from edgefuse.data.choices import ChoiceItem
    from edgefuse.edge.schema import TrainConfig
    from edgefuse.edge.train import train_edge

    items = [ChoiceItem("d/1", "d", "q?", ("a", "b", "c", "d", "e"), 4)]
    with pytest.raises(EdgefuseError, match="5 choices; the 'letters' objective scores the letters A-D only"):
        train_edge(tmp_path / "nowhere", "d", items, TrainConfig(objective="letters"), tmp_path / "out")


def test_eval_choices_scores_a_file_from_the_command_line(cli, tiny, tmp_path):
    """``edgefuse eval choices``: the same log-likelihoods as a plain forward per choice, both metrics' accuracy
    from them; a bad row is one line naming file:line, with no output written."""
    from edgefuse.evaluate.cloze import normalised

    data, out = tmp_path / "quiz.jsonl", tmp_path / "res.json"
    _write_rows(data, ROWS)
    r = cli("eval", "choices", str(data), "--fields", FIELDS, "--model", "tiny-llama", "--device", "cpu",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    model, tok = tiny
    items = {it.id: it for it in load_items(ChoicesBench(kind="choices", path=str(data), fields=FIELDS))}
    correct = []
    for rec in res["items"]:
        it = items[rec["id"]]
        conts = [[cloze_continuation(it, c) for c in range(len(it.choices))]]
        ref = naive_scores(model, tok, [cloze_prompt(it)], conts)
        assert torch.allclose(torch.tensor([rec["scores"]]), ref, atol=1e-4)
        correct.append(int(normalised(ref, [[len(c) for c in it.choices]]).argmax()) == it.answer)
    assert res["accuracy"]["acc_norm"] == bootstrap_ci([int(c) for c in correct])
    assert f"{len(ROWS)} questions" in r.stdout and "arithmetic: n=4" in r.stdout
    _write_rows(data, ROWS[:1] + [{"q": "x", "opts": ["a"], "gold": 0, "topic": "t"}])
    out.unlink()
    r = cli("eval", "choices", str(data), "--fields", FIELDS, "--model", "tiny-llama", "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {data}:2: needs at least 2 choices, has 1"]
    assert not out.exists()


def test_flower_refuses_file_domain_edges_before_asking_the_federation(tmp_path):
    """A Flower edge reads its own data, not the cloud's data.choices files: such a study is refused with one line
    before the federation is asked for a node and before anything is written."""
    pytest.importorskip("flwr")
    from edgefuse.federated.trainer import FlowerTrainer

    class UnaskedGrid:
        def get_node_ids(self):
            raise AssertionError("the federation must not be asked")

    data = tmp_path / "facts.jsonl"
    _write_rows(data, FILE_ROWS)
    cfg = copy.deepcopy(TINY_STUDY) | {"edges": {"a": ["arith"], "law": ["law"]},
                                       "data": {"choices": {"facts": {"path": str(data), "fields": FIELDS}}}}
    with pytest.raises(EdgefuseError, match="edge a: domain 'arith' comes from data.choices"):
        run_study(StudyConfig.model_validate(cfg), tmp_path / "run", show_progress=False,
                  trainer=FlowerTrainer(UnaskedGrid(), wait_nodes=0))
    assert not (tmp_path / "run").exists()
