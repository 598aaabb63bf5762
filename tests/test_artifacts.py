"""Typed artifacts (issue 14, item 1): one model per file, the same for writer and reader; legacy files read as
version 1; a wrong kind, an unknown version, a missing or unknown field is one line naming the file, with nothing
written; and no reader in the package guesses between alternative spellings of a key."""

from __future__ import annotations

import ast
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from edgefuse.adapters import MANIFEST_FILE, LoraAdapter, LoraModule, load_adapter, save_adapter
from edgefuse.artifacts import (ExternalAdapterManifest, FusedAdapterManifest, StudyResults, parse_manifest,
                                upgrade_legacy)
from edgefuse.errors import EdgefuseError
from edgefuse.io import sha256_file

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

SRC = Path(__file__).resolve().parents[1] / "src" / "edgefuse"
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_study_head"


def _adapter(seed: int = 0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter({"model.layers.0.self_attn.q_proj": LoraModule(torch.randn(2, 8, generator=g),
                                                                      torch.randn(8, 2, generator=g))})


def _fused(**over) -> FusedAdapterManifest:
    return FusedAdapterManifest(base_fingerprint="a" * 32, base_model="tiny-llama", method="ties", output_rank=2,
                                inputs=[{"path": "e0", "domain": "stem"}], **over)


def _rewrite_manifest(d: Path, edit) -> None:
    """Edit a saved adapter's edgefuse.json as a careless tool would (its file hashes stay valid)."""
    man = json.loads((d / MANIFEST_FILE).read_text())
    edit(man)
    (d / MANIFEST_FILE).write_text(json.dumps(man))


def test_written_manifest_reads_back_as_the_same_model(tmp_path):
    want = _fused(cr={"strategy": "element", "threshold": 0.1, "share": None})
    save_adapter(_adapter(), tmp_path / "f", want)
    got = load_adapter(tmp_path / "f").manifest
    assert type(got) is FusedAdapterManifest
    assert got.model_dump(exclude={"files"}) == want.model_dump(exclude={"files"})
    assert got.files == {f: sha256_file(tmp_path / "f" / f) for f in ("adapter_config.json",
                                                                      "adapter_model.safetensors")}


def test_a_fused_manifest_in_the_layout_before_versioning_reads_as_version_1(tmp_path):
    save_adapter(_adapter(), tmp_path / "old", _fused())

    def to_legacy(man):  # how fuse_dirs wrote it until kinds and versions were unified
        man["format"], man["version"] = man.pop("kind"), man.pop("format_version")
    _rewrite_manifest(tmp_path / "old", to_legacy)
    got = load_adapter(tmp_path / "old")
    assert type(got.manifest) is FusedAdapterManifest and got.manifest.format_version == 1
    assert got.base_fingerprint == "a" * 32 and got.manifest.method == "ties"
    assert upgrade_legacy({"kind": "x"}) == {"kind": "x", "format_version": 1}


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=2), "manifest format_version 2 is not supported (this edgefuse reads 1)"),
    (lambda m: m.pop("output_rank"), "manifest lacks the field output_rank"),
    (lambda m: m.update(wall_time_s=3.0), "manifest has an unknown field wall_time_s"),
    (lambda m: m.update(kind="edgefuse-mystery"), "manifest kind 'edgefuse-mystery' is not an edgefuse adapter manifest"),
    (lambda m: m.pop("kind"), "manifest lacks the field kind"),
    (lambda m: m.update(output_rank="two"), "manifest output_rank: Input should be a valid integer, unable to parse string as an integer"),
])
def test_a_bad_manifest_is_one_line_naming_the_file(tmp_path, edit, message):
    save_adapter(_adapter(), tmp_path / "f", _fused())
    _rewrite_manifest(tmp_path / "f", edit)
    with pytest.raises(EdgefuseError) as e:
        load_adapter(tmp_path / "f")
    assert str(e.value) == f"{tmp_path / 'f' / MANIFEST_FILE}: {message}"


def test_eval_refuses_an_adapter_whose_manifest_has_an_unknown_version(tmp_path, cli):
    save_adapter(_adapter(), tmp_path / "f", ExternalAdapterManifest(domain="stem"))
    _rewrite_manifest(tmp_path / "f", lambda m: m.update(format_version=7))
    out = tmp_path / "scores.json"
    code, so, se = cli("eval", "mmlu", "--model", "tiny-llama", "--adapter", tmp_path / "f", "--limit", 2,
                       "--out", out)
    assert code != 0 and not out.exists()
    assert se.strip().splitlines() == [f"error: {tmp_path / 'f' / MANIFEST_FILE}: manifest format_version 7 is not "
                                       "supported (this edgefuse reads 1)"]


def test_every_manifest_kind_parses_to_its_own_model():
    kinds = {"edgefuse-edge-package", "edgefuse-recovered-adapter", "edgefuse-fused-adapter",
             "edgefuse-round-start", "edgefuse-external-adapter"}
    seen = set()
    for cls in (ExternalAdapterManifest, FusedAdapterManifest):
        m = cls(**({} if cls is ExternalAdapterManifest else {"base_fingerprint": None, "base_model": None,
                                                                 "method": "linear", "output_rank": 1}))
        got = parse_manifest(json.loads(json.dumps(m.dump())), "x.json")
        assert type(got) is cls and got == m
        seen.add(m.kind)
    round_start = parse_manifest({"kind": "edgefuse-round-start", "from": "fuse-ties", "fused_sha256": "0" * 64,
                                  "plan_hash": "1" * 64}, "x.json")
    assert round_start.source == "fuse-ties" and round_start.dump()["from"] == "fuse-ties"
    seen.add(round_start.kind)
    assert seen < kinds  # the package kinds are written by training (tests/test_edge_train_recover.py)


def _results(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_bytes(gzip.decompress((FIXTURE / "results.json.gz").read_bytes()))
    return run


def test_results_written_before_versioning_re_render_and_a_future_version_is_refused(tmp_path, cli):
    run = _results(tmp_path)
    doc = json.loads((run / "results.json").read_text())
    assert "format_version" not in doc and StudyResults.parse(doc, "r").format_version == 1
    code, _, se = cli("report", run)  # that it renders the same tables: tests/test_report.py
    assert code == 0 and (run / "report.md").is_file(), se
    shutil.rmtree(run)
    run = _results(tmp_path)
    doc["format_version"] = 3
    (run / "results.json").write_text(json.dumps(doc))
    code, _, se = cli("report", run)
    assert code != 0 and not (run / "report.md").exists()
    assert se.strip() == (f"error: {run / 'results.json'}: results document format_version 3 is not supported "
                          "(this edgefuse reads 1)")


def _guessing_reads(tree: ast.AST) -> list[int]:
    """Lines reading one of two keys: ``x.get(a, y.get(b))`` or ``x.get(a) or y.get(b)``."""
    def is_get(n):
        return isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get"
    hits = []
    for n in ast.walk(tree):
        if is_get(n) and len(n.args) == 2 and is_get(n.args[1]):
            hits.append(n.lineno)
        if isinstance(n, ast.BoolOp) and isinstance(n.op, ast.Or) and sum(map(is_get, n.values)) >= 2:
            hits.append(n.lineno)
    return hits


def test_no_reader_guesses_between_alternative_keys():
    assert _guessing_reads(ast.parse("a = d.get('x', d.get('y'))\nb = d.get('x') or d.get('y')")) == [1, 2]
    found = {str(p.relative_to(SRC)): lines for p in sorted(SRC.rglob("*.py"))
             if (lines := _guessing_reads(ast.parse(p.read_text())))}
    assert found == {}
