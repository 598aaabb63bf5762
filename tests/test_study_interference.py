"""The study's Gram matrices (issue 22) on the tiny model: a ``grams`` stage, RegMean among the fusion methods,
each fused model's interference on activations in results.json, the report's table and heatmap.

References are independent of the runner: the stored figures are `edgefuse.interference.metrics.interference`
recomputed from the run's own files (edge adapters, fused adapters, Gram directory), summed up here by hand; the
RegMean adapter is `edgefuse.fusion.fuse_dirs` called directly on the same adapters and Grams.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
from helpers.study import TINY_STUDY, stage_dir, stage_log

pytestmark = pytest.mark.e2e

STUDY = {
    **copy.deepcopy(TINY_STUDY), "name": "tiny-interference",
    "fusion": {"methods": ["task_arithmetic", "regmean"],
               "cr": ["off", {"name": "act50", "strategy": "activation", "share": 0.5}]},
    "interference": {"tokens": 96, "per_prompt": 32},
    "benchmarks": {**TINY_STUDY["benchmarks"], "edges_alone": False, "mmlu": {"limit": 12},
                   "mmlu_cd": {"ks": [2], "n": 4}},
}
FUSED = ["task_arithmetic", "task_arithmetic+act50", "regmean"]  # regmean+act50 would be regmean again: not built


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The study, then the same study again in the same run directory; the stage log of each."""
    from edgefuse.config import StudyConfig
    from edgefuse.runner import run_study

    run_dir = tmp_path_factory.mktemp("interference") / "run"
    cfg = StudyConfig.model_validate(STUDY)
    doc = run_study(cfg, run_dir, show_progress=False)
    first = stage_log(run_dir)
    run_study(cfg, run_dir, show_progress=False)
    return {"doc": doc, "run_dir": run_dir, "cfg": cfg, "first": first, "second": stage_log(run_dir)[len(first):]}


def test_grams_stage_runs_once_and_regmean_fuses_with_its_hash(run):
    from edgefuse.io import sha256_file

    first, run_dir = run["first"], run["run_dir"]
    kinds = {r["stage"]: r["kind"] for r in first}
    assert kinds["grams"] == "grams" and [r["stage"] for r in first].count("grams") == 1
    assert {f["name"] for f in run["doc"]["seeds"][0]["fused"]} == set(FUSED)
    grams = stage_dir(run_dir, "grams") / "grams"
    manifest = json.loads((grams / "grams.json").read_text())
    assert set(manifest["domains"]) == {"science", "law"}  # by edge: the domain each recovered adapter records
    assert all(d["tokens"] == 96 for d in manifest["domains"].values())
    digest = sha256_file(grams / "grams.json")
    for name in FUSED:
        inputs = json.loads((stage_dir(run_dir, f"fuse-{name}-s0") / "stage.json").read_text())["inputs"]
        uses = name.startswith("regmean") or name.endswith("+act50")  # RegMean or LoRA-CR activation
        assert inputs.get("grams") == (digest if uses else None), name  # others keep their keys
    assert run["doc"]["interference"]["grams"]["sha256"] == digest


def test_regmean_adapter_is_fuse_dirs_on_the_same_adapters_and_grams(run, tmp_path):
    from edgefuse.adapters import load_adapter
    from edgefuse.fusion import fuse_dirs

    doc, run_dir = run["doc"], run["run_dir"]
    edges = [e["adapter"] for e in doc["seeds"][0]["edges"]]
    fuse_dirs(edges, tmp_path / "ref", method="regmean", activations=stage_dir(run_dir, "grams") / "grams", force=True)
    ref = load_adapter(tmp_path / "ref")
    got = load_adapter(next(f["adapter"] for f in doc["seeds"][0]["fused"] if f["name"] == "regmean"))
    assert set(ref.modules) == set(got.modules) and ref.modules
    for n in ref.modules:
        assert (ref.modules[n].delta() - got.modules[n].delta()).abs().max() <= 1e-6, n


def test_lora_cr_activation_in_a_study_is_fuse_dirs_with_the_studys_grams(run, tmp_path):
    from edgefuse.adapters import load_adapter
    from edgefuse.fusion import fuse_dirs

    doc, run_dir = run["doc"], run["run_dir"]
    edges = [e["adapter"] for e in doc["seeds"][0]["edges"]]
    stats = fuse_dirs(edges, tmp_path / "ref", method="task_arithmetic", cr="activation", cr_share=0.5,
                      activations=stage_dir(run_dir, "grams") / "grams", force=True)
    ref, got = load_adapter(tmp_path / "ref"), load_adapter(
        next(f["adapter"] for f in doc["seeds"][0]["fused"] if f["name"] == "task_arithmetic+act50"))
    assert set(ref.modules) == set(got.modules) and ref.modules
    for n in ref.modules:
        assert (ref.modules[n].delta() - got.modules[n].delta()).abs().max() <= 1e-6, n
    assert stats["cr"]["share_changed"] > 0  # it edited something


