"""Pruning: the pruned model must equal an independent reference (the full model with the pruned
rows/columns/layers zeroed), reload identically, shrink by the ratio, and refuse bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.pruning import PROMPTS, masked_reference

from edgefuse.edge import importance as imp
from edgefuse.edge.memory import estimate_training_bytes
from edgefuse.edge.plan import keep_count, load_pruned, plan_hash, save_pruned, validate_plan, width_counts
from edgefuse.edge.prune import base_config, prune_model, ratio_for_budget
from edgefuse.edge.schema import TrainConfig
from edgefuse.errors import EdgefuseError
from edgefuse.models import count_parameters, fingerprint, load_model, tiny_model

pytestmark = pytest.mark.unit

@pytest.fixture(scope="module")
def tiny4():
    return tiny_model(layers=4)


def ids(tok, text):
    return tok(text, add_special_tokens=False, return_tensors="pt").input_ids


@pytest.mark.parametrize("method", ["magnitude", "wanda", "taylor", "random"])
@pytest.mark.parametrize("structure", ["width", "depth"])
def test_pruned_model_equals_masked_full_model(tiny4, method, structure):
    model, tok = tiny4
    res = prune_model(model, tok, method=method, structure=structure, ratio=0.5, calib_prompts=PROMPTS, seed=3)
    validate_plan(res.plan)
    x = ids(tok, PROMPTS[0])
    with torch.no_grad():
        got = res.model(x).logits
        want = masked_reference(model, res.plan)(x).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, model(x).logits, atol=1e-3)  # something was really pruned
    if structure == "width":  # GQA: each kept kv group brings exactly its query heads
        cfg = res.model.config
        assert cfg.num_attention_heads == 2 and cfg.num_key_value_heads == 1 and cfg.intermediate_size == 48
    else:
        assert len(res.plan["kept_layers"]) == 2 == res.model.config.num_hidden_layers


def test_keep_count_rounding_is_as_documented():
    assert keep_count(3, 0.5) == 2  # SmolLM2's KV groups: floor(1.5 + 0.5)
    assert keep_count(1536, 0.5) == 768 and keep_count(1536, 0.25) == 1152
    assert keep_count(30, 0.5) == 15 and keep_count(2, 0.99) == 1 and keep_count(4, 0.0) == 4


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_parameter_count_drops_by_ratio_within_rounding(ratio):
    model, tok = tiny_model(heads=8, kv_heads=4, intermediate=96)
    res = prune_model(model, tok, method="magnitude", ratio=ratio)

    def pruned_params(m):
        return sum(p.numel() for n, p in m.named_parameters() if any(k in n for k in ("_proj",)))

    before, after = pruned_params(model), pruned_params(res.model)
    # hidden 64, 8 heads of 8 in 4 KV groups: a group holds 2 query heads (q, o) and one k, v head
    per_group, per_channel = 2 * (2 * 8 * 64) + 2 * (8 * 64), 3 * 64
    assert before == 2 * (4 * per_group + 96 * per_channel)
    cfg = res.model.config
    assert cfg.num_key_value_heads == keep_count(4, ratio)
    assert cfg.num_attention_heads == 2 * cfg.num_key_value_heads  # GQA stays valid
    assert after == 2 * (cfg.num_key_value_heads * per_group + cfg.intermediate_size * per_channel)
    # the MLP absorbs the KV groups' rounding: the drop is the ratio to within half an MLP channel
    assert abs((1 - after / before) - ratio) <= 0.5 * per_channel / (before / 2) + 1e-9
    assert count_parameters(res.model) < count_parameters(model)


def test_smollm2_widths_at_half_keep_half_of_the_projection_parameters():
    base = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
            "num_key_value_heads": 3, "head_dim": 64}
    kv, channels = width_counts(base, 0.5)
    assert kv == 2  # round half up: 1.5 groups -> 2, a third of the attention pruned ...
    attn, mlp = 2 * 576 * 576 + 2 * 576 * 192, 3 * 576 * 1536
    kept = attn * 2 / 3 + 3 * 576 * channels
    assert channels < 768 and abs(kept / (attn + mlp) - 0.5) <= 0.5 * 3 * 576 / (attn + mlp)  # ... so MLP keeps < half
    assert width_counts(base, 0.0) == (3, 1536)


def test_reload_gives_same_logits_and_plan(tmp_path, tiny4, isolated_cache):
    model, tok = tiny4
    res = prune_model(model, tok, method="wanda", ratio=0.5, calib_prompts=PROMPTS)
    out = save_pruned(res, tok, tmp_path / "pruned")
    x = ids(tok, PROMPTS[1])
    m2, _, plan = load_pruned(out)
    assert plan == res.plan and plan_hash(plan) == plan_hash(res.plan)
    assert plan["base_fingerprint"] == fingerprint(model)
    assert plan["format_version"] == 1 and plan["calibration"]["n_prompts"] == len(PROMPTS)
    assert all(p not in json.dumps(plan) for p in PROMPTS)  # the plan holds no data
    m3, _ = load_model(str(out))
    meta = json.loads((out / "edgefuse_model.json").read_text())
    assert m3.config.name_or_path == meta["name"]
    with torch.no_grad():
        ref = res.model(x).logits
        assert torch.equal(m2(x).logits, ref) and torch.equal(m3(x).logits, ref)


def test_tied_embeddings_survive_pruning_and_reload(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = tiny_model()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    res = prune_model(model, tok, method="magnitude", ratio=0.5)
    assert res.model.lm_head.weight.data_ptr() == res.model.model.embed_tokens.weight.data_ptr()
    m2, _, _ = load_pruned(save_pruned(res, tok, tmp_path / "p"))
    x = ids(tok, PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(m2(x).logits, res.model(x).logits)


def test_wanda_input_norms_and_block_influence_match_dense_reference(tiny4):
    """Hooks with padded batches must equal one unpadded pass per prompt through output_hidden_states."""
    model, tok = tiny4
    stats = imp.collect_stats(model, tok, PROMPTS, inputs=True, influence=True, batch_size=3)
    sq = torch.zeros(64)
    cos, n = torch.zeros(4), 0
    with torch.no_grad():
        for p in PROMPTS:
            hs = model(ids(tok, p), output_hidden_states=True).hidden_states
            sq += (model.model.layers[0].input_layernorm(hs[0])[0] ** 2).sum(0)
            for i in range(3):  # the last entry of hidden_states has the final norm applied
                cos[i] += torch.nn.functional.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1).sum()
            n += hs[0].shape[1]
    assert torch.allclose(stats.in_sq[(0, "q_proj")], sq, rtol=1e-4)
    assert torch.allclose(stats.influence[:3], 1 - cos[:3] / n, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_and_2_4_masks(tiny4, method):
    model, tok = tiny4
    un = prune_model(model, tok, method=method, structure="unstructured", ratio=0.5, calib_prompts=PROMPTS)
    s24 = prune_model(model, tok, method=method, structure="2:4", ratio=0.5, calib_prompts=PROMPTS)
    for res in (un, s24):
        assert res.model.config.intermediate_size == 96  # shapes unchanged: no dense memory saved
        assert all(v == pytest.approx(0.5) for v in res.plan["sparsity"].values())
    w0 = model.model.layers[1].mlp.up_proj.weight
    w = un.model.model.layers[1].mlp.up_proj.weight
    # reference for magnitude: per row, the kept weights are exactly the 32 largest |W| of 64
    if method == "magnitude":
        ref = torch.zeros_like(w0)
        top = w0.abs().topk(32, dim=1).indices
        ref.scatter_(1, top, w0.gather(1, top))
        assert torch.equal(w, ref)
    g = s24.model.model.layers[1].mlp.up_proj.weight.reshape(96, -1, 4)
    assert ((g != 0).sum(-1) <= 2).all()
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, w0)  # the base model is untouched


def test_memory_estimate_counts_the_pruned_weights_and_budget_picks_smallest_fitting_ratio(tiny4):
    model, tok = tiny4
    cfg = TrainConfig(batch=2, seq=32)
    res = prune_model(model, tok, method="magnitude", ratio=0.5)
    dims = {**base_config(res.model)}
    est = estimate_training_bytes(dims, batch=2, seq=32, rank=8, targets=cfg.targets, vocab=model.config.vocab_size, tied=False)
    assert est["weights_bytes"] == 4 * count_parameters(res.model)
    lora = sum(8 * (m.in_features + m.out_features) for n, m in res.model.named_modules() if n.endswith("_proj"))
    assert est["lora_bytes"] == 16 * lora
    budget = 0.5 * (est["total_bytes"] + estimate_training_bytes(base_config(model), batch=2, seq=32, rank=8,
                                                                 targets=cfg.targets, vocab=model.config.vocab_size,
                                                                 tied=False)["total_bytes"]) / 2**30
    r, e = ratio_for_budget(model, "width", budget, cfg)
    assert e["total_bytes"] <= budget * 2**30 and 0 < r <= 0.5
    r2 = prune_model(model, tok, method="magnitude", memory_budget_gib=budget, train_cfg=cfg)
    assert r2.plan["ratio"] == r and r2.estimate["total_bytes"] == e["total_bytes"]
    with pytest.raises(EdgefuseError, match="too small"):
        ratio_for_budget(model, "width", 1e-6, cfg)


@pytest.mark.parametrize("kwargs, msg", [
    ({"ratio": 1.0}, "ratio must lie in"), ({"ratio": -0.1}, "ratio must lie in"),
    ({"ratio": 0.5, "method": "psychic"}, "unknown pruning method"),
    ({"ratio": 0.3, "structure": "2:4"}, "2:4"), ({}, "give a ratio"),
    ({"ratio": 0.5, "method": "wanda"}, "calibration prompts"),
    ({"memory_budget_gib": 1.0, "structure": "unstructured"}, "width or depth"),
])
def test_bad_arguments(tiny4, kwargs, msg):
    model, tok = tiny4
    with pytest.raises(EdgefuseError, match=msg):
        prune_model(model, tok, **kwargs)


def test_tampered_plan_is_refused(tmp_path, tiny4):
    model, tok = tiny4
    out = save_pruned(prune_model(model, tok, ratio=0.5), tok, tmp_path / "p")
    plan = json.loads((out / "plan.json").read_text())
    bad = json.loads(json.dumps(plan))
    bad["layers"]["0"]["heads"] = [0, 2]  # not the query heads of its kv group
    with pytest.raises(EdgefuseError, match="GQA"):
        validate_plan(bad)
    bad = json.loads(json.dumps(plan))
    bad["modules"]["model.layers.0.mlp.up_proj"]["rows"] = [[0, 1]]
    with pytest.raises(EdgefuseError, match="contradict"):
        validate_plan(bad)
    plan["seed"] = 99  # consistent but not the plan the model was pruned with
    (out / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(EdgefuseError, match="plan hash"):
        load_pruned(out)
