"""The study on Flower as real processes: a SuperLink and two SuperNodes on loopback, masked pruning plans and
unstructured studies over Flower, and the retrieval vector an edge sends. Each equals the single-process run.

Apart from tests/test_federated.py (Flower's simulation engine) so that the two run on different test workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers.federation import BIN, CONFIG, ROOT, assert_same_fused, copy_without_training, reference_run, results
from helpers.federation import verify as _verify
from helpers.federation import write_config
from helpers.study import scores

pytest.importorskip("flwr")
pytest.importorskip("ray")

from edgefuse.adapters import load_adapter
from edgefuse.config import load_config
from edgefuse.errors import EdgefuseError

pytestmark = pytest.mark.federated
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


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
    simulate(cfg, tmp_path / "sim", parallel=1)  # concurrent edges: test_federated.py; here the masks
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
