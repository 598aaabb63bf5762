"""``edgefuse prune / train / recover`` end to end on the tiny model, and their bad-input behaviour:
one clear line, non-zero exit, nothing half-written."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, cli):
    d = tmp_path_factory.mktemp("cli")
    r = cli("prune", "--model", "tiny-llama", "--method", "wanda", "--ratio", "0.5", "--calib", "4", "--out", d / "p")
    assert r.returncode == 0, r.stderr
    r = cli("train", "--pruned", d / "p", "--domain", "stem", "--steps", "3", "--batch", "2", "--seq", "48",
            "--limit", "6", "--checkpoint-every", "1", "--out", d / "pkg")
    assert r.returncode == 0, r.stderr
    r = cli("recover", "--package", d / "pkg", "--plan", d / "p" / "plan.json", "--out", d / "rec")
    assert r.returncode == 0, r.stderr
    return d


def test_prune_train_recover_then_evaluate_with_the_recovered_adapter(pipeline, cli):
    d = pipeline
    plan = json.loads((d / "p" / "plan.json").read_text())
    assert plan["method"] == "wanda" and plan["ratio"] == 0.5 and plan["calibration"]["n_prompts"] == 4
    man = json.loads((d / "pkg" / "edgefuse.json").read_text())
    assert man["stats"]["steps"] == 3 and man["n_items"] == 6 and man["domain"] == "stem"
    rec = json.loads((d / "rec" / "adapter_config.json").read_text())
    assert rec["base_model_name_or_path"] == "tiny-llama"
    r = cli("eval", "mmlu", "--model", "tiny-llama", "--adapter", d / "rec", "--limit", "4", "--out", d / "res.json")
    assert r.returncode == 0, r.stderr  # the manifest's base fingerprint matches the unpruned base
    r = cli("eval", "mmlu", "--model", "tiny-llama", "--adapter", d / "pkg", "--limit", "4")
    # pruned shapes: this is why recovery exists
    assert r.returncode != 0 and ", tiny-llama has " in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, msg", [
    (["prune", "--model", "tiny-llama", "--ratio", "1.5", "--out", "{d}/x"], "--ratio must lie in (0, 1)"),
    (["prune", "--model", "tiny-llama", "--ratio", "0", "--out", "{d}/x"], "--ratio must lie in (0, 1)"),
    (["prune", "--model", "tiny-llama", "--ratio", "0.5", "--memory-budget", "1", "--out", "{d}/x"], "exactly one"),
    (["train", "--pruned", "{d}/p", "--domain", "stem", "--steps", "3", "--batch", "2", "--seq", "48", "--limit", "6",
      "--lr", "0.1", "--resume", "--out", "{d}/pkg"], "differs in: lr"),
    (["train", "--pruned", "{d}/p", "--domain", "astrology", "--out", "{d}/x"], "unknown domain"),
    (["train", "--pruned", "{d}/p", "--domain", "stem", "--objective", "essays", "--out", "{d}/x"],
     "invalid training option objective: Input should be 'letters', 'cloze' or 'both'"),
    (["recover", "--package", "{d}/rec", "--plan", "{d}/p/plan.json", "--out", "{d}/x"], "not an edge package"),
])
def test_bad_input_is_one_clear_line(pipeline, args, msg, cli):
    r = cli(*[a.format(d=pipeline) for a in args])
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (pipeline / "x").exists()


def test_prune_without_calib_calibrates_on_as_many_prompts_as_a_study(tmp_path, cli):
    """One default for both: `edgefuse prune` without --calib uses the study config's `pruning.calib`."""
    from edgefuse.config import StudyConfig

    r = cli("prune", "--model", "tiny-llama", "--method", "wanda", "--ratio", "0.5", "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["calibration"]["n_prompts"] == StudyConfig.model_fields["pruning"].get_default().calib
