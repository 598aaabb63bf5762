"""The family matrix: prune → train → recover → fuse → evaluate on a tiny random model of every supported family.

Each family's model is seeded, small (2 layers, hidden 64) and has every feature that family adds switched on
and non-trivial: biases and norm weights are randomised (transformers initialises them to 0 / 1), Gemma soft-
caps final logits (Gemma 2 also attention scores) at values that bite, has a sliding window shorter than the
prompts and a ``head_dim`` unrelated to hidden / heads, Gemma 3 alternates sliding and full layers. References are
independent of the pruning code: the full model with the pruned rows/columns zeroed (written here from the
plan's per-layer lists and each family's layout, not from ``plan.modules``), PEFT's own forward, and dense ΔW.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.families import make_config
from peft import PeftModel

from edgefuse.adapters import load_adapter, save_adapter
from edgefuse.data.mmlu import select
from edgefuse.data.prompts import answer_text, mc_prompt
from edgefuse.edge.families import FAMILIES, family_for, resolve_targets
from edgefuse.edge.memory import estimate_training_bytes
from edgefuse.edge.plan import from_runs, full_shape, load_pruned, save_pruned, validate_plan
from edgefuse.edge.prune import base_config, prune_model
from edgefuse.edge.recover import project_adapter, recover
from edgefuse.edge.schema import TrainConfig
from edgefuse.edge.train import train_edge
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.mmlu import evaluate_mmlu
from edgefuse.fusion import fuse_adapters, merge_into_model
from edgefuse.models import continuation_token_ids, tiny_tokenizer

pytestmark = pytest.mark.integration

PROMPTS = ["Question: what is two plus two? A. one B. two C. three D. four Answer: D",
           "The following are multiple choice questions (with answers) about science.",
           "abc def 0123 (x) = y; z!", "Answer: B"]
TRAIN = {"steps": 2, "batch": 4, "seq": 48, "lr": 1e-2, "checkpoint_every": 0, "seed": 1}
CASES = ["llama", "llama-bias", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


def make_model(case: str, tok):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CASES.index(case))
        model = AutoModelForCausalLM.from_config(make_config(case, tok))
        with torch.no_grad():  # non-trivial biases and norm weights, so that pruning them wrongly shows
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
    model.config.name_or_path = f"tiny-{case}"
    return model.eval()


# ---------------------------------------------------------------- independent reference: the masked full model
def _rows(model):
    """Per projection name: which output-row blocks belong to q heads / kv groups / channels, for this layout.

    Written from transformers' definitions (Phi-3: qkv rows [q | k | v], gate_up rows [gate | up]), not from
    edgefuse's family table."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    nq, nkv, ni = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    heads = lambda off: {("q", h): list(range(off + h * hd, off + (h + 1) * hd)) for h in range(nq)}  # noqa: E731
    kv = lambda off, t: {(t, g): list(range(off + g * hd, off + (g + 1) * hd)) for g in range(nkv)}  # noqa: E731
    if c.model_type == "phi3":
        return hd, {"qkv_proj": {**heads(0), **kv(nq * hd, "k"), **kv(nq * hd + nkv * hd, "v")},
                    "gate_up_proj": {**{("c", i): [i] for i in range(ni)}, **{("c2", i): [ni + i] for i in range(ni)}}}
    return hd, {"q_proj": heads(0), "k_proj": kv(0, "k"), "v_proj": kv(0, "v"),
                "gate_proj": {("c", i): [i] for i in range(ni)}, "up_proj": {("c", i): [i] for i in range(ni)}}


def masked_reference(model, plan):
    """The full model with pruned heads / KV groups / channels zeroed (weights and biases) and dropped layers
    made the identity (their attention and MLP outputs zeroed)."""
    ref = copy.deepcopy(model)
    hd, rows = _rows(ref)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            a, m = layer.self_attn, layer.mlp
            if i not in plan["kept_layers"]:
                for lin in (a.o_proj, m.down_proj):
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()
                continue
            spec = plan["layers"][str(i)]
            dead = {("q", h) for h in range(ref.config.num_attention_heads) if h not in spec["heads"]}
            dead |= {(t, g) for t in "kv" for g in range(ref.config.num_key_value_heads) if g not in spec["kv_heads"]}
            dead |= {(t, c) for t in ("c", "c2") for c in range(ref.config.intermediate_size)
                     if c not in spec["mlp_channels"]}
            for name, blocks in rows.items():
                lin = getattr(a if hasattr(a, name) else m, name)
                for key, idx in blocks.items():
                    if key in dead:
                        lin.weight[idx] = 0
                        if lin.bias is not None:
                            lin.bias[idx] = 0
            for h in range(ref.config.num_attention_heads):
                if ("q", h) in dead:
                    a.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            for c in range(ref.config.intermediate_size):
                if ("c", c) in dead:
                    m.down_proj.weight[:, c] = 0
    return ref


