"""CLI behaviour on good and bad input: one clear line, non-zero exit, nothing half-written (in-process; the
subprocess smoke tests are in test_cli_smoke.py)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_info_reports_counts_and_skipped_rows(cli):
    r = cli("info")
    assert r.returncode == 0, r.stderr
    assert "14042 items, 57 subjects" in r.stdout
    assert "11777" in r.stdout and "12794" in r.stdout


def test_eval_mmlu_on_tiny_model_writes_results(tmp_path, cli):
    out = tmp_path / "res.json"
    r = cli("eval", "mmlu", "--model", "tiny-llama", "--domains", "stem", "--limit", "12", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["n"] == 12 and len(res["items"]) == 12
    acc = sum(i["correct"] for i in res["items"]) / 12
    assert res["accuracy"]["overall"]["acc"] == pytest.approx(acc)
    assert all(i["pred"] == "ABCD"[max(range(4), key=lambda k: i["scores"][k])] for i in res["items"])


@pytest.mark.parametrize(
    "args, msg",
    [
        (["eval", "mmlu", "--model", "nonsense"], "unknown model spec"),
        (["eval", "mmlu", "--model", "tiny-llama", "--domains", "astrology"], "unknown domain 'astrology'"),
        (["eval", "mmlu", "--model", "tiny-llama", "--subjects", "cooking"], "unknown subject 'cooking'"),
        (["eval", "mmlu", "--model", "tiny-llama", "--data", "/nope/mmlu.jsonl"], "/nope/mmlu.jsonl"),
    ],
)
def test_bad_input_is_one_clear_line(args, msg, cli):
    r = cli(*args)
    assert r.returncode != 0
    assert msg in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_adapter_dir_without_files_and_pickles(tmp_path, cli):
    out = tmp_path / "res.json"
    (tmp_path / "empty").mkdir()
    r = cli("eval", "mmlu", "--model", "tiny-llama", "--limit", "4", "--adapter", str(tmp_path / "empty"), "--out", str(out))
    assert r.returncode != 0 and "not a PEFT adapter directory" in r.stderr and not out.exists()
    (tmp_path / "empty" / "adapter_model.bin").write_bytes(b"x")
    r = cli("eval", "mmlu", "--model", "tiny-llama", "--limit", "4", "--adapter", str(tmp_path / "empty"))
    assert r.returncode != 0 and "pickle file refused" in r.stderr


def test_malformed_mmlu_file_names_the_line(tmp_path, cli):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", '
                 '"correct_answer": "Z", "topic": "anatomy"}\n')
    r = cli("eval", "mmlu", "--model", "tiny-llama", "--data", str(p), "--strict", "--split", "all")
    assert r.returncode != 0 and f"{p}:1: answer 'Z'" in r.stderr
