"""Edges that send their own Gram matrices (``interference.source: edges``, issue 22), in one process and on Flower.

`run_study` in this process on a two-edge tiny study with task arithmetic and RegMean, whose Gram matrices come from
each edge's own training prompts: the matrices equal an independent computation (the base model's hidden states
through each layer's input norm, on the edge's own prompts: tests/helpers/grams.py) and the plan names the stages
the run records. Every malformed Gram upload is one line and leaves nothing written, and Gram records a job did not
ask for are refused. On Flower (Ray), tests/test_federated.py's fault simulation carries an edge whose Grams arrive
intact and one whose corrupted upload is rejected, so that Ray starts once for both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from edgefuse.config import load_config
from edgefuse.errors import EdgefuseError

pytest.importorskip("flwr")

pytestmark = pytest.mark.federated

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

STUDY = {"name": "edge-grams", "model": "tiny-llama", "seeds": [0],
         "edges": {"science": ["stem"], "law": ["law"]},
         "pruning": {"method": "magnitude", "structure": "width", "ratio": 0.5, "calib": 2},
         "training": {"steps": 3, "rank": 4, "alpha": 8, "lr": 0.005, "batch": 2, "seq": 128},
         "fusion": {"methods": ["task_arithmetic", "regmean"], "cr": ["off"]},
         "interference": {"source": "edges", "tokens": 256},
         "benchmarks": {"batch_size": 8, "edges_alone": False, "mmlu": {"limit": 12}, "mmlu_cd": {"ks": [2], "n": 4}}}


def write(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**STUDY, **changes}, sort_keys=False))
    return path


def doc(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    from edgefuse.runner import run_study

    root = tmp_path_factory.mktemp("edge-grams")
    run_study(load_config(write(root / "study.yaml")), root / "run", show_progress=False)
    return root / "run"


def test_edge_grams_are_the_base_models_inputs_on_the_edges_own_prompts(local):
    """Every layer's q_proj matrix equals Σ LN(h)ᵀ LN(h) over the edge's own training prompts, with h the base
    model's hidden states (no hooks), and differs from the public-split matrix of the same domain."""
    from helpers.grams import assert_q_grams_match, edge_sequences, q_proj_grams

    from edgefuse.data.mmlu import SplitSpec, load_mmlu
    from edgefuse.interference.collect import public_prompts, token_sequences
    from edgefuse.interference.grams import GramSet
    from edgefuse.models import load_model

    d = doc(local)
    assert d["interference"]["grams"]["source"] == "edges"
    model, tok = load_model("tiny-llama")
    cfg = load_config(write(local.parent / "again.yaml"))
    spec = SplitSpec(seed=cfg.data.split_seed, public_per_subject=cfg.data.public_per_subject,
                     edge_fraction=cfg.data.edge_fraction)
    grams_dir = next(p for p in (local / "stages").iterdir() if p.name.startswith("grams-s0-")) / "grams"
    gs = GramSet(grams_dir)
    assert gs.manifest.split == "edge" and sorted(gs.domains) == ["law", "science"]
    for edge, domains in cfg.edges.items():
        seqs = edge_sequences(tok, cfg, domains, 256, 64)
        assert gs.manifest.domains[edge].tokens == sum(map(len, seqs)) == 256
        assert_q_grams_match(gs.domain(edge), q_proj_grams(model, seqs), edge)
        public = token_sequences(tok, public_prompts(load_mmlu(None), domains, split_spec=spec), 256, 64)
        assert public != seqs  # the edge's own prompts, not the public split's


def test_the_plan_names_the_stages_the_run_recorded(local):
    """No cloud ``grams`` stage; each edge's pass is part of its training, then ``grams-s0`` before the fusions."""
    from edgefuse.runner.estimate import plan

    planned = [s.name for s in plan(load_config(write(local.parent / "plan.yaml")), 12)]
    log = [json.loads(line) for line in (local / "stages.jsonl").read_text().splitlines() if line.strip()]
    assert planned == list(dict.fromkeys(r["stage"] for r in log))
    assert "grams" not in planned and planned.index("recover-law-s0") < planned.index("grams-s0") < planned.index(
        "fuse-task_arithmetic-s0")


