"""Training and recovery on the tiny model: the loss against a full-logits reference, exact resume,
the package's contents (hashes, fingerprints, no private text), and exact recovery checked against
PEFT's own forward pass on the full model."""

from __future__ import annotations

import json
import re
import shutil
import threading
import warnings

import pytest
import torch
from helpers.pruning import PROMPTS, masked_reference
from peft import PeftModel

from edgefuse.adapters import load_adapter
from edgefuse.data.mmlu import select
from edgefuse.data.prompts import mc_prompt
from edgefuse.edge.batching import Schedule, epoch_batches
from edgefuse.edge.plan import from_runs, full_shape, load_pruned, save_pruned
from edgefuse.edge.prune import prune_model
from edgefuse.edge.recover import recover
from edgefuse.edge.schema import TrainConfig
from edgefuse.edge.train import letter_loss, train_edge
from edgefuse.errors import EdgefuseError
from edgefuse.models import continuation_token_ids, fingerprint, lm_parts, make_batch, tiny_model

pytestmark = pytest.mark.integration

CFG = {"batch": 4, "seq": 48, "lr": 1e-2, "checkpoint_every": 2, "seed": 1}


@pytest.fixture(scope="module")
def items(mmlu):
    return select(mmlu, "edge", domains=["stem"], limit=24, seed=0)


@pytest.fixture(scope="module")
def base():
    return tiny_model(layers=4)


@pytest.fixture(scope="module")
def work(tmp_path_factory, base, items):
    """Width-0.5 and depth-0.5 pruned models, each with a trained package and its recovery."""
    root = tmp_path_factory.mktemp("edge")
    model, tok = base
    out = {}
    for structure in ("width", "depth", "ratio0"):
        ratio = 0.0 if structure == "ratio0" else 0.5
        res = prune_model(model, tok, method="magnitude", structure="width" if structure == "ratio0" else structure,
                          ratio=ratio, calib_prompts=PROMPTS)
        d = save_pruned(res, tok, root / structure / "pruned")
        pkg = train_edge(d, "stem", items, TrainConfig(steps=6, **CFG), root / structure / "pkg",
                         progress=lambda *a, **k: None)
        rec = recover(pkg, d / "plan.json", root / structure / "rec")
        out[structure] = {"pruned": d, "pkg": pkg, "rec": rec, "plan": res.plan}
    return out


def test_letter_loss_equals_full_logits_reference(base, items):
    model, tok = base
    seqs = [tok(mc_prompt(it), add_special_tokens=False).input_ids[-40:] for it in items[:5]]
    letters = continuation_token_ids(tok, [" A", " B", " C", " D"])
    y = torch.tensor([it.answer for it in items[:5]])
    body, head, softcap = lm_parts(model)
    with torch.no_grad():
        got = letter_loss(body, head, softcap, torch.tensor(letters), make_batch(seqs, 0, "right", "cpu"), y)
        ref = torch.stack([torch.log_softmax(model(torch.tensor([s])).logits[0, -1, letters], -1)[a]
                           for s, a in zip(seqs, y)])
    assert got.item() == pytest.approx(-ref.mean().item(), abs=1e-5)


def test_schedule_is_deterministic_covers_each_item_and_buckets_lengths():
    lengths = [(i * 37) % 101 + 5 for i in range(50)]
    ep = epoch_batches(lengths, 4, seed=0, epoch=0, bucket=4)
    assert sorted(i for b in ep for i in b) == list(range(50))
    assert ep == epoch_batches(lengths, 4, seed=0, epoch=0, bucket=4) != epoch_batches(lengths, 4, 0, 1, 4)
    s = Schedule(lengths, 4, 0, 4)
    assert s.step(s.per_epoch, 1)[0] == epoch_batches(lengths, 4, 0, 1, 4)[0]
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in ep)
    unbucketed = epoch_batches(lengths, 4, seed=0, epoch=0, bucket=1)
    pad1 = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in unbucketed)
    assert pad < pad1 / 2


