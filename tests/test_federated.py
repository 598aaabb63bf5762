"""The study on Flower: simulation equals the single-process run, real processes on loopback, faults, privacy.

The reference is `run_study` in this process on configs/federated-tiny.yaml (tiny model, 2 edges).
Fault and deployment runs start from a copy of the reference's stage cache with some edges' training
removed, so only those edges are sent to Flower and everything else is reused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.study import scores

pytest.importorskip("flwr")
pytest.importorskip("ray")

from edgefuse.adapters import load_adapter
from edgefuse.config import load_config
from edgefuse.errors import EdgefuseError

pytestmark = pytest.mark.federated

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "federated-tiny.yaml"
BIN = Path(sys.executable).parent
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


# ----------------------------------------------------------------------------------------------- helpers
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
    """Edge 'science' crashes while training; edge 'law' returns a package whose tensor was altered."""
    edge = _job_edge(msg)
    if edge == "science":
        raise RuntimeError("injected failure during training")
    reply = call_next(msg, ctx)
    if edge == "law" and not reply.has_error():
        from flwr.app import Array

        rec = reply.content.array_records["adapter"]
        key = min(rec)
        rec[key] = Array.from_numpy_ndarray(rec[key].numpy() + 1e-3)
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
    from edgefuse.runner import run_study

    run_dir = tmp_path_factory.mktemp("fed") / "reference"
    run_study(load_config(CONFIG), run_dir, show_progress=False)
    return run_dir


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
    """Three edges: 'science' crashes, 'law' is tampered with, 'history' trains normally; min_edges=1."""
    from edgefuse.federated.clientapp import make_client_app
    from edgefuse.federated.simulate import simulate

    root = tmp_path_factory.mktemp("faults")
    cfg = write_config(root / "three.yaml", edges={"science": ["stem"], "law": ["law"], "history": ["history"]})
    run_dir = copy_without_training(reference, root / "run", ["science", "law"])
    doc = simulate(cfg, run_dir, min_edges=1, client_app=make_client_app([fault_mod]))
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
    simulate(cfg, sim, client_app=make_client_app([functools.partial(job_mod, str(jobs))]))
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


def test_failing_edge_is_left_out_and_named(faulty):
    run_dir, doc = faulty
    missing = {m["edge"]: m["reason"] for m in doc["missing_edges"]}
    assert set(missing) == {"science", "law"}
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


def _verify(pkg: Path, pruned: Path, **over):
    from edgefuse.federated.verify import verify_package
    from edgefuse.io import read_json

    meta = read_json(pruned / "edgefuse_model.json")
    kw = {"edge": "science", "plan": read_json(pruned / "plan.json"), "base_fingerprint": meta["base_fingerprint"],
          "pruned_fingerprint": meta["pruned_fingerprint"], "rank": 4,
          "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    kw.update(over)
    return verify_package(pkg, **kw)


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


# ----------------------------------------------------------------------------------------------- deployment
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float) -> None:
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Terminate the processes and every descendant they spawned (SuperExec, ServerApp, ClientApps)."""
    import psutil

    tree = []
    for p in procs:
        try:
            tree += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for q in tree:
        try:
            q.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=10)
    for q in alive:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def federation(tmp_path):
    """A SuperLink and two SuperNodes (edges 'science' and 'law') on 127.0.0.1, insecure; all stopped after."""
    home = tmp_path / "flwr"
    home.mkdir()
    link, rt1, rt2 = free_port(), free_port(), free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[subprocess.Popen] = []
    files = contextlib.ExitStack()
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> None:
        out = files.enter_context(open(logs / f"{name}.log", "w"))  # noqa: SIM115 - open while the process runs
        procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=out, stderr=subprocess.STDOUT, env=env,
                                      cwd=tmp_path))

    try:
        start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
              "--port", str(link))
        wait_port(link, time.time() + 60)
        for name, rt, node_cfg in (("science", rt1, "edge='science'"), ("law", rt2, "edge='law' domains='law'")):
            start(f"supernode-{name}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--port", str(rt), "--node-config", node_cfg)
        yield env, logs, procs
    finally:
        stop_all(procs)
        files.close()