def test_stored_interference_is_metrics_recomputed_from_the_run_files(run):
    from edgefuse.adapters import load_adapter
    from edgefuse.interference.grams import GramSet
    from edgefuse.interference.metrics import interference

    doc, run_dir = run["doc"], run["run_dir"]
    edges = doc["seeds"][0]["edges"]
    names = [e["edge"] for e in edges]
    adapters = [load_adapter(e["adapter"]) for e in edges]
    grams = GramSet(stage_dir(run_dir, "grams") / "grams")
    records = {m["name"]: m for m in doc["interference"]["models"]}
    assert set(records) == set(FUSED)
    for f in doc["seeds"][0]["fused"]:
        rec = records[f["name"]]
        stats = interference(adapters, [grams.domain(n) for n in names], load_adapter(f["adapter"]))
        s, mods = stats["summary"], stats["modules"]
        assert rec["edges"] == names and rec["modules"] == s["modules"] == len(mods) > 0
        for got, want in zip(rec["ratio"], s["ratio"], strict=True):
            assert got == pytest.approx(want, rel=1e-9)
        for i, d in enumerate(rec["domains"]):
            assert d["domain"] == names[i]
            assert d["deviation"] == pytest.approx(s["deviation"][i], rel=1e-9)
            devs = {n: e["deviation"][i] for n, e in mods.items()}
            assert d["deviation_median"] == pytest.approx(statistics.median(devs.values()), rel=1e-9)
            assert d["deviation_max"] == pytest.approx(max(devs.values()), rel=1e-9)
            assert devs[d["deviation_max_module"]] == pytest.approx(d["deviation_max"], rel=1e-9)
            worst = {n: max(r for j, r in enumerate(e["ratio"][i]) if j != i) for n, e in mods.items()}
            assert d["ratio_median"] == pytest.approx(statistics.median(worst.values()), rel=1e-9)
            assert d["ratio_max"] == pytest.approx(max(worst.values()), rel=1e-9)
            assert worst[d["ratio_max_module"]] == pytest.approx(d["ratio_max"], rel=1e-9)
            other = 1 - i
            assert d["ratio"] == pytest.approx(s["ratio"][i][other]) and d["ratio_adapter"] == names[other]
        full = json.loads(Path(rec["file"]).read_text())
        assert full["summary"]["deviation"] == pytest.approx(s["deviation"], rel=1e-9)


def test_report_has_the_interference_table_and_heatmap_from_results_alone(run, tmp_path):
    from edgefuse.report import write_report
    from edgefuse.report.document import read_results

    run_dir = run["run_dir"]
    report = (run_dir / "report.md").read_text()
    section = report.split("## Interference on activations", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| science") or line.startswith("| law")]
    assert len(rows) == 2 and all(line.count("|") == 5 + len(FUSED) for line in rows)
    assert (run_dir / "interference.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_report(read_results(run_dir), tmp_path, results=False)  # re-rendered from results.json alone
    assert (tmp_path / "report.md").read_text() == report


def test_plan_lists_the_grams_and_interference_stages_in_run_order(run):
    from edgefuse.runner.estimate import plan

    planned = plan(run["cfg"], 12)
    assert [s.name for s in planned] == list(dict.fromkeys(r["stage"] for r in run["first"]))
    by_name = {s.name: s for s in planned}
    assert by_name["grams"].kind == "grams" and by_name["grams"].seconds > 0
    assert all(by_name[f"interference-{n}-s0"].seconds > 0 for n in FUSED)
    assert by_name["fuse-regmean-s0"].seconds > by_name["fuse-task_arithmetic-s0"].seconds


def test_second_run_is_fully_cached(run):
    assert run["second"] and all(r["status"] == "cached" for r in run["second"]), run["second"]


def test_gold_scores_are_those_of_the_stage_files_and_old_summaries_gain_them(run, tmp_path):
    """Each evaluation's per-item gold scores (issue 22, item 5) are `gold_scores` of its own results file; a run
    whose cached evaluation summaries predate them (stage.json without ``gold``) gains the same scores on resume,
    without evaluating again; the report shows them beside accuracy, and in the LoRA-CR table."""
    import shutil

    from edgefuse.data.mmlu import load_mmlu
    from edgefuse.evaluate.gold import gold_scores
    from edgefuse.runner import run_study

    doc, run_dir = run["doc"], run["run_dir"]
    items = load_mmlu().by_id()
    evals = {"eval-base": doc["base"]} | {f"eval-{f['name']}-s0": f["eval"] for f in doc["seeds"][0]["fused"]}
    for stage, ev in evals.items():
        res = json.loads((stage_dir(run_dir, stage) / "mmlu.json").read_text())
        assert ev["mmlu"]["gold"] == gold_scores(res["items"], items, res["format"]) and len(ev["mmlu"]["gold"]) == 12
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    for marker in (copy_dir / "stages").glob("eval-*/stage.json"):
        rec = json.loads(marker.read_text())
        del rec["result"]["mmlu"]["gold"]
        marker.write_text(json.dumps(rec))
    again = run_study(run["cfg"], copy_dir, show_progress=False)
    assert all(r["status"] == "cached" for r in stage_log(copy_dir)[len(stage_log(run_dir)):])
    assert again["base"]["mmlu"]["gold"] == doc["base"]["mmlu"]["gold"]
    assert [f["eval"]["mmlu"]["gold"] for f in again["seeds"][0]["fused"]] == \
        [f["eval"]["mmlu"]["gold"] for f in doc["seeds"][0]["fused"]]
    report = (run_dir / "report.md").read_text()
    assert "### Gold answer log-likelihood" in report
    sweep = report.split("## LoRA-CR against the same method without it", 1)[1]
    assert "Δ gold log-lik. vs no CR" in sweep and "| task_arithmetic+act50 |" in sweep
