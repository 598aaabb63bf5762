"""The tiny study every end-to-end test runs (tiny Llama, two edges, two fusion methods with and without
LoRA-CR), and readers of its results."""

from __future__ import annotations

import json
from pathlib import Path

from edgefuse.adapters import load_adapter

TINY_STUDY = {
    "name": "tiny",
    "model": "tiny-llama",
    "seeds": [0],
    "edges": {"science": ["stem"], "law": {"domains": ["law"], "pruning": {"ratio": 0.25, "method": "random"}}},
    "pruning": {"method": "magnitude", "structure": "width", "ratio": 0.5, "calib": 4},
    "training": {"steps": 6, "rank": 4, "alpha": 8, "lr": 0.005, "batch": 4, "seq": 256, "checkpoint_every": 2},
    "fusion": {"methods": ["task_arithmetic", "ties"], "cr": ["off", "element"], "density": 0.5},
    "benchmarks": {"batch_size": 8, "mmlu": {"limit": 24}, "mmlu_cd": {"ks": [2], "n": 8}},
}


def fused_tensors(run_dir: Path) -> dict:
    doc = json.loads((run_dir / "results.json").read_text())
    out = {}
    for f in doc["seeds"][0]["fused"]:
        ad = load_adapter(f["adapter"])
        out[f["name"]] = {n: m.delta() for n, m in ad.modules.items()}
    return out


def scores(run_dir: Path) -> dict:
    doc = json.loads((run_dir / "results.json").read_text())
    rows = {"base": doc["base"]} | {f["name"]: f["eval"] for f in doc["seeds"][0]["fused"]}
    return {k: (v["mmlu"]["correct"], v["mmlu_cd_k2"]["strict_outcomes"]) for k, v in rows.items()}


def stage_log(run_dir: Path) -> list[dict]:
    """Every line of a finished run's stage log."""
    return [json.loads(line) for line in (run_dir / "stages.jsonl").read_text().splitlines() if line.strip()]


def stage_dir(run_dir: Path, name: str) -> Path:
    """The finished directory of stage ``name`` (not a ``.partial`` one)."""
    [d] = [p for p in (run_dir / "stages").glob(f"{name}-*") if p.name[len(name) + 1:].isalnum()]
    return d