# ----------------------------------------------------------------------------------------------- bad uploads
@pytest.fixture(scope="module")
def upload(local):
    """One edge's reply as the cloud receives it (package + Gram records), and the base model's layout."""
    from edgefuse.federated.records import package_to_content
    from edgefuse.interference.collect import gram_layout
    from edgefuse.models import load_model

    grams = Path(next(e for e in doc(local)["seeds"][0]["edges"] if e["edge"] == "science")["grams"])
    model, _ = load_model("tiny-llama")
    return lambda: package_to_content(grams.parent / "package", grams), gram_layout(model)


def _edit_matrix(fn):
    def edit(content):
        from flwr.app import Array

        rec = content.array_records["grams"]
        key = min(rec)
        rec[key] = Array.from_numpy_ndarray(fn(rec[key].numpy().copy()))
    return edit


def _drop_matrix(content):
    rec = content.array_records["grams"]
    del rec[max(rec)]


def _relayout(content):
    meta = content.config_records["grams-meta"]
    modules = json.loads(meta["modules"])
    first = min(modules)
    modules[first] = max(set(modules.values()) - {modules[first]})
    meta["modules"] = json.dumps(modules)


def _tokens(content):
    content.config_records["grams-meta"]["tokens"] = 0


def _no_grams(content):
    del content.array_records["grams"]


@pytest.mark.parametrize("edit, msg", [
    (_edit_matrix(lambda a: a[1:, 1:].copy()), "Gram matrix of module model.layers.0.mlp.down_proj has shape ["),
    (_edit_matrix(lambda a: a * float("inf")), "contains NaN or Inf"),
    (_edit_matrix(lambda a: -a), "is not positive semi-definite"),
    (_edit_matrix(lambda a: a + __import__("numpy").triu(a, 1)), "is not symmetric"),
    (_edit_matrix(lambda a: a.astype("float64")), "has dtype float64; edges send float32"),
    (_drop_matrix, "missing ["),
    (_relayout, "do not follow the base model's module layout"),
    (_tokens, "token count 0 is not a positive integer"),
    (_no_grams, "reply lacks the Gram matrices the job asked for"),
])
def test_a_bad_gram_upload_is_one_line_and_writes_nothing(upload, tmp_path, edit, msg):
    from edgefuse.federated.records import content_to_grams

    make, layout = upload
    content = make()
    edit(content)
    fields = {"base_model": "tiny-llama", "base_fingerprint": "f" * 32, "split": "edge", "split_seed": 0,
              "per_prompt": 64}
    with pytest.raises(EdgefuseError) as e:
        content_to_grams(content, tmp_path / "grams", layout, fields, "science", "Gram matrices")
    assert msg in str(e.value) and str(e.value).startswith("Gram matrices: ") and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "grams").exists() and not list(tmp_path.iterdir())
    content = make()  # the untouched upload passes and round-trips
    content_to_grams(content, tmp_path / "grams", layout, fields, "science", "Gram matrices")
    assert (tmp_path / "grams" / "grams.json").is_file()


def test_gram_records_the_job_did_not_ask_for_are_refused(upload, tmp_path):
    """The privacy promise: without ``interference.source: edges`` a reply carrying Gram records is rejected."""
    from edgefuse.federated.records import content_to_files

    make, _ = upload
    with pytest.raises(EdgefuseError) as e:
        content_to_files(make(), tmp_path / "pkg")
    assert "reply carries records beyond the package: grams, grams-meta" in str(e.value), str(e.value)
    content_to_files(make(), tmp_path / "pkg2", grams=True)  # asked for: the package is written as always
    assert (tmp_path / "pkg2" / "adapter_model.safetensors").is_file()
