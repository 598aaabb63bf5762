"""The duration estimate: unit counts × rates, worked by hand, and the correction from a run directory's own
finished stages."""

from __future__ import annotations

import json

import pytest

from edgefuse.config import StudyConfig
from edgefuse.runner.estimate import RATES, mark_done, plan, remaining_seconds

pytestmark = pytest.mark.unit

CFG = {"model": "smollm2-135m", "edges": {"a": ["stem"], "b": ["law"]},
       "pruning": {"method": "taylor", "ratio": 0.25, "calib": 8},
       "training": {"steps": 10, "batch": 4, "objective": "both"},
       "fusion": {"methods": ["task_arithmetic", "ties"], "cr": ["off", "element"]},
       "benchmarks": {"format": "cloze", "mmlu": {"limit": 100}, "mmlu_cd": {"ks": [2], "n": 30, "single": False}}}


def test_plan_counts_units_times_rates_by_hand():
    stages = {s.name: s for s in plan(StudyConfig.model_validate(CFG), 100)}
    eval_s = 100 * RATES["mmlu_item"]["cloze"] + 30 * 2 * RATES["cd_answer"]["cloze"]
    assert stages["eval-base"].seconds == pytest.approx(eval_s)
    assert stages["eval-ties+element-s0"].seconds == pytest.approx(eval_s)
    assert stages["eval-edge-a-s0"].seconds == pytest.approx(100 * RATES["mmlu_item"]["cloze"])  # MMLU only
    assert stages["train-a-s0"].seconds == pytest.approx(10 * 4 * RATES["train_prompt"]["both"])
    assert stages["prune-b-s0"].seconds == pytest.approx(RATES["prune"] + 8 * RATES["prune_calib"])
    assert stages["fuse-ties+element-s0"].seconds == pytest.approx(RATES["fuse"]["elementwise"] + RATES["fuse"]["cr"])
    assert stages["fuse-task_arithmetic-s0"].seconds == pytest.approx(RATES["fuse"]["plain"])
    # a model twice the reference size takes twice as long
    big = {s.name: s.seconds for s in plan(StudyConfig.model_validate(CFG), 100, params=2 * 134.5e6)}
    assert big["eval-base"] == pytest.approx(2 * eval_s)


def test_finished_stages_are_done_and_correct_their_kind(tmp_path):
    stages = plan(StudyConfig.model_validate(CFG), 100)
    est = {s.name: s.seconds for s in stages}
    # the base evaluation took twice its estimate: every other evaluation is expected to as well
    d = tmp_path / "stages" / "eval-base-abc"
    d.mkdir(parents=True)
    (d / "stage.json").write_text(json.dumps({"name": "eval-base", "wall_s": 2 * est["eval-base"]}))
    factors = mark_done(stages, tmp_path)
    assert factors == {"eval": pytest.approx(2.0)}
    got = {s.name: s for s in stages}
    assert got["eval-base"].done and not got["eval-ties-s0"].done
    assert got["eval-ties-s0"].seconds == pytest.approx(2 * est["eval-ties-s0"])
    assert got["train-a-s0"].seconds == pytest.approx(est["train-a-s0"])  # other kinds unchanged
    assert remaining_seconds(stages) == pytest.approx(sum(s.seconds for s in stages if s.name != "eval-base"))


def test_grams_and_interference_stages_are_planned_only_when_the_study_collects_grams():
    """No Grams, no grams stage; with regmean: one grams stage (one base-model pass per distinct set of edge domains)
    before the seeds, and after every fuse stage its interference stage; RegMean's fusion costs its edges' Grams."""
    names = [s.name for s in plan(StudyConfig.model_validate(CFG), 100)]
    assert "grams" not in names and not any(n.startswith("interference-") for n in names)
    cfg = StudyConfig.model_validate({**CFG, "edges": {"a": ["stem"], "b": ["law"], "c": ["stem"]},
                                      "fusion": {"methods": ["task_arithmetic", "regmean"], "cr": ["off"]},
                                      "interference": {"tokens": 512}})
    stages = plan(cfg, 100)
    by = {s.name: s for s in stages}
    order = [s.name for s in stages]
    assert by["grams"].kind == "grams" and by["grams"].seconds == pytest.approx(2 * 512 * RATES["grams_token"])
    assert order.index("eval-base") < order.index("grams") < order.index("prune-a-s0")
    for m in ("task_arithmetic", "regmean"):
        i = order.index(f"fuse-{m}-s0")
        assert order[i + 1] == f"interference-{m}-s0" and order[i + 2] == f"eval-{m}-s0"
        assert by[f"interference-{m}-s0"].seconds == pytest.approx(
            3 * RATES["interference_edge"] + 9 * RATES["interference_pair"])
    assert by["fuse-regmean-s0"].seconds == pytest.approx(RATES["fuse"]["plain"] + 3 * RATES["regmean_edge"])
