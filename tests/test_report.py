"""`edgefuse report RUN_DIR`: the report as a pure function of results.json.

The fixture (tests/fixtures/tiny_study_head) is the tiny e2e study's results.json, report.md and results.csv as
written by the code before the runner/report redesign (commit 44f4484); the new code must re-render the same
tables from that file alone, except the edges table, whose memory and loss columns changed since (``EDGES``).
"""

from __future__ import annotations

import ast
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_study_head"
REPORT_PKG = Path(__file__).resolve().parents[1] / "src" / "edgefuse" / "report"


def head_results() -> dict:
    return json.loads(gzip.decompress((FIXTURE / "results.json.gz").read_bytes()))


# The edges table as this code renders the fixture: both memory figures apart (the old file has no per-edge tensor
# peak, so "–"; its RSS rise is 43954176 and 25829376 bytes = 42 and 25 MiB) and the loss as the mean of the last
# 20 steps, here all 6: (1.341791 + 1.452301 + 1.413597 + 1.415391 + 1.257313 + 1.349707) / 6 = 1.3717 and
# (1.401817 + 1.413077 + 1.375510 + 1.375739 + 1.376380 + 1.423586) / 6 = 1.3944 (the old "final loss": 1.350, 1.424).
EDGES = """\
| edge | domains | seed | pruning (ratio) | params (pruned / base) | edge tensor peak MiB (estimate) | \
process memory rise MiB | tokens/s | train s | loss, mean of last 20 steps | own domain % [CI] n (base) | \
all MMLU % [CI] | Δ all vs base |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| science | stem | 0 | magnitude width 0.50 | 0.2M / 0.2M | – | 42 | 50234 | 0 | 1.372 | 0.0 [0.0, 0.0] n=4 \
(base 0.0) | 37.5 [20.8, 58.3] | +0.0 [+0.0, +0.0] |
| law | law | 0 | random width 0.25 | 0.2M / 0.2M | – | 25 | 51215 | 0 | 1.394 | 66.7 [0.0, 100.0] n=3 \
(base 66.7) | 37.5 [20.8, 58.3] | +0.0 [-20.8, +20.8] |"""


def old_report() -> str:
    """The fixture's report.md with its edges section (table and note) as this code writes it; all else as it was."""
    from edgefuse.report.tables import EDGES_NOTE

    old = (FIXTURE / "report.md").read_text()
    section = old.split("## Edges\n\n", 1)[1].split("\n\n## ", 1)[0]
    return old.replace(section, EDGES + "\n\n" + EDGES_NOTE)


def run_report(monkeypatch, capsys, run_dir: Path) -> tuple[int, str, str]:
    from edgefuse.cli import main

    monkeypatch.setattr(sys, "argv", ["edgefuse", "report", str(run_dir)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_old_results_rerender_to_the_old_report(tmp_path, monkeypatch, capsys):
    (tmp_path / "results.json").write_text(json.dumps(head_results()))
    code, out, err = run_report(monkeypatch, capsys, tmp_path)
    assert code in (0, None), err
    assert (tmp_path / "report.md").read_text() == old_report()
    assert (tmp_path / "results.csv").read_text() == (FIXTURE / "results.csv").read_text()
    for name in ("conflict_heatmap.png", "mmlu_cd_k2_methods.png", "per_domain.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    headline = (FIXTURE / "report.md").read_text().split("## Headline", 1)[1].split("\n\n")[2]
    assert headline in out  # the same table the old `edgefuse run` printed
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".png") == ["report.md", "results.csv",
                                                                                "results.json"]


def test_results_without_conflict_scores_skip_the_heatmap_with_one_note(tmp_path, monkeypatch, capsys):
    doc = head_results()
    for f in doc["seeds"][0]["fused"]:
        del f["fusion"]["conflicts"]["modules"]
    (tmp_path / "results.json").write_text(json.dumps(doc))
    code, _, err = run_report(monkeypatch, capsys, tmp_path)
    assert code in (0, None)
    note = "Conflict heatmap left out: these results hold no per-module conflict scores."
    assert err.strip() == note and not (tmp_path / "conflict_heatmap.png").exists()
    old, new = old_report(), (tmp_path / "report.md").read_text()
    cap = old.split("](conflict_heatmap.png)", 1)[0].rsplit("![", 1)[1]
    figure = f"![{cap}](conflict_heatmap.png)\n\n*{cap}*\n"
    assert figure in old and new == old.replace(figure, f"*{note}*\n")  # the same tables; the note for the figure


@pytest.mark.parametrize("content, problem", [(None, "no results.json here"),
                                              ("{\"name\": \"x\"}", "results document lacks the field model"),
                                              ("{", "malformed JSON")])
def test_bad_run_directory_is_one_line(tmp_path, monkeypatch, capsys, content, problem):
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    code, _, err = run_report(monkeypatch, capsys, tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {tmp_path / 'results.json'}") and problem in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["results.json"] if content else [])


TENSOR_READERS = ("torch", "safetensors", "transformers", "peft", "edgefuse.adapters", "edgefuse.models",
                  "edgefuse.peft_utils", "edgefuse.fusion", "edgefuse.edge")


def test_no_module_of_the_report_imports_a_tensor_reader():
    """By inspection of every import statement in edgefuse/report/, and by rendering a report in a fresh
    process: no tensor library or adapter reader is imported, so the report cannot load a tensor."""
    for path in sorted(REPORT_PKG.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(TENSOR_READERS), f"{path.name} imports {name}"
    code = ("import gzip, json, sys, tempfile, pathlib\n"
            "from edgefuse.report import write_report\n"
            f"doc = json.loads(gzip.decompress(pathlib.Path({str(FIXTURE / 'results.json.gz')!r}).read_bytes()))\n"
            "write_report(doc, pathlib.Path(tempfile.mkdtemp()), results=False)\n"
            f"print(sorted(m for m in sys.modules if m.startswith({TENSOR_READERS!r})))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