def ids(tok, text):
    return tok(text, add_special_tokens=False, return_tensors="pt").input_ids


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def items(mmlu):
    return select(mmlu, "edge", domains=["stem"], limit=8, seed=0)


@pytest.fixture(scope="module", params=CASES)
def run(request, tok, items, tmp_path_factory):
    """One family's whole loop: width (wanda) and depth (magnitude) plans, an edge trained on each, both
    recovered, and their task-arithmetic fusion saved as a PEFT adapter."""
    case = request.param
    root = tmp_path_factory.mktemp(case)
    model = make_model(case, tok)
    out = {"case": case, "model": model, "root": root}
    for structure, method in (("width", "wanda"), ("depth", "magnitude")):
        res = prune_model(model, tok, method=method, structure=structure, ratio=0.5, calib_prompts=PROMPTS, seed=2)
        d = save_pruned(res, tok, root / structure)
        pkg = train_edge(d, "stem", items, TrainConfig(**TRAIN), root / f"{structure}-pkg", progress=lambda *a, **k: None)
        out[structure] = {"res": res, "dir": d, "pkg": pkg, "rec": recover(pkg, d / "plan.json", root / f"{structure}-rec")}
    fused, _ = fuse_adapters([load_adapter(out[s]["rec"]) for s in ("width", "depth")], "task_arithmetic")
    out["fused"] = save_adapter(fused, root / "fused", base_model=model.config.name_or_path)
    return out


# ---------------------------------------------------------------------------------------------- tests
def test_family_is_recognised(run):
    fam = family_for(run["model"].config)
    assert base_config(run["model"])["family"] == fam.model_type == run["width"]["res"].plan["base_config"]["family"]
    names = {n.rsplit(".", 1)[-1] for n, mod in run["model"].named_modules() if isinstance(mod, torch.nn.Linear)}
    assert set(fam.names) == names - {"lm_head"}  # the family table lists exactly the model's projections


@pytest.mark.parametrize("method", ["magnitude", "wanda", "taylor", "random"])
def test_width_pruned_model_equals_masked_full_model(run, tok, method):
    model = run["model"]
    res = prune_model(model, tok, method=method, structure="width", ratio=0.5, calib_prompts=PROMPTS, seed=3)
    validate_plan(res.plan)
    cfg, base = res.model.config, model.config
    assert (cfg.num_key_value_heads, cfg.num_attention_heads) == (1, 2) and cfg.intermediate_size < 96
    assert cfg.hidden_size == base.hidden_size and base_config(res.model)["head_dim"] == base_config(model)["head_dim"]
    x = ids(tok, PROMPTS[0] + " " + PROMPTS[1])  # longer than the sliding windows
    got, want = logits(res.model, x), logits(masked_reference(model, res.plan), x)
    err = float((got - want).abs().max())
    print(f"\n[width {run['case']} {method}] max |logit error| vs masked full model: {err:.2e}")
    assert err <= 1e-4, err
    assert (got - logits(model, x)).abs().max() > 1e-3  # something was really pruned


def test_depth_unstructured_and_2_4_run_and_plans_round_trip(run, tok):
    model, root = run["model"], run["root"]
    x = ids(tok, PROMPTS[0] + " " + PROMPTS[2])
    depth = run["depth"]["res"]
    assert len(depth.plan["kept_layers"]) == 1 == depth.model.config.num_hidden_layers
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list):  # each kept layer keeps its sliding/full attention type
        assert depth.model.config.layer_types == [types[i] for i in depth.plan["kept_layers"]]
    assert (logits(depth.model, x) - logits(masked_reference(model, depth.plan), x)).abs().max() <= 1e-4
    un = prune_model(model, tok, method="wanda", structure="unstructured", ratio=0.5, calib_prompts=PROMPTS)
    s24 = prune_model(model, tok, method="magnitude", structure="2:4", ratio=0.5)
    for res in (un, s24):
        assert set(res.plan["sparsity"]) == set(res.plan["modules"])
        assert all(v == pytest.approx(0.5) for v in res.plan["sparsity"].values())
    for name in s24.plan["modules"]:
        w = s24.model.get_submodule(name).weight
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    for res, d in ((depth, run["depth"]["dir"]), (un, save_pruned(un, tok, root / "un")),
                   (s24, save_pruned(s24, tok, root / "s24")), (run["width"]["res"], run["width"]["dir"])):
        m2, _, plan = load_pruned(d)
        assert plan == res.plan
        assert torch.equal(logits(m2, x), logits(res.model, x))  # same function after reload (e.g. eager + caps)


