"""The study on Flower's simulation engine: simulation equals the single-process run, faults, privacy.

The reference is `run_study` in this process on configs/federated-tiny.yaml (tiny model, 2 edges).
Fault runs (and the deployment runs of tests/test_federated_deployment.py) start from a copy of the reference's stage cache with some edges' training
removed, so only those edges are sent to Flower and everything else is reused.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers.federation import CONFIG, assert_same_fused, copy_without_training, reference_run, results, write_config
from helpers.federation import verify as _verify
from helpers.study import scores

pytest.importorskip("flwr")
pytest.importorskip("ray")

from edgefuse.adapters import load_adapter
from edgefuse.config import load_config
from edgefuse.errors import EdgefuseError

pytestmark = pytest.mark.federated

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


# ----------------------------------------------------------------------------------------------- helpers
# Flower mods (module level so that Ray can ship them to the simulated edges by reference).
def _job_edge(msg) -> str | None:
    from edgefuse.federated.records import JOB_RECORD

    if msg.metadata.message_type != "train" or JOB_RECORD not in msg.content.config_records:
        return None
    return msg.content.config_records[JOB_RECORD]["edge"]


def record_mod(out_dir, msg, ctx, call_next):
    """Dump every record of every reply this edge sends (names, dtypes, shapes, all config values)."""
    reply = call_next(msg, ctx)
    dump = {"type": msg.metadata.message_type, "error": reply.has_error(), "arrays": {}, "configs": {},
            "metrics": {}}
    if not reply.has_error():
        c = reply.content
        dump["arrays"] = {r: {k: [str(a.numpy().dtype), list(a.numpy().shape)] for k, a in rec.items()}
                          for r, rec in c.array_records.items()}
        dump["configs"] = {r: dict(rec) for r, rec in c.config_records.items()}
        dump["metrics"] = {r: dict(rec) for r, rec in c.metric_records.items()}
    name = f"{msg.metadata.message_type}-{ctx.node_config.get('partition-id', 'x')}-{time.time_ns()}.json"
    Path(out_dir, name).write_text(json.dumps(dump, default=str))
    return reply


def fault_mod(msg, ctx, call_next):
    """Edge 'science' crashes while training; edge 'law' returns a package whose tensor was altered; edge
    'economics' sends Gram matrices (``interference.source: edges``) with a NaN in one."""
    edge = _job_edge(msg)
    if edge == "science":
        raise RuntimeError("injected failure during training")
    reply = call_next(msg, ctx)
    if edge in ("law", "economics") and not reply.has_error():
        from flwr.app import Array

        rec = reply.content.array_records["adapter" if edge == "law" else "grams"]
        key = min(rec)
        bad = rec[key].numpy().copy()
        if edge == "law":
            bad += 1e-3
        else:
            bad[0, 0] = float("nan")
        rec[key] = Array.from_numpy_ndarray(bad)
    return reply


def job_mod(out_dir, msg, ctx, call_next):
    """Dump the records of every training job this edge receives (names, shapes, the job's round)."""
    if msg.metadata.message_type == "train":
        c = msg.content
        dump = {"arrays": {r: {k: list(a.numpy().shape) for k, a in rec.items()} for r, rec in c.array_records.items()},
                "configs": sorted(c.config_records), "round": c.config_records["job"].get("round"),
                "edge": c.config_records["job"]["edge"]}
        Path(out_dir, f"job-{dump['edge']}-r{dump['round']}.json").write_text(json.dumps(dump))
    return call_next(msg, ctx)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    from edgefuse.federated.clientapp import make_client_app
    from edgefuse.federated.simulate import simulate

    root = tmp_path_factory.mktemp("sim")
    sent = root / "sent"
    sent.mkdir()
    simulate(CONFIG, root / "run", client_app=make_client_app([functools.partial(record_mod, str(sent))]))
    return root / "run", sent


@pytest.fixture(scope="module")
def faulty(reference, tmp_path_factory):
    """Four edges that send their own Gram matrices (``interference.source: edges``): 'science' crashes, 'law' is
    tampered with, 'economics' sends a corrupted Gram matrix, 'history' trains normally; min_edges=1."""
    from edgefuse.federated.clientapp import make_client_app
    from edgefuse.federated.simulate import simulate

    root = tmp_path_factory.mktemp("faults")
    cfg = write_config(root / "four.yaml", edges={"science": ["stem"], "law": ["law"], "history": ["history"],
                                                   "economics": ["economics"]},
                       interference={"enabled": True, "source": "edges", "tokens": 256})
    run_dir = copy_without_training(reference, root / "run", ["science", "law"])
    doc = simulate(cfg, run_dir, min_edges=1, parallel=2, client_app=make_client_app([fault_mod]))
    return run_dir, doc


@pytest.fixture(scope="module")
def two_rounds(reference, simulated, tmp_path_factory):
    """A second round on top of the reference and the simulated runs (round 1 comes from their caches)."""
    from edgefuse.federated.clientapp import make_client_app
    from edgefuse.federated.simulate import simulate
    from edgefuse.runner import run_study

    root = tmp_path_factory.mktemp("rounds")
    cfg = write_config(root / "two.yaml", rounds={"count": 2})
    local, sim, jobs = root / "local", root / "sim", root / "jobs"
    shutil.copytree(reference, local)
    shutil.copytree(simulated[0], sim)
    jobs.mkdir()
    run_study(load_config(cfg), local, show_progress=False)
    simulate(cfg, sim, parallel=1, client_app=make_client_app([functools.partial(job_mod, str(jobs))]))
    return local, sim, jobs


# ----------------------------------------------------------------------------------------------- tests
def test_simulation_equals_single_process_run(reference, simulated):
    run_dir, _ = simulated
    assert_same_fused(reference, run_dir)
    assert scores(reference) == scores(run_dir)
    ran = {json.loads(x)["stage"] for x in (run_dir / "stages.jsonl").read_text().splitlines()}
    assert {"train-science-s0", "train-law-s0"} <= ran
    assert "| base |" in (run_dir / "report.md").read_text()
    assert not results(run_dir)["missing_edges"]


def test_two_rounds_in_simulation_equal_two_rounds_in_one_process(two_rounds):
    local, sim, jobs = two_rounds
    docs = [results(local), results(sim)]
    for doc in docs:
        assert [r["round"] for r in doc["seeds"][0]["rounds"]] == [1, 2]
        assert doc["seeds"][0]["rounds"][0]["sent_back"] == "task_arithmetic"
    for r in (0, 1):  # every round's fused adapter and scores agree
        fa, fb = (load_adapter(d["seeds"][0]["rounds"][r]["fused"][0]["adapter"]) for d in docs)
        assert set(fa.modules) == set(fb.modules) and fa.modules
        for n in fa.modules:
            assert (fa.delta(n) - fb.delta(n)).abs().max().item() <= 1e-6, (r, n)
        ea, eb = (d["seeds"][0]["rounds"][r]["fused"][0]["eval"] for d in docs)
        assert ea["mmlu"]["correct"] == eb["mmlu"]["correct"]
        assert ea["mmlu_cd_k2"]["strict_outcomes"] == eb["mmlu_cd_k2"]["strict_outcomes"]
    # round 2 moved the fused adapter: it is not the round-1 one
    r1, r2 = (load_adapter(docs[1]["seeds"][0]["rounds"][r]["fused"][0]["adapter"]) for r in (0, 1))
    assert max((r1.delta(n) - r2.delta(n)).abs().max().item() for n in r1.modules) > 1e-4
    # only round-2 jobs travelled (round 1 was cached) and each carried its start adapter in pruned shapes
    dumps = [json.loads(p.read_text()) for p in sorted(jobs.glob("job-*.json"))]
    assert sorted((d["edge"], d["round"]) for d in dumps) == [("law", 2), ("science", 2)]
    for d in dumps:
        assert set(d["arrays"]) == {"start"} and set(d["configs"]) == {"job", "start-files"}
        shapes = d["arrays"]["start"]
        assert shapes and all(len(v) == 2 for v in shapes.values())
        q = next(v for k, v in shapes.items() if "layers.0.self_attn.q_proj.lora_B" in k)
        assert q[0] == 32  # half of the tiny model's 64 query rows: the edge's pruned shape, not the full one
    assert "## Accuracy per round" in (sim / "report.md").read_text()


def test_edges_send_only_adapter_tensors_and_manifest(simulated, mmlu):
    from edgefuse.data.mmlu import SplitSpec, select

    _, sent = simulated
    dumps = [json.loads(p.read_text()) for p in sorted(sent.glob("train-*.json"))]
    assert len(dumps) == 2 and not any(d["error"] for d in dumps)
    cfg = load_config(CONFIG)
    spec = SplitSpec(seed=cfg.data.split_seed, public_per_subject=cfg.data.public_per_subject,
                     edge_fraction=cfg.data.edge_fraction)
    grams = set()
    for domains in cfg.edges.values():
        for it in select(mmlu, "edge", domains, None, None, spec.seed, spec):
            words = it.question.split()
            grams |= {" ".join(words[i:i + 8]) for i in range(len(words) - 7)}
    assert len(grams) > 100
    edges_seen = set()
    for d in dumps:
        assert set(d["arrays"]) == {"adapter"} and set(d["configs"]) == {"package"} and not d["metrics"]
        for key, (dtype, shape) in d["arrays"]["adapter"].items():
            assert key.startswith("base_model.model.model.layers.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
            assert dtype == "float32" and len(shape) == 2
        assert set(d["configs"]["package"]) == {"manifest", "adapter_config"}
        text = " ".join(str(v) for v in d["configs"]["package"].values())
        squashed = " ".join(text.split())
        assert not [g for g in grams if g in squashed]
        man = json.loads(d["configs"]["package"]["manifest"])
        assert set(man["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
        edges_seen.add(man["domain"])
    assert edges_seen == {"science", "law"}


def test_parallel_bounds_the_actors_and_every_edge_still_trains(faulty):
    """``parallel``: Ray gets that many edge slots (one actor each), never more than the edges; the faulty run's four
    edges went through two actors (each edge's outcome is in the tests below), and a bound below one is refused."""
    from edgefuse.errors import EdgefuseError
    from edgefuse.federated.simulate import backend_config

    assert [backend_config(4, 1, p)["init_args"]["num_cpus"] for p in (None, 2, 9)] == [4, 2, 4]
    assert backend_config(4, 3, 2)["init_args"]["num_cpus"] == 6
    with pytest.raises(EdgefuseError, match="parallel=0"):
        backend_config(4, 1, 0)
    _, doc = faulty
    assert len(doc["seeds"][0]["edges"]) + len(doc["missing_edges"]) == 4


def test_failing_edge_is_left_out_and_named(faulty):
    run_dir, doc = faulty
    missing = {m["edge"]: m["reason"] for m in doc["missing_edges"]}
    assert set(missing) == {"science", "law", "economics"}
    assert "injected failure during training" in missing["science"]
    assert [e["edge"] for e in doc["seeds"][0]["edges"]] == ["history"]
    report = (run_dir / "report.md").read_text()
    assert "## Missing edges" in report and "| science | 0 | 1 |" in report
    assert doc["seeds"][0]["fused"], "the study went on to fuse the delivered edge"


def test_tampered_package_is_rejected_with_reason(faulty):
    run_dir, doc = faulty
    reason = {m["edge"]: m["reason"] for m in doc["missing_edges"]}["law"]
    assert reason.startswith("package rejected: hash check failed: adapter_model.safetensors"), reason
    assert "| law | 0 | 1 | package rejected" in (run_dir / "report.md").read_text()
    # never stored, never fused: the fusion's inputs are history's recovered adapter alone
    assert not list((run_dir / "stages").glob("train-law-*/package"))
    fuse_stage = json.loads(next((run_dir / "stages").glob("fuse-*/stage.json")).read_text())
    assert [Path(a).parts[0].rsplit("-", 1)[0] for a in fuse_stage["inputs"]["adapters"]] == ["recover-history-s0"]


def test_edge_grams_arrive_intact_and_a_corrupted_upload_is_rejected(faulty):
    """``interference.source: edges`` on Flower: history's Gram matrices, sent with its package, are the base
    model's inputs on its own prompts (independent reference: tests/helpers/grams.py); economics's NaN is rejected
    with one line and nothing of it is kept."""
    from helpers.grams import assert_q_grams_match, edge_sequences, q_proj_grams

    from edgefuse.interference.grams import GramSet
    from edgefuse.models import load_model

    run_dir, doc = faulty
    reason = {m["edge"]: m["reason"] for m in doc["missing_edges"]}["economics"]
    assert reason.startswith("package rejected: Gram matrices: Gram matrix of module ") and \
        reason.endswith("contains NaN or Inf") and "\n" not in reason, reason
    assert not list((run_dir / "stages").glob("train-economics-*/grams"))
    grams = doc["interference"]["grams"]
    assert grams["source"] == "edges" and grams["tokens"] == {"history": 256}
    gs = GramSet(next((run_dir / "stages").glob("grams-s0-*")) / "grams")
    assert gs.domains == ["history"] and gs.manifest.split == "edge"
    model, tok = load_model("tiny-llama")
    seqs = edge_sequences(tok, load_config(run_dir.parent / "four.yaml"), ["history"], 256, 64)
    assert_q_grams_match(gs.domain("history"), q_proj_grams(model, seqs), "history over Flower")


def test_not_enough_edges_is_one_clear_error(reference, tmp_path):
    """With min_edges = 2 and one edge failing, the study stops with the reason instead of fusing one edge."""
    from edgefuse.federated.trainer import FlowerTrainer
    from edgefuse.runner import run_study

    class DeadGrid:  # no SuperNode ever connects
        def get_node_ids(self):
            return []

    run_dir = copy_without_training(reference, tmp_path / "run", ["law"])
    with pytest.raises(EdgefuseError, match=r"only 1 of 2 edges delivered a package, min_edges is 2 \(law: no "
                                            r"SuperNode with this edge name is connected\)"):
        run_study(load_config(CONFIG), run_dir, show_progress=False, trainer=FlowerTrainer(DeadGrid(), wait_nodes=0))


class FakeFederation:
    """SuperNodes in this process behind a Grid's two calls: each node runs the real ClientApp handlers on its node
    config; ``faults[node_id](msg, ctx, handler)`` replaces a node's answer to a training job (None: no reply)."""

    def __init__(self, nodes: dict[int, dict], faults: dict | None = None):
        self.nodes, self.faults = nodes, faults or {}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, msgs, timeout=None):
        from types import SimpleNamespace
        from uuid import uuid4

        from edgefuse.federated.clientapp import handle_identify, handle_train

        replies = []
        for m in msgs:
            m.metadata.__dict__["_message_id"] = uuid4().hex  # as a Grid's push_messages does
            nid = m.metadata.dst_node_id
            ctx = SimpleNamespace(node_config=self.nodes[nid])
            if m.metadata.message_type == "train" and nid in self.faults:
                reply = self.faults[nid](m, ctx, handle_train)
            else:
                reply = (handle_train if m.metadata.message_type == "train" else handle_identify)(m, ctx)
            replies += [reply] if reply is not None else []
        return replies


def _extra_record(msg, ctx, handler):
    from flwr.app import ConfigRecord

    reply = handler(msg, ctx)
    reply.content["debug"] = ConfigRecord({"note": "an edge should not send this"})
    return reply


def _manifest_lists_absent_file(msg, ctx, handler):
    reply = handler(msg, ctx)
    package = reply.content.config_records["package"]
    man = json.loads(package["manifest"])
    man["files"]["tokenizer.json"] = "0" * 64
    package["manifest"] = json.dumps(man)
    return reply


def _vanished(msg, ctx, handler):
    """The node took the job and stopped sending heartbeats: what the SuperLink itself answers for it."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")


def _silent(msg, ctx, handler):
    return None  # no answer at all before the round's timeout


def test_edge_faults_on_flower_each_leave_one_report_line_and_the_study_completes(reference, tmp_path, monkeypatch):
    """One round with five faulty edges and min-edges 1: an extra record in the reply, a manifest listing a file
    the package lacks, two SuperNodes claiming the same edge, a SuperNode the SuperLink reports gone mid-round and
    one that never answers. Each edge is left out with its reason in the report; the study fuses and evaluates the
    one good edge."""
    from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON
    from flwr.supercore.task_identity import TaskIdentity

    from edgefuse.federated.trainer import FlowerTrainer
    from edgefuse.runner import run_study

    for key in ("_run_id", "_node_id", "_task_id"):  # the cloud's messages are made as inside a Flower run
        monkeypatch.setattr(TaskIdentity, key, 1)
    edges = {"science": ["stem"], "law": ["law"], "history": ["history"], "math": ["math"], "physics": ["physics"],
             "chemistry": ["chemistry"]}
    cfg = write_config(tmp_path / "six.yaml", edges=edges)
    run_dir = copy_without_training(reference, tmp_path / "run", ["law"])  # science's package stays cached
    nodes = {20 + i: {"edge": e} for i, e in enumerate(edges)} | {30: {"edge": "math"}}
    grid = FakeFederation(nodes, {21: _extra_record, 22: _manifest_lists_absent_file, 24: _vanished, 25: _silent})
    doc = run_study(load_config(cfg), run_dir, show_progress=False,
                    trainer=FlowerTrainer(grid, min_edges=1, timeout=30, wait_nodes=0))
    want = {"law": "package rejected: reply carries records beyond the package: debug",
            "history": "package rejected: manifest lists tokenizer.json, which the package does not hold",
            "math": "2 SuperNodes claim this edge (node ids 23, 30); give each node a distinct edge= node config",
            "physics": f"edge failed: {NODE_UNAVAILABLE_ERROR_REASON}",
            "chemistry": "no reply within 30 s"}
    assert {m["edge"]: m["reason"] for m in doc["missing_edges"]} == want
    report = (run_dir / "report.md").read_text()
    for edge, reason in want.items():
        assert f"| {edge} | 0 | 1 | {' '.join(reason.split())} |" in report, edge
    assert [e["edge"] for e in doc["seeds"][0]["edges"]] == ["science"]
    fuse_stage = json.loads(next((run_dir / "stages").glob("fuse-*/stage.json")).read_text())
    assert [Path(a).parts[0].rsplit("-", 1)[0] for a in fuse_stage["inputs"]["adapters"]] == ["recover-science-s0"]
    assert doc["seeds"][0]["fused"][0]["eval"]["mmlu"]["correct"]  # the study went on to evaluate
    assert not list((run_dir / "stages").glob("train-*/.upload"))  # rejected uploads are not kept
    assert [p.parent.name.rsplit("-", 1)[0] for p in (run_dir / "stages").glob("train-*/package")] == ["train-science-s0"]


class _IdentityGrid:
    """Two connected SuperNodes that answer "who are you" with these node configs (no training messages)."""

    def __init__(self, configs: dict[int, dict]):
        self.configs = configs

    def get_node_ids(self):
        return list(self.configs)

    def send_and_receive(self, msgs, timeout=None):
        from types import SimpleNamespace

        from edgefuse.federated.records import identity_content

        return [SimpleNamespace(has_error=lambda: False, metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id),
                                content=identity_content(self.configs[m.metadata.dst_node_id]))
                for m in msgs]


def test_device_reported_memory_budget_prunes_that_edge(tmp_path, monkeypatch):
    """A SuperNode started with node config memory-budget-gib=0.1 gets its edge's model pruned to fit that
    budget (the tiny model fits unpruned: ratio 0), the other edge keeps the study's ratio 0.5; the effective
    per-edge pruning is recorded in results.json."""
    from edgefuse.edge.prune import ratio_for_budget
    from edgefuse.federated.trainer import FlowerTrainer
    from edgefuse.models import load_model
    from edgefuse.runner import LocalTrainer, run_study

    class LocalWithBudgets(FlowerTrainer):  # budgets from the (fake) federation, training in this process
        def train(self, st, jobs):
            LocalTrainer().train(st, jobs)

    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):  # the cloud's messages are made as inside a Flower run
        monkeypatch.setattr(TaskIdentity, key, 1)
    grid = _IdentityGrid({11: {"edge": "science", "memory-budget-gib": 0.1}, 12: {"edge": "law"}})
    cfg = load_config(CONFIG)
    doc = run_study(cfg, tmp_path / "run", show_progress=False, trainer=LocalWithBudgets(grid, wait_nodes=0))
    plans = {p.parts[-3].split("-")[1]: json.loads(p.read_text())
             for p in (tmp_path / "run" / "stages").glob("prune-*/pruned/plan.json")}
    model, _ = load_model(cfg.model)
    want, _ = ratio_for_budget(model, "width", 0.1, cfg.training.model_copy(update={"seed": 0}))
    assert plans["science"]["ratio"] == want == 0.0 and plans["science"]["estimate"]["budget_gib"] == 0.1
    assert plans["law"]["ratio"] == 0.5 and plans["law"]["estimate"] is None
    assert doc["config"]["edge_pruning"]["science"]["memory_budget_gib"] == 0.1 and "law" not in doc["config"]["edge_pruning"]
    # a study that sets the edge's pruning itself keeps it; a budget that is not a number is refused
    own = load_config(write_config(tmp_path / "own.yaml", edges={"science": {"domains": ["stem"],
                                                                              "pruning": {"ratio": 0.25}},
                                                                  "law": ["law"]}))
    assert own.with_device_budgets({"science": 0.1, "law": 2.0}).pruning_for("science").ratio == 0.25
    assert own.with_device_budgets({"science": 0.1, "law": 2.0}).pruning_for("law").memory_budget_gib == 2.0
    bad = FlowerTrainer(_IdentityGrid({11: {"edge": "science", "memory-budget-gib": "lots"}}), wait_nodes=0)
    with pytest.raises(EdgefuseError, match=r"edge science \(node 11\) reports memory-budget-gib='lots'"):
        bad.device_budgets(["science", "law"])


# ----------------------------------------------------------------------------------------------- verification
@pytest.fixture(scope="module")
def package(reference):
    pkg = next((reference / "stages").glob("train-science-s0-*/package"))
    pruned = next((reference / "stages").glob("prune-science-s0-*/pruned"))
    return pkg, pruned



def _resave(pkg: Path, dst: Path, edit) -> Path:
    """A consistent package (hashes recomputed) whose tensors were edited: what a dishonest edge could send."""
    from edgefuse.adapters import save_adapter

    ad = load_adapter(pkg)
    edit(ad)
    man = ad.manifest
    return save_adapter(ad, dst, manifest=man, base_model=ad.config.get("base_model_name_or_path"))


def test_records_round_trip_reproduces_the_package_bytes(package, tmp_path):
    from edgefuse.federated.records import content_to_files, package_to_content
    from edgefuse.io import sha256_file

    pkg, pruned = package
    content_to_files(package_to_content(pkg), tmp_path / "got")
    for f in ("adapter_model.safetensors", "adapter_config.json", "edgefuse.json"):
        assert sha256_file(tmp_path / "got" / f) == sha256_file(pkg / f), f
    assert _verify(tmp_path / "got", pruned).domain == "science"


def test_verify_rejects_nan_wrong_shapes_and_wrong_identity(package, tmp_path):
    from edgefuse.federated.verify import PackageRejected

    pkg, pruned = package
    name = min(load_adapter(pkg).modules)

    def nan(ad):
        ad.modules[name].A[0, 0] = float("nan")

    def wide(ad):
        m = ad.modules[name]
        m.A = torch.cat([m.A, m.A[:, :1]], dim=1)

    with pytest.raises(PackageRejected, match="NaN or Inf"):
        _verify(_resave(pkg, tmp_path / "nan", nan), pruned)
    with pytest.raises(PackageRejected, match=rf"module {name} is \d+×\d+ rank 4, the plan gives"):
        _verify(_resave(pkg, tmp_path / "wide", wide), pruned)
    with pytest.raises(PackageRejected, match="base fingerprint is"):
        _verify(pkg, pruned, base_fingerprint="0" * 32)
    with pytest.raises(PackageRejected, match="edge is 'science', expected 'law'"):
        _verify(pkg, pruned, edge="law")
    with pytest.raises(PackageRejected, match="pruned-model fingerprint"):
        _verify(pkg, pruned, pruned_fingerprint="f" * 32)
