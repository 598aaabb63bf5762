"""The study's composition stages (issue 13 item 6) on the tiny model: LoraHub and retrieval mixtures next to the
static fusions, in cloze form.

A run directory finished without a ``compose`` section is given one: every stage it holds is reused and only the
new ones run. References are independent of the runner: the mixture's scores are those of ``edgefuse eval ...
--pool`` on copies of the same adapters carrying the embed stages' vectors, and LoraHub's adapter is that of
`edgefuse.compose.lorahub.lorahub` called directly on the same examples with the same seed.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from helpers.study import TINY_STUDY, stage_dir, stage_log

pytestmark = pytest.mark.e2e

MIX = {"k": 2, "weighting": "softmax", "temperature": 0.05}
STUDY = {
    **copy.deepcopy(TINY_STUDY), "name": "tiny-compose",
    "training": {**TINY_STUDY["training"], "steps": 4, "objective": "cloze"},
    "fusion": {"methods": ["task_arithmetic"], "cr": ["off"]},
    "benchmarks": {"format": "cloze", "batch_size": 8, "edges_alone": False, "mmlu": {"limit": 12},
                   "mmlu_cd": {"ks": [2], "n": 4}},
}
COMPOSE = {"embedding": {"examples": 6},
           "lorahub": {"examples": 4, "budget": 3},
           "retrieval_mixture": [{**MIX, "routing": "instance"}, {**MIX, "routing": "segment"}]}
NEW_STAGES = {"embed-science", "embed-law", "lorahub-s0", "eval-lorahub-s0", "eval-retrieval-k2-softmax-t0.05-mmlu-s0",
              "eval-retrieval-k2-softmax-t0.05-instance-cd-s0", "eval-retrieval-k2-softmax-t0.05-segment-cd-s0"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The study without composition, then the same run directory with it, then once more; the stage log's
    records of each phase, the run directory, the results and the config."""
    from edgefuse.config import StudyConfig
    from edgefuse.runner import run_study

    run_dir = tmp_path_factory.mktemp("compose") / "run"
    phases = []
    for cfg in (STUDY, {**STUDY, "compose": COMPOSE}, {**STUDY, "compose": COMPOSE}):
        before = len(stage_log(run_dir)) if (run_dir / "stages.jsonl").is_file() else 0
        doc = run_study(StudyConfig.model_validate(cfg), run_dir, show_progress=False)
        phases.append(stage_log(run_dir)[before:])
    return {"phases": phases, "run_dir": run_dir, "doc": doc, "cfg": StudyConfig.model_validate({**STUDY, "compose": COMPOSE})}


def test_adding_compose_reuses_every_finished_stage_and_runs_only_the_new_ones(runs):
    first, second, third = runs["phases"]
    assert all(r["status"] == "ran" for r in first) and not {r["stage"] for r in first} & NEW_STAGES
    ran = {r["stage"]: r["kind"] for r in second if r["status"] == "ran"}
    assert set(ran) == NEW_STAGES, ran
    assert {r["stage"] for r in second if r["status"] == "cached"} == {r["stage"] for r in first}
    assert {ran[n] for n in ("embed-science", "embed-law")} == {"embed"} and ran["lorahub-s0"] == "fuse"
    assert [r["stage"] for r in second].count("eval-retrieval-k2-softmax-t0.05-mmlu-s0") == 1  # shared by both
    assert third and all(r["status"] == "cached" for r in third), third


def test_plan_lists_the_new_stages_in_run_order_with_an_estimate(runs):
    from edgefuse.runner.estimate import plan

    planned = plan(runs["cfg"], 12)
    assert [s.name for s in planned] == [r["stage"] for r in runs["phases"][1]]
    assert all(s.seconds > 0 for s in planned if s.name in NEW_STAGES)


def test_results_and_report_put_the_compositions_next_to_the_fusions(runs):
    doc, run_dir = runs["doc"], runs["run_dir"]
    composed = {c["name"]: c for c in doc["seeds"][0]["composed"]}
    assert list(composed) == ["lorahub", "retrieval-k2-softmax-t0.05-instance", "retrieval-k2-softmax-t0.05-segment"]
    inst, seg = composed["retrieval-k2-softmax-t0.05-instance"], composed["retrieval-k2-softmax-t0.05-segment"]
    assert inst["eval"]["mmlu"] == seg["eval"]["mmlu"] and len(inst["eval"]["mmlu"]["correct"]) == 12
    assert inst["eval"]["mmlu_cd_k2"]["strict_outcomes"] and seg["eval"]["mmlu_cd_k2"]["strict_outcomes"]
    acc = doc["seeds"][0]["retrieval"]
    assert acc["n"] + acc["skipped"] == 12 and 0 <= acc["lo"] <= acc["acc"] <= acc["hi"] <= 1
    report = (run_dir / "report.md").read_text()
    for name in composed:
        assert f"| {name} |" in report
    assert f"Retrieval accuracy (the question's own-domain edge adapter ranked first by MiniLM similarity): " \
           f"{100 * acc['acc']:.1f} [" in report and "chance 50%" in report
    assert "`lorahub`: LoraHub weights (science " in report
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert sum(r.split(",")[0] in composed for r in rows) == 3