def test_package_manifest_hashes_and_peft_loading(work, base):
    w = work["width"]
    man = json.loads((w["pkg"] / "edgefuse.json").read_text())
    pruned, _, plan = load_pruned(w["pruned"])
    assert man["base_fingerprint"] == fingerprint(base[0]) == plan["base_fingerprint"]
    assert man["pruned_fingerprint"] == fingerprint(pruned) != man["base_fingerprint"]
    assert man["domain"] == "stem" and man["format_version"] == 1 and len(man["stats"]["loss_curve"]) == 6
    assert set(man["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    st = man["stats"]
    assert st["tokens"] == sum(st["step_tokens"]) and st["peak_memory_bytes"] > 0 and st["tokens_per_s"] > 0
    assert not any(p.name.endswith((".ckpt", "state.json")) for p in w["pkg"].iterdir())
    # the package is a PEFT adapter of the pruned model: PEFT's forward equals the factored ΔW
    ad = load_adapter(w["pkg"])
    pm = PeftModel.from_pretrained(pruned, str(w["pkg"]))
    x = torch.randn(3, 64)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    dw = ad.delta("model.layers.0.self_attn.q_proj")
    assert torch.allclose(q(x), q.base_layer(x) + x @ dw.T, atol=1e-5)
    assert dw.abs().max() > 0


def test_tensor_peak_holds_weights_lora_gradients_and_adam_state(work):
    """A lower bound from sizes known without the meter: the pruned weights, and the LoRA weights, their
    gradients and AdamW's two moments (all float32), alive together during the optimizer step."""
    w = work["width"]
    pruned, _, _ = load_pruned(w["pruned"])
    weights = sum(t.numel() * t.element_size() for t in [*pruned.parameters(), *pruned.buffers()])
    lora = sum(4 * (m.A.numel() + m.B.numel()) for m in load_adapter(w["pkg"]).modules.values())
    st = json.loads((w["pkg"] / "edgefuse.json").read_text())["stats"]
    assert st["tensor_peak_bytes"] > weights + 4 * lora  # strictly: the step's activations come on top
    assert 1 <= st["tensor_peak_step"] <= st["steps"]


def test_tensor_peak_is_the_edges_own_when_other_work_shares_the_process(tmp_path, work, items):
    """An edge training while another thread of the process allocates and frees 8 MB tensors reports what the
    same edge reports alone. (Two trainings on threads of one process are not an option: transformers' model
    construction patches process-wide state, so a LoRA built on one thread while another loads lands on the
    meta device; edgefuse trains a process's edges one after another.)"""
    d, cfg = work["width"]["pruned"], TrainConfig(steps=3, **CFG)

    def peak(out):
        return json.loads((out / "edgefuse.json").read_text())["stats"]["tensor_peak_bytes"]

    alone = peak(train_edge(d, "stem", items, cfg, tmp_path / "alone", progress=lambda *a, **k: None))
    stop, held = threading.Event(), []

    def other_work():
        while not stop.is_set():
            held.append(torch.ones(2_000_000))  # 8 MB, far above the edge's 3 MB: any leak would show
            if len(held) > 3:
                held.pop(0)

    noise = threading.Thread(target=other_work)
    noise.start()
    try:
        beside = peak(train_edge(d, "stem", items, cfg, tmp_path / "beside", progress=lambda *a, **k: None))
    finally:
        stop.set()
        noise.join()
    assert held and beside == alone


def test_training_lowers_the_loss(work):
    lc = json.loads((work["ratio0"]["pkg"] / "edgefuse.json").read_text())["stats"]["loss_curve"]
    assert sum(lc[-2:]) / 2 < sum(lc[:2]) / 2


def test_exact_resume(tmp_path, work, items):
    d = work["width"]["pruned"]
    cfg = TrainConfig(steps=4, **CFG)
    full = train_edge(d, "stem", items, cfg, tmp_path / "full", progress=lambda *a, **k: None)
    ckpt = train_edge(d, "stem", items, cfg, tmp_path / "part", progress=lambda *a, **k: None, stop_after=3)
    assert not (tmp_path / "part").exists() and (ckpt / "state.json").is_file()
    part = train_edge(d, "stem", items, cfg, tmp_path / "part", progress=lambda *a, **k: None, resume=True)
    a, b = load_adapter(full), load_adapter(part)
    for n in a.modules:
        assert torch.equal(a.modules[n].A, b.modules[n].A) and torch.equal(a.modules[n].B, b.modules[n].B)
    la = json.loads((full / "edgefuse.json").read_text())["stats"]["loss_curve"]
    assert la == json.loads((part / "edgefuse.json").read_text())["stats"]["loss_curve"]
    with pytest.raises(EdgefuseError, match="differs in: lr"):
        train_edge(d, "stem", items, TrainConfig(steps=4, **{**CFG, "lr": 2e-2}), tmp_path / "part",
                   progress=lambda *a, **k: None, resume=True)
    with pytest.raises(EdgefuseError, match="no checkpoint"):
        train_edge(d, "stem", items, cfg, tmp_path / "never", progress=lambda *a, **k: None, resume=True)
    assert not (tmp_path / "never").exists()


def test_no_8gram_of_training_text_in_the_package(work, items):
    words = [w for it in items for w in re.findall(r"\S+", mc_prompt(it) + " " + " ".join(it.choices))]
    grams = {" ".join(words[i:i + 8]) for i in range(len(words) - 7)}
    for structure in ("width", "depth"):
        for f in work[structure]["pkg"].iterdir():
            text = " ".join(re.findall(r"\S+", f.read_bytes().decode("latin-1")))
            assert not any(g in text for g in grams), f


@pytest.mark.parametrize("structure", ["width", "depth"])
def test_recovered_delta_is_edge_delta_scattered(work, structure):
    w = work[structure]
    edge, rec, plan = load_adapter(w["pkg"]), load_adapter(w["rec"]), w["plan"]
    assert len(rec.modules) == len(edge.modules)
    dropped = set(range(4)) - set(plan["kept_layers"])
    assert not any(f"layers.{i}." in n for n in rec.modules for i in dropped)
    for orig, e in plan["modules"].items():
        proj = orig.rsplit(".", 1)[-1]
        o, i = full_shape(plan["base_config"], proj)
        rows, cols = from_runs(e["rows"], o), from_runs(e["cols"], i)
        full = rec.delta(orig)
        assert full.shape == (o, i)
        small = edge.delta(e["pruned_name"])
        assert (full[rows][:, cols] - small).abs().max() <= 1e-7
        mask = torch.ones(o, i, dtype=torch.bool)
        mask[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = False
        assert full[mask].abs().max() == 0 if mask.any() else True
    man = json.loads((w["rec"] / "edgefuse.json").read_text())
    assert man["recovery"]["dropped_layers"] == sorted(dropped) and man["domain"] == "stem"


def test_ratio0_full_model_with_recovered_adapter_gives_edge_logits(work, base, items):
    w = work["ratio0"]
    model, tok = tiny_model(layers=4)
    pruned, _, _ = load_pruned(w["pruned"])
    x = tok(mc_prompt(items[0]), add_special_tokens=False, return_tensors="pt").input_ids[:, -48:]
    with torch.no_grad():
        edge = PeftModel.from_pretrained(pruned, str(w["pkg"]))(x).logits
        full = PeftModel.from_pretrained(model, str(w["rec"]))(x).logits
    assert (edge - full).abs().max() <= 1e-4


@pytest.mark.parametrize("structure", ["width", "depth"])
def test_recovered_adapter_on_masked_full_model_equals_edge_model(work, base, items, structure):
    """Independent reference for the pruned case: full model with pruned parts zeroed + recovered LoRA
    (plain PEFT) must behave exactly like the pruned model + edge LoRA."""
    w = work[structure]
    pruned, tok, plan = load_pruned(w["pruned"])
    ref = masked_reference(base[0], plan)
    x = tok(mc_prompt(items[1]), add_special_tokens=False, return_tensors="pt").input_ids[:, -48:]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PEFT's "missing adapter keys" for LoRA in dropped layers
        plain = pruned(x).logits  # before PEFT injects the LoRA layers in place
        edge = PeftModel.from_pretrained(pruned, str(w["pkg"]))(x).logits
        full_model = PeftModel.from_pretrained(ref, str(w["rec"]))
        full = full_model(x).logits
    if structure == "depth":
        injected = {n.split(".")[4] for n, _ in full_model.named_modules() if n.endswith("q_proj.lora_A")}
        assert injected == {str(i) for i in plan["kept_layers"]}
    assert (edge - full).abs().max() <= 1e-4
    assert (edge - plain).abs().max() > 1e-3  # the adapter does something


def test_recover_refuses_bad_packages(tmp_path, work, base):
    w = work["width"]
    other, otok = tiny_model(seed=1, layers=4)
    other_plan = save_pruned(prune_model(other, otok, ratio=0.5), otok, tmp_path / "other") / "plan.json"
    with pytest.raises(EdgefuseError, match="trained for base model"):
        recover(w["pkg"], other_plan, tmp_path / "o1")
    with pytest.raises(EdgefuseError, match="another pruning plan"):
        recover(w["pkg"], work["ratio0"]["pruned"] / "plan.json", tmp_path / "o2")
    bad = tmp_path / "corrupt"
    shutil.copytree(w["pkg"], bad)
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-16])
    with pytest.raises(EdgefuseError, match="sha256"):
        recover(bad, w["pruned"] / "plan.json", tmp_path / "o3")
    # re-hash the truncated file: now the safetensors reader itself must refuse it
    man = json.loads((bad / "edgefuse.json").read_text())
    from edgefuse.io import sha256_file

    man["files"]["adapter_model.safetensors"] = sha256_file(f)
    (bad / "edgefuse.json").write_text(json.dumps(man))
    with pytest.raises(EdgefuseError, match="corrupted"):
        recover(bad, w["pruned"] / "plan.json", tmp_path / "o4")
    # a package whose shapes contradict its plan: the depth package declared as the width plan's
    wrong = tmp_path / "wrong"
    shutil.copytree(work["ratio0"]["pkg"], wrong)
    man = json.loads((wrong / "edgefuse.json").read_text())
    from edgefuse.edge.plan import plan_hash

    man["plan_hash"] = plan_hash(w["plan"])
    (wrong / "edgefuse.json").write_text(json.dumps(man))
    with pytest.raises(EdgefuseError, match="shapes contradict the plan"):
        recover(wrong, w["pruned"] / "plan.json", tmp_path / "o5")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


# ------------------------------------------------------------------ next-round start (multi-round studies)
def _random_full_adapter(plan, rank: int, seed: int = 0):
    from edgefuse.adapters import LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for orig in plan["modules"]:
        o, i = full_shape(plan["base_config"], orig.rsplit(".", 1)[-1])
        mods[orig] = LoraModule(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), 0.5)
    return LoraAdapter(mods)