def test_recovery_is_exact_and_peft_loads_it_on_the_full_model(run, tok, items):
    fam = family_for(run["model"].config)
    for structure in ("width", "depth"):
        w = run[structure]
        plan, edge, rec = w["res"].plan, load_adapter(w["pkg"]), load_adapter(w["rec"])
        assert set(rec.target_modules) == set(fam.names)  # PEFT's names of this family's projections
        assert json.loads((w["rec"] / "adapter_config.json").read_text())["target_modules"] == sorted(fam.names)
        assert len(rec.modules) == len(edge.modules) == len(plan["modules"])
        for orig, e in plan["modules"].items():
            o, i = full_shape(plan["base_config"], orig.rsplit(".", 1)[-1])
            rows, cols = from_runs(e["rows"], o), from_runs(e["cols"], i)
            full, small = rec.delta(orig), edge.delta(e["pruned_name"])
            assert full.shape == (o, i) == tuple(run["model"].get_submodule(orig).weight.shape)
            assert (full[rows][:, cols] - small).abs().max() <= 1e-7 and small.abs().max() > 0
            outside = torch.ones(o, i, dtype=torch.bool)
            outside[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = False
            assert not outside.any() or full[outside].abs().max() == 0
        back = project_adapter(rec, plan)
        assert all(torch.equal(back.modules[n].A, m.A) and torch.equal(back.modules[n].B, m.B)
                   for n, m in edge.modules.items())
        # the edge model with its adapter == the masked full model with the recovered adapter, both through PEFT
        pruned, _, _ = load_pruned(w["dir"])
        x = ids(tok, mc_prompt(items[0]))[:, -40:]
        edge_out = logits(PeftModel.from_pretrained(pruned, str(w["pkg"])), x)
        full_out = logits(PeftModel.from_pretrained(masked_reference(run["model"], plan), str(w["rec"])), x)
        assert (edge_out - full_out).abs().max() <= 1e-4
        # the memory estimate counts the LoRA PEFT really trained (fused projections: one LoRA each)
        dims = base_config(pruned)
        est = estimate_training_bytes(dims, batch=4, seq=48, rank=8, targets=TrainConfig().targets, vocab=len(tok),
                                      tied=False)
        assert est["lora_bytes"] == 16 * sum(m.A.numel() + m.B.numel() for m in edge.modules.values())


def test_fused_adapter_applies_with_peft_and_evaluates(run, tok, items):
    model = run["model"]
    x = ids(tok, mc_prompt(items[1]))[:, -40:]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(run["fused"]))
    merged = merge_into_model(copy.deepcopy(model), load_adapter(run["fused"]))  # dense reference
    got = logits(peft_model, x)
    assert (got - logits(merged, x)).abs().max() <= 1e-4
    assert (got - logits(model, x)).abs().max() > 1e-3  # the fused update does something
    res = evaluate_mmlu(peft_model, tok, items[:4], batch_size=4)
    letters = continuation_token_ids(tok, [answer_text(i) for i in range(4)])
    for it, row in zip(items[:4], res["items"]):  # batched, padded scoring vs one plain forward per prompt
        ref = torch.log_softmax(logits(peft_model, ids(tok, mc_prompt(it)))[0, -1].float(), -1)[letters]
        assert torch.allclose(torch.tensor(row["scores"]), ref, atol=1e-4)


def test_targets_resolve_per_family():
    phi3, llama = FAMILIES["phi3"], FAMILIES["llama"]
    assert resolve_targets(phi3, TrainConfig().targets) == list(phi3.names)
    assert resolve_targets(phi3, ["q_proj", "down_proj"]) == ["qkv_proj", "down_proj"]
    assert resolve_targets(llama, ["qkv_proj", "gate_up_proj"]) == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    assert TrainConfig(targets=["gate_up_proj", "qkv_proj"]).targets == ["qkv_proj", "gate_up_proj"]
    with pytest.raises(ValueError, match="targets must be among"):
        TrainConfig(targets=["c_attn"])


def test_unsupported_family_names_the_supported_ones(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(EdgefuseError, match="gpt2") as e:
        prune_model(model, tok, ratio=0.5)
    for label in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma 2", "Gemma 3 (text)", "Phi-3"):
        assert label in str(e.value)


def test_plan_of_an_unknown_family_is_refused(run):
    plan = json.loads(json.dumps(run["width"]["res"].plan))
    plan["base_config"]["family"] = "gpt2"
    with pytest.raises(EdgefuseError, match="family 'gpt2'.*Phi-3"):
        validate_plan(plan)
    del plan["base_config"]["family"]  # plans written before families were recorded: Llama layout
    if run["case"] in ("llama", "llama-bias"):
        validate_plan(plan)


def test_a_pruned_config_transformers_would_not_reload_is_refused(tok):
    """Phi-3's long-RoPE check sizes its factors by hidden / heads, which width pruning changes: one clear error."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                     original_max_position_embeddings=64,
                     max_position_embeddings=256, rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                                                "long_factor": [2.0] * 8})
    model = Phi3ForCausalLM(cfg).eval()
    with pytest.raises(EdgefuseError, match="pruned phi3 config would not reload"):
        prune_model(model, tok, ratio=0.5)
    assert prune_model(model, tok, structure="depth", ratio=0.0).model.config.num_attention_heads == 4
