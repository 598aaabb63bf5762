"""What the federated tests share: the tiny federated study's config, its single-process reference run, and
comparisons of run directories (tests/test_federated.py: simulation; tests/test_federated_deployment.py: real
processes and the records that travel)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from edgefuse.adapters import load_adapter
from edgefuse.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "federated-tiny.yaml"
BIN = Path(sys.executable).parent


def reference_run(tmp_path_factory) -> Path:
    """`run_study` in this process on configs/federated-tiny.yaml: what every Flower run must reproduce."""
    from edgefuse.runner import run_study

    run_dir = tmp_path_factory.mktemp("fed") / "reference"
    run_study(load_config(CONFIG), run_dir, show_progress=False)
    return run_dir


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def fused_deltas(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f["name"]: {n: m.delta() for n, m in load_adapter(f["adapter"]).modules.items()}
            for f in results(run_dir)["seeds"][0]["fused"]}


def assert_same_fused(a: Path, b: Path) -> None:
    da, db = fused_deltas(a), fused_deltas(b)
    assert set(da) == set(db) and da
    for name in da:
        assert set(da[name]) == set(db[name])
        for mod in da[name]:
            assert (da[name][mod] - db[name][mod]).abs().max().item() <= 1e-6, (name, mod)


def copy_without_training(ref: Path, dst: Path, edges: list[str]) -> Path:
    """The reference run's cache minus these edges' training (and everything fused/evaluated after it)."""
    shutil.copytree(ref, dst)
    for d in (dst / "stages").iterdir():
        if any(d.name.startswith(f"{k}-{e}-") for e in edges for k in ("train", "recover")) or \
                (d.name.startswith(("fuse-", "eval-")) and not d.name.startswith("eval-base")):
            shutil.rmtree(d)
    for f in ("results.json", "report.md", "stages.jsonl"):
        (dst / f).unlink(missing_ok=True)
    return dst


def write_config(path: Path, **changes) -> Path:
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # edge order is the fusion order
    return path


def verify(pkg: Path, pruned: Path, **over):
    from edgefuse.federated.verify import verify_package
    from edgefuse.io import read_json

    meta = read_json(pruned / "edgefuse_model.json")
    kw = {"edge": "science", "plan": read_json(pruned / "plan.json"), "base_fingerprint": meta["base_fingerprint"],
          "pruned_fingerprint": meta["pruned_fingerprint"], "rank": 4,
          "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    kw.update(over)
    return verify_package(pkg, **kw)