@pytest.mark.parametrize("structure", ["width", "depth"])
def test_projection_is_the_inverse_of_recovery(work, structure):
    from edgefuse.edge.recover import project_adapter, recover_adapter

    w = work[structure]
    plan, edge = w["plan"], load_adapter(w["pkg"])
    back = project_adapter(recover_adapter(edge, plan), plan)
    assert set(back.modules) == set(edge.modules)
    for n, m in edge.modules.items():
        assert torch.equal(back.modules[n].A, m.A) and torch.equal(back.modules[n].B, m.B)
    full = _random_full_adapter(plan, 3)
    small = project_adapter(full, plan)  # dense reference: ΔW restricted to the kept rows and columns
    assert len(small.modules) == len(plan["modules"])
    for orig, e in plan["modules"].items():
        o, i = full_shape(plan["base_config"], orig.rsplit(".", 1)[-1])
        rows, cols = from_runs(e["rows"], o), from_runs(e["cols"], i)
        ref = full.delta(orig)[rows][:, cols]
        assert (small.delta(e["pruned_name"]) - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("init_rank", [2, 4, 9])
def test_start_from_sets_the_best_rank_r_approximation(work, init_rank):
    from peft import LoraConfig, get_peft_model

    from edgefuse.edge.recover import project_adapter
    from edgefuse.edge.train import start_from

    w = work["width"]
    model, _, plan = load_pruned(w["pruned"])
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    init = project_adapter(_random_full_adapter(plan, init_rank, seed=init_rank), plan)
    init.modules = {n: m for n, m in init.modules.items() if n.endswith(("q_proj", "down_proj"))}
    a_before = {n: m.lora_A["default"].weight.detach().clone() for n, m in peft_model.named_modules()
                if hasattr(m, "lora_A") and "default" in m.lora_A}
    info = start_from(peft_model, init, scale=8 / 4)
    lost = total = 0.0
    for name, m in peft_model.named_modules():
        if not (hasattr(m, "lora_A") and "default" in m.lora_A):
            continue
        key = name.removeprefix("base_model.model.")
        A, B = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
        got = 2.0 * (B.double() @ A.double())
        U, S, Vh = torch.linalg.svd(init.delta(key).double(), full_matrices=False)  # dense reference
        ref = (U[:, :4] * S[:4]) @ Vh[:4]
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        lost, total = lost + float((S[4:] ** 2).sum()), total + float((S ** 2).sum())
        if init_rank < 4:  # spare directions keep PEFT's random A (B = 0 there), so they can still learn
            assert torch.equal(A[init_rank:], a_before[name][init_rank:]) and B[:, init_rank:].abs().max() == 0
    assert info["dropped_energy"] == pytest.approx(lost / total, abs=1e-6)
    assert (info["dropped_energy"] > 0) == (init_rank > 4)


def test_training_from_a_start_records_it_and_refuses_foreign_shapes(tmp_path, work, items):
    from edgefuse.adapters import LoraAdapter, save_adapter
    from edgefuse.edge.recover import project_adapter
    from edgefuse.io import sha256_file

    w = work["width"]
    start = project_adapter(load_adapter(w["rec"]), w["plan"])
    sdir = save_adapter(start, tmp_path / "start")
    pkg = train_edge(w["pruned"], "stem", items, TrainConfig(steps=2, **CFG), tmp_path / "pkg",
                     progress=lambda *a, **k: None, init_dir=sdir)
    man = json.loads((pkg / "edgefuse.json").read_text())
    assert man["init"]["sha256"] == sha256_file(sdir / "adapter_model.safetensors")
    assert man["init"]["dropped_energy"] == 0.0  # same rank as the training: taken over exactly
    # the first step's loss is that of the start adapter itself, checked with PEFT loading the first package
    from edgefuse.data.prompts import answer_text
    from edgefuse.edge.batching import encode_items

    model, tok, _ = load_pruned(w["pruned"])
    peft_model = PeftModel.from_pretrained(model, str(w["pkg"]))
    cfg = TrainConfig(steps=2, **CFG)
    seqs = encode_items(tok, items, cfg.seq)
    idx = Schedule([len(x) for x in seqs], cfg.batch, cfg.seed, cfg.bucket).step(0, 1)[0]
    letters = torch.tensor(continuation_token_ids(tok, [answer_text(i) for i in range(4)]))
    with torch.no_grad():
        ref = letter_loss(*lm_parts(peft_model), letters, make_batch([seqs[i] for i in idx], tok.pad_token_id, "right",
                                                                     "cpu"), torch.tensor([items[i].answer for i in idx]))
    assert man["stats"]["loss_curve"][0] == pytest.approx(ref.item(), abs=1e-4)
    wrong = LoraAdapter({n: type(m)(m.A[:, :-1], m.B, m.scale) for n, m in start.modules.items()})
    with pytest.raises(EdgefuseError, match="start adapter module"):
        train_edge(w["pruned"], "stem", items, TrainConfig(steps=1, **CFG), tmp_path / "bad",
                   progress=lambda *a, **k: None, init_dir=save_adapter(wrong, tmp_path / "wrong"))
    assert not (tmp_path / "bad").exists()
