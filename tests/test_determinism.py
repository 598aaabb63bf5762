"""Determinism (issue 14, item 4): the same config run twice from scratch gives the same results, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.study import TINY_STUDY, fused_tensors, scores

from edgefuse.config import StudyConfig
from edgefuse.runner import run_study

pytestmark = pytest.mark.e2e

# TINY_STUDY cut down to what a rerun could differ in: pruning, training, one fusion method with and without
# LoRA-CR, MMLU and MMLU-CD on a few items (no edges evaluated alone, no figures).
SMALL_STUDY = {
    **TINY_STUDY,
    "name": "determinism",
    "pruning": {**TINY_STUDY["pruning"], "calib": 2},
    "training": {**TINY_STUDY["training"], "steps": 3, "seq": 128, "checkpoint_every": 0},
    "fusion": {"methods": ["ties"], "cr": ["off", "element"], "density": 0.5},
    "benchmarks": {"batch_size": 8, "mmlu": {"limit": 8}, "mmlu_cd": {"ks": [2], "n": 4}, "edges_alone": False},
    "output": {"figures": False},
}


def _numbers(doc: dict) -> dict:
    """Every score of a results document: the base's and each fused model's evaluation, whole."""
    return {"base": doc["base"], **{f["name"]: f["eval"] for f in doc["seeds"][0]["fused"]}}


def test_same_config_twice_from_scratch_gives_identical_scores_and_adapters(tmp_path):
    cfg = StudyConfig.model_validate(SMALL_STUDY)
    runs = [tmp_path / "a", tmp_path / "b"]
    docs = [run_study(cfg, d, show_progress=False) for d in runs]
    assert not torch.are_deterministic_algorithms_enabled()  # the study's setting does not outlive it
    a, b = (json.loads((d / "results.json").read_text()) for d in runs)
    assert _numbers(a) == _numbers(b) == _numbers(docs[0])  # every per-item outcome and accuracy number
    assert scores(runs[0]) == scores(runs[1]) and len(scores(runs[0])["base"][0]) == 8
    ta, tb = fused_tensors(runs[0]), fused_tensors(runs[1])
    assert set(ta) == set(tb) == {"ties", "ties+element"}
    for name in ta:
        assert set(ta[name]) == set(tb[name]) and ta[name]
        for mod in ta[name]:
            assert torch.equal(ta[name][mod], tb[name][mod]), (name, mod)  # bit for bit