def _pool_copies(run_dir: Path, doc: dict, tmp: Path) -> list[Path]:
    """The study's recovered edge adapters copied out, each with its embed stage's vector in its manifest (what a
    real edge would have attached), in the study's edge order."""
    from edgefuse.io import read_json

    out = []
    for e in doc["seeds"][0]["edges"]:
        d = tmp / e["edge"]
        shutil.copytree(e["adapter"], d)
        man = json.loads((d / "edgefuse.json").read_text())
        man["embedding"] = read_json(stage_dir(run_dir, f"embed-{e['edge']}") / "embedding.json")
        (d / "edgefuse.json").write_text(json.dumps(man))
        out.append(d)
    return out


def test_mixture_stages_equal_edgefuse_eval_with_a_pool(runs, tmp_path):
    from helpers.cli import run_cli

    run_dir, doc = runs["run_dir"], runs["doc"]
    pool = _pool_copies(run_dir, doc, tmp_path)
    knobs = ["--top-k", 2, "--weighting", "softmax", "--temperature", 0.05]
    out = tmp_path / "mmlu.json"
    r = run_cli("eval", "mmlu", "--model", "tiny-llama", "--device", "cpu", "--format", "cloze", "--limit", 12,
                "--out", out, *knobs, "--pool", *pool)
    assert r.returncode == 0, r.stderr
    cli = {it["id"]: it for it in json.loads(out.read_text())["items"]}
    stage = json.loads((stage_dir(run_dir, "eval-retrieval-k2-softmax-t0.05-mmlu-s0") / "mmlu.json").read_text())
    assert set(cli) == {it["id"] for it in stage["items"]}
    for it in stage["items"]:
        ref = cli[it["id"]]
        assert max(abs(a - b) for a, b in zip(it["scores"], ref["scores"])) <= 1e-5
        assert it["correct_norm"] == ref["correct_norm"]
        assert {Path(n).name: w for n, w in ref["mixture"].items()} == it["mixture"]  # the pool named by edge
    bench = next((run_dir / "stages").glob("mmlu-cd-k2-*/mmlu_cd_k2.jsonl"))
    for routing in ("instance", "segment"):
        out = tmp_path / f"cd-{routing}.json"
        r = run_cli("eval", "mmlu-cd", "--bench", bench, "--model", "tiny-llama", "--device", "cpu", "--format",
                    "cloze", "--metric", "acc_norm", "--routing", routing, "--out", out, *knobs, "--pool", *pool)
        assert r.returncode == 0, r.stderr
        ref = json.loads(out.read_text())["instances"]
        got = json.loads((stage_dir(run_dir, f"eval-retrieval-k2-softmax-t0.05-{routing}-cd-s0")
                          / "mmlu_cd_k2.json").read_text())["instances"]
        assert len(got) == len(ref) == 4
        for g, x in zip(got, ref):
            assert max(abs(a - b) for ga, xa in zip(g["scores"], x["scores"]) for a, b in zip(ga, xa)) <= 1e-5
            assert g["strict"] == x["strict"] and g["correct"] == x["correct"]
    summary = {c["name"]: c["eval"] for c in doc["seeds"][0]["composed"]}
    assert summary["retrieval-k2-softmax-t0.05-segment"]["mmlu_cd_k2"]["strict_outcomes"] == \
        [int(x["strict"]) for x in ref]


