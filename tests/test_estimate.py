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