def test_superlink_and_two_supernodes_run_the_study(reference, federation, tmp_path):
    import psutil

    env, logs, procs = federation
    run_dir = copy_without_training(reference, tmp_path / "run", ["science", "law"])
    cmd = [str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream", "--run-config",
           f"config='{CONFIG}' run-dir='{run_dir}' wait-nodes=60 timeout=300"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(p)
    try:
        out, _ = p.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        stop_all([p])
        out = ""
    logs_text = "\n".join(f.read_text()[-1500:] for f in sorted(logs.iterdir()))
    assert (run_dir / "results.json").is_file(), (out or "")[-3000:] + logs_text
    doc = results(run_dir)
    assert not doc["missing_edges"]
    ran = [json.loads(x) for x in (run_dir / "stages.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in ran if r["status"] == "ran" and r["kind"] == "train"} == {"train-science-s0",
                                                                                        "train-law-s0"}
    assert_same_fused(reference, run_dir)
    assert scores(reference) == scores(run_dir)
    assert "| task_arithmetic |" in (run_dir / "report.md").read_text()
    # the processes are still the federation's own; the fixture's teardown stops them and their children
    assert all(psutil.pid_exists(q.pid) for q in procs[:3])


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_masked_plans_travel_as_bit_masks_and_rebuild_exactly(tmp_path, structure):
    from types import SimpleNamespace

    from edgefuse.edge.plan import full_shape, load_pruned, save_pruned
    from edgefuse.edge.prune import prune_model
    from edgefuse.federated.edge import rebuild_pruned
    from edgefuse.federated.records import MASKS_RECORD, content_to_job, content_to_masks, job_to_content
    from edgefuse.federated.trainer import FlowerTrainer
    from edgefuse.models import load_model

    base, tok = load_model("tiny-llama")
    res = prune_model(base, tok, method="magnitude", structure=structure, ratio=0.5)
    cloud = save_pruned(res, tok, tmp_path / "cloud")
    meta = json.loads((cloud / "edgefuse_model.json").read_text())
    job = {"edge": "science", "model": "tiny-llama", "plan": res.plan, "pruned_fingerprint": meta["pruned_fingerprint"]}
    masks = FlowerTrainer.masks(SimpleNamespace(pruned_dir=cloud))
    content = job_to_content(job, None, masks)
    packed = content.array_records[MASKS_RECORD]
    n_weights = sum(m.numel() for m in masks.values())
    assert sum(a.numpy().nbytes for a in packed.values()) == sum((m.numel() + 7) // 8 for m in masks.values())
    assert n_weights > 8 * 1000  # one bit per weight, not a float
    received = content_to_job(content)
    shapes = {n: full_shape(res.plan["base_config"], n.rsplit(".", 1)[-1]) for n in res.plan["modules"]}
    got = content_to_masks(content, shapes)
    assert set(got) == set(masks) and all(torch.equal(got[n], masks[n]) for n in masks)
    for name, m in masks.items():  # the masks prune what the plan says: half the weights (2 of every 4 for 2:4)
        assert abs(1 - m.float().mean().item() - res.plan["sparsity"][name]) <= 1e-6
    edge_dir = rebuild_pruned(received, {}, tmp_path / "edge", got)  # raises if the fingerprint differs
    a, b = load_pruned(cloud)[0].state_dict(), load_pruned(edge_dir)[0].state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(EdgefuseError, match="needs the weight masks"):
        rebuild_pruned(received, {}, tmp_path / "edge2", None)
    bad = dict(got)
    name = sorted(bad)[0]
    bad[name] = bad[name][:, :-1]
    with pytest.raises(EdgefuseError, match=f"mask for {name}"):
        rebuild_pruned(received, {}, tmp_path / "edge3", bad)


def test_unstructured_study_on_flower_equals_single_process_run(tmp_path):
    from edgefuse.federated.simulate import simulate
    from edgefuse.runner import run_study

    cfg = write_config(tmp_path / "unstructured.yaml",
                       pruning={"method": "magnitude", "structure": "unstructured", "ratio": 0.5, "calib": 2})
    run_study(load_config(cfg), tmp_path / "local", show_progress=False)
    simulate(cfg, tmp_path / "sim")
    assert_same_fused(tmp_path / "local", tmp_path / "sim")
    assert scores(tmp_path / "local") == scores(tmp_path / "sim")
    assert results(tmp_path / "sim")["seeds"][0]["edges"][0]["prune"]["ratio"] == 0.5


# ----------------------------------------------------------------------------------------------- retrieval vector
def test_edge_sends_its_retrieval_vector_in_the_manifest_and_the_cloud_pools_it(tmp_path):
    """With retrieval mixtures in the study, the job asks the edge for its adapter's vector: the edge embeds its
    own training examples, the one mean vector travels in the package manifest (no example text), the cloud
    accepts the package, recovery keeps the vector, and the study's pool uses it. Without mixtures, no vector."""
    from types import SimpleNamespace

    import yaml
    from sentence_transformers import SentenceTransformer

    from edgefuse.assets import minilm_dir
    from edgefuse.compose.retrieval import AdapterPool
    from edgefuse.config import StudyConfig
    from edgefuse.data.mmlu import SplitSpec, load_mmlu, select
    from edgefuse.edge.plan import save_pruned
    from edgefuse.edge.prune import prune_model
    from edgefuse.edge.recover import recover
    from edgefuse.federated.edge import run_job
    from edgefuse.federated.records import content_to_files, content_to_job, job_to_content, package_to_content
    from edgefuse.federated.trainer import FlowerTrainer
    from edgefuse.federated.verify import PackageRejected
    from edgefuse.io import read_json
    from edgefuse.models import fingerprint, load_model
    from edgefuse.runner.composition import edge_vector
    from edgefuse.runner.trainers import TrainJob

    raw = yaml.safe_load(CONFIG.read_text())
    cfg = StudyConfig.model_validate({**raw, "compose": {"embedding": {"examples": 6},
                                                         "retrieval_mixture": [{"k": 1}]}})
    base, tok = load_model("tiny-llama")
    cloud = save_pruned(prune_model(base, tok, method="magnitude", structure="width", ratio=0.5), tok, tmp_path / "cloud")
    st = SimpleNamespace(cfg=cfg, base_fingerprint=fingerprint(base), precision=cfg.precision(), embeddings={})
    tjob = TrainJob("science", 0, ["stem"], cloud, cfg.training.model_copy(update={"seed": 0}), tmp_path / "w")
    trainer = object.__new__(FlowerTrainer)  # no grid needed to write a job
    plain = SimpleNamespace(**{**vars(st), "cfg": StudyConfig.model_validate(raw)})
    assert "embedding" not in trainer.job_message(plain, tjob)  # no mixture, nothing asked of the edge
    job = content_to_job(job_to_content(trainer.job_message(st, tjob)))
    assert job["embedding"] == {"examples": 6, "seed": 0}
    package, tmp = run_job(job, {"edge": "science"}, tmp_path / "edge")
    got = tmp_path / "got"
    content_to_files(package_to_content(package), got)  # what the cloud receives
    meta = read_json(cloud / "edgefuse_model.json")
    man = _verify(got, cloud, pruned_fingerprint=meta["pruned_fingerprint"], rank=cfg.training.rank,
                  targets=list(cfg.training.targets))
    rec = man.embedding
    items = select(load_mmlu(), "edge", ["stem"], None, 6, 0, SplitSpec(seed=0))
    texts = ["\n".join([it.question.strip(), *map(str, it.choices)]) for it in items]
    ref = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, normalize_embeddings=True).mean(0)
    assert rec["n_examples"] == 6 and len(rec["vector"]) == 384
    assert max(abs(a - float(b)) for a, b in zip(rec["vector"], ref)) <= 1e-5
    sent = (got / "edgefuse.json").read_text()
    assert not any(it.question.strip()[:40] in sent for it in items)  # the vector, not the examples
    recovered = recover(got, cloud / "plan.json", tmp_path / "recovered")
    assert read_json(recovered / "edgefuse.json")["embedding"] == rec
    edge = {"edge": "science", "adapter": str(recovered), "domains": ["stem"]}
    st.embeddings["science"] = {"vector": [1.0] * 384}  # a study's own embed stage would be overruled
    assert edge_vector(st, edge) == rec
    assert AdapterPool.of([load_adapter(recovered)]).vectors.shape == (1, 384)
    bad = json.loads(sent)
    bad["embedding"]["vector"] = "not numbers"
    (got / "edgefuse.json").write_text(json.dumps(bad))
    with pytest.raises(PackageRejected, match="retrieval embedding is malformed"):
        _verify(got, cloud, pruned_fingerprint=meta["pruned_fingerprint"], rank=cfg.training.rank,
                targets=list(cfg.training.targets))
    if tmp is not None:
        tmp.cleanup()