def test_lorahub_stage_equals_lorahub_called_directly(runs):
    """The stage's adapter and weights are what `lorahub` gives on the same public examples with the same seed,
    and its evaluation is the fused-model evaluation of that adapter."""
    import torch

    from edgefuse.adapters import load_adapter
    from edgefuse.compose.lorahub import lorahub
    from edgefuse.data.mmlu import SplitSpec, load_mmlu, select
    from edgefuse.models import load_model

    doc = runs["doc"]
    rec = next(c for c in doc["seeds"][0]["composed"] if c["name"] == "lorahub")
    edges = doc["seeds"][0]["edges"]
    model, tok = load_model("tiny-llama")
    items = select(load_mmlu(), "public", ["stem", "law"], None, 4, 0, SplitSpec(seed=0))
    direct = lorahub(model, tok, [load_adapter(e["adapter"]) for e in edges], items, objective="cloze", budget=3,
                     method="task_arithmetic", seed=0, seq=STUDY["training"]["seq"], batch_size=8)
    assert rec["lorahub"]["weights"] == direct.weights and rec["lorahub"]["examples"] == 4
    assert rec["lorahub"]["evaluations"] == 4 and rec["lorahub"]["objective"] == pytest.approx(direct.objective, abs=1e-6)
    saved = load_adapter(rec["adapter"])
    assert set(saved.modules) == set(direct.adapter.modules)
    worst = max(float((saved.modules[n].delta() - direct.adapter.modules[n].delta()).abs().max()) for n in saved.modules)
    assert worst <= 1e-6
    assert saved.manifest.composition == "lorahub" and saved.manifest.lorahub["weights"] == direct.weights
    trace = [t["weights"] for t in saved.manifest.lorahub["trace"]]
    assert trace == [t["weights"] for t in direct.trace] and len({tuple(w) for w in trace}) > 1  # the same search
    assert torch.tensor(direct.weights).abs().max() <= 1.5
    assert len(rec["eval"]["mmlu"]["correct"]) == 12 and rec["eval"]["mmlu_cd_k2"]["strict_outcomes"]


QUIZ = [{"q": f"{t} question {i}?", "opts": [f"{t} {i} yes", f"{t} {i} no"] + ([f"{t} {i} maybe"] if i % 2 else []),
         "gold": i % 2, "topic": t} for t in ("science", "law") for i in range(4)]


@pytest.fixture(scope="module")
def with_task(runs, tmp_path_factory):
    """The composed run directory (copied) with a ``choices`` task added: the run's stage log and results."""
    from edgefuse.config import StudyConfig
    from edgefuse.runner import run_study

    root = tmp_path_factory.mktemp("compose-task")
    data = root / "quiz.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QUIZ))
    shutil.copytree(runs["run_dir"], root / "run")
    (root / "run" / "stages.jsonl").unlink()
    bench = {**STUDY["benchmarks"], "tasks": {"quiz": {"kind": "choices", "path": str(data),
                                                       "fields": "question=q,choices=opts,answer=gold,domain=topic"}}}
    cfg = StudyConfig.model_validate({**STUDY, "compose": COMPOSE, "benchmarks": bench})
    doc = run_study(cfg, root / "run", show_progress=False)
    return root / "run", doc, cfg, data


def test_a_configured_task_is_scored_under_each_retrieval_mixture_as_the_scorer_does_alone(with_task, tiny, tmp_path):
    """One stage per way of forming a request's mixture (shared by the two routings), planned where it runs; each
    question's log-likelihoods equal `evaluate_mmlu_retrieval` (cloze) on the same pool and settings, per choice
    count; the mixtures' rows of the results carry the task."""
    from edgefuse.commands.evaluate import load_retrieval
    from edgefuse.compose.retrieval import RetrievalSettings
    from edgefuse.evaluate.retrieval import evaluate_mmlu_retrieval
    from edgefuse.runner.estimate import plan
    from edgefuse.tasks.choices import ChoicesBench, load_items

    run_dir, doc, cfg, data = with_task
    log = stage_log(run_dir)
    name = "eval-retrieval-k2-softmax-t0.05-quiz-s0"
    assert [r["stage"] for r in log].count(name) == 1
    assert {r["stage"] for r in log if r["status"] == "ran"} == {r["stage"] for r in log if r["stage"].startswith("eval-")}
    assert [s.name for s in plan(cfg, 12)] == [r["stage"] for r in log]
    [key] = [r["key"] for r in log if r["stage"] == name]
    got = {r["id"]: r for r in json.loads((run_dir / "stages" / f"{name}-{key}" / "quiz.json").read_text())["items"]}
    model, tok = tiny
    pool, encoder = load_retrieval(_pool_copies(run_dir, doc, tmp_path), model)
    items = load_items(ChoicesBench(kind="choices", path=str(data),
                                    fields="question=q,choices=opts,answer=gold,domain=topic"))
    for n in (2, 3):
        group = [it for it in items if len(it.choices) == n]
        ref = evaluate_mmlu_retrieval(model, tok, group, pool, RetrievalSettings(top_k=2, weighting="softmax",
                                      temperature=0.05), encoder=encoder, fmt="cloze")
        for r in ref["items"]:
            assert max(abs(a - b) for a, b in zip(got[r["id"]]["scores"], r["scores"])) <= 1e-5
            assert {Path(k).name: w for k, w in r["mixture"].items()} == got[r["id"]]["mixture"]
    composed = {c["name"]: c["eval"] for c in doc["seeds"][0]["composed"]}
    assert all("quiz" in ev for ev in composed.values())
    assert composed["retrieval-k2-softmax-t0.05-instance"]["quiz"] == composed["retrieval-k2-softmax-t0.05-segment"]["quiz"]
