"""Prune the cloud model to fit an edge: structured width/depth, unstructured and 2:4 masks.

The framework is LoRAM's (Zhang et al., "Train Small, Infer Large: Memory-Efficient LoRA Training
for Large Language Models", ICLR 2025): train LoRA on a pruned model, recover it to the full shape.
Structures:
- ``width``: removes ``ratio`` of every layer's projection parameters: whole KV groups, each with
  all the query heads that share it (GQA stays valid), and MLP channels, whose count absorbs the
  rounding of the few KV groups (`plan.width_counts`); the hidden size is never touched (embeddings
  are tied in SmolLM2). Counts round half up, at least one kept (`plan.keep_count`).
- ``depth``: removes ``ratio`` of the decoder layers, lowest block influence first.
- ``unstructured`` / ``2:4``: zero the lowest-scoring weights (per output row; 2 of every 4
  consecutive inputs). Shapes are unchanged, so these save memory *only* with sparse storage or
  sparse kernels, never in the dense float tensors trained here; recovery is the identity.
Only the decoder's projections are pruned, as its family describes them (`edgefuse.edge.families`:
Llama, Mistral, Qwen2/3, Gemma 2/3 text, Phi-3 with its fused ``qkv_proj`` / ``gate_up_proj``). The
pruned model is rebuilt from a config with the new (uniform) widths, so it reloads from its directory
with plain transformers.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgefuse.edge import importance as imp
from edgefuse.edge.families import base_dims, family_of
from edgefuse.edge.memory import GIB, estimate_training_bytes
from edgefuse.edge.plan import (
    METHODS,
    PLAN_FILE,
    PLAN_KIND,
    PLAN_VERSION,
    STRUCTURES,
    derive_modules,
    from_runs,
    full_shape,
    is_uniform,
    keep_count,
    width_counts,
    module_name,
    plan_hash,
    validate_plan,
)
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.scoring import unwrap
from edgefuse.io import atomic_dir, atomic_write_json, hash_obj, read_json

MODEL_META = "edgefuse_model.json"
BUDGET_GRID = [round(0.05 * k, 2) for k in range(20)]  # 0.00 … 0.95


@dataclass
class PruneResult:
    model: Any
    plan: dict[str, Any]
    estimate: dict[str, Any] | None = None


def base_config(model) -> dict[str, Any]:
    """The base model's family and dimensions as a plan records them (refuses unsupported families)."""
    return base_dims(unwrap(model).config)


def pruned_dims(base: dict[str, Any], structure: str, ratio: float) -> dict[str, Any]:
    """Uniform widths after pruning ``ratio`` (what the memory estimate needs before scoring)."""
    d = dict(base)
    if structure == "width":
        kv, channels = width_counts(base, ratio)
        d["num_attention_heads"] = kv * (base["num_attention_heads"] // base["num_key_value_heads"])
        d["num_key_value_heads"] = kv
        d["intermediate_size"] = channels
    elif structure == "depth":
        d["num_hidden_layers"] = keep_count(base["num_hidden_layers"], ratio)
    return d


def estimate_for(model, structure: str, ratio: float, train_cfg) -> dict:
    cfg = unwrap(model).config
    return estimate_training_bytes(
        pruned_dims(base_config(model), structure, ratio), batch=train_cfg.batch, seq=train_cfg.seq,
        rank=train_cfg.rank, targets=list(train_cfg.targets), vocab=cfg.vocab_size,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        grad_checkpointing=bool(getattr(train_cfg, "grad_checkpointing", False)))


def ratio_for_budget(model, structure: str, budget_gib: float, train_cfg) -> tuple[float, dict]:
    """Smallest ratio on a 0.05 grid whose training estimate fits the budget."""
    if structure not in ("width", "depth"):
        raise EdgefuseError(f"--memory-budget needs a structure that shrinks dense tensors (width or depth), "
                            f"not {structure!r}")
    if budget_gib <= 0:
        raise EdgefuseError(f"memory budget must be positive, got {budget_gib} GiB")
    est = None
    for r in BUDGET_GRID:
        est = estimate_for(model, structure, r, train_cfg)
        if est["total_bytes"] <= budget_gib * GIB:
            return r, {**est, "budget_gib": budget_gib, "ratio": r}
    raise EdgefuseError(f"memory budget {budget_gib} GiB is too small: even ratio {BUDGET_GRID[-1]} needs "
                        f"{est['total_gib']:.2f} GiB (batch {train_cfg.batch}, seq {train_cfg.seq})")


def _check_args(method: str, structure: str, ratio: float | None) -> None:
    if method not in METHODS:
        raise EdgefuseError(f"unknown pruning method {method!r}; valid: {', '.join(METHODS)}")
    if structure not in STRUCTURES:
        raise EdgefuseError(f"unknown structure {structure!r}; valid: {', '.join(STRUCTURES)}")
    if ratio is None:
        raise EdgefuseError("give a ratio or a memory budget")
    if not 0.0 <= ratio < 1.0:
        raise EdgefuseError(f"ratio must lie in (0, 1), got {ratio}")
    if structure == "2:4" and ratio not in (0.0, 0.5):
        raise EdgefuseError(f"2:4 sparsity prunes exactly half the weights; ratio {ratio} is not 0.5")


def prune_model(model, tokenizer, *, method: str = "magnitude", structure: str = "width",
                ratio: float | None = None, memory_budget_gib: float | None = None,
                calib_prompts: list[str] | None = None, train_cfg=None, seed: int = 0) -> PruneResult:
    """Score, choose what to keep, and build the pruned model and its plan.

    ``ratio`` 0 is accepted here as the identity plan (the control in tests and benches); the CLI
    asks for (0, 1). With ``memory_budget_gib`` the ratio is chosen by `ratio_for_budget`.
    """
    from edgefuse.edge.train import TrainConfig
    from edgefuse.models import fingerprint

    train_cfg = train_cfg or TrainConfig()
    estimate = None
    if memory_budget_gib is not None:
        if ratio is not None:
            raise EdgefuseError("give either a ratio or a memory budget, not both")
        _check_args(method, structure, 0.0)
        ratio, estimate = ratio_for_budget(model, structure, memory_budget_gib, train_cfg)
    _check_args(method, structure, ratio)
    base = base_config(model)
    fp = fingerprint(unwrap(model))
    stats = None
    if ratio > 0 and imp.needs_calibration(method, structure):
        stats = imp.collect_stats(model, tokenizer, calib_prompts or [], inputs=method == "wanda",
                                  grads=method == "taylor", influence=structure == "depth" and method != "taylor")
    L = base["num_hidden_layers"]
    kept_layers = list(range(L))
    layers = {str(i): {"heads": list(range(base["num_attention_heads"])),
                       "kv_heads": list(range(base["num_key_value_heads"])),
                       "mlp_channels": list(range(base["intermediate_size"]))} for i in range(L)}
    sparsity: dict[str, float] = {}
    pruned = None
    if ratio > 0 and structure == "depth":
        kept_layers = imp.top_k(imp.layer_scores(model, method, stats, seed), keep_count(L, ratio))
        layers = {str(i): layers[str(i)] for i in kept_layers}
    elif ratio > 0 and structure == "width":
        rep = base["num_attention_heads"] // base["num_key_value_heads"]
        groups = imp.group_scores(model, imp.element_scores(model, method, stats, seed))
        n_kv, n_channels = width_counts(base, ratio)
        for i, g in enumerate(groups):
            kv = imp.top_k(g["kv"], n_kv)
            layers[str(i)] = {"heads": [k * rep + j for k in kv for j in range(rep)], "kv_heads": kv,
                              "mlp_channels": imp.top_k(g["mlp"], n_channels)}
    elif ratio > 0:
        pruned, sparsity = _masked_copy(model, imp.element_scores(model, method, stats, seed), structure, ratio)
    plan = {
        "kind": PLAN_KIND, "format_version": PLAN_VERSION,
        "base_model": getattr(unwrap(model).config, "name_or_path", None), "base_fingerprint": fp,
        "base_config": base, "method": method, "structure": structure, "ratio": ratio, "seed": seed,
        "rounding": ("kept = max(1, floor((1 - ratio) * n + 0.5)) per layer for KV groups and layers; MLP channels "
                     "chosen so the layer's projections keep 1 - ratio of their parameters (plan.width_counts)"),
        "calibration": ({"n_prompts": len(calib_prompts), "sha256": hash_obj(list(calib_prompts)), "split": "public"}
                        if stats is not None else None),
        "kept_layers": kept_layers, "layers": layers, "modules": derive_modules(base, kept_layers, layers),
        "sparsity": sparsity or None,
        "note": ("masks zero weights in place: memory is saved only with sparse storage/kernels"
                 if structure in ("unstructured", "2:4") else None),
        "estimate": estimate,
    }
    if pruned is None:
        pruned = apply_plan(model, plan)
    return PruneResult(pruned, plan, estimate)


def _masked_copy(model, scores, structure: str, ratio: float):
    """A copy of the model with the lowest-scoring weights zeroed; returns (model, per-module sparsity)."""
    lm = copy.deepcopy(unwrap(model))
    if "_edgefuse_fingerprint" in lm.__dict__:
        del lm.__dict__["_edgefuse_fingerprint"]
    sparsity = {}
    with torch.no_grad():
        for i, layer in enumerate(imp.decoder_layers(lm)):
            for p in imp.projection_names(lm):
                w = imp.projection(layer, p).weight
                s = scores[(i, p)]
                if structure == "2:4":
                    if w.shape[1] % 4:
                        raise EdgefuseError(f"2:4 needs input widths divisible by 4 ({module_name(i, p)}: {w.shape[1]})")
                    g = s.reshape(w.shape[0], -1, 4)
                    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, dim=-1).indices, True)
                    mask = keep.reshape(w.shape)
                else:
                    n_drop = w.shape[1] - keep_count(w.shape[1], ratio)
                    mask = torch.ones_like(w, dtype=torch.bool)
                    if n_drop:
                        mask.scatter_(1, s.topk(n_drop, dim=1, largest=False).indices, False)
                w.mul_(mask.to(w.dtype))
                sparsity[module_name(i, p)] = round(1.0 - float(mask.float().mean()), 6)
    return lm, sparsity


def is_masked(plan: dict[str, Any]) -> bool:
    """Whether the plan zeroes weights inside unchanged shapes (unstructured / 2:4), which it cannot list."""
    return plan["structure"] in ("unstructured", "2:4") and bool(plan.get("sparsity"))


def weight_masks(pruned_model) -> dict[str, torch.Tensor]:
    """Per projection, which weights a masked pruned model keeps (nonzero). Applying these masks to the
    base model gives the pruned weights exactly (a base weight that was already 0 stays 0 either way)."""
    masks = {}
    for i, layer in enumerate(imp.decoder_layers(unwrap(pruned_model))):
        for p in imp.projection_names(pruned_model):
            masks[module_name(i, p)] = imp.projection(layer, p).weight.detach() != 0
    return masks


def apply_masks(model, plan: dict[str, Any], masks: dict[str, torch.Tensor]):
    """A copy of the base model with the given masks applied: how an edge rebuilds a masked plan's model."""
    lm = copy.deepcopy(unwrap(model))
    lm.__dict__.pop("_edgefuse_fingerprint", None)
    with torch.no_grad():
        for i, layer in enumerate(imp.decoder_layers(lm)):
            for p in imp.projection_names(lm):
                w, name = imp.projection(layer, p).weight, module_name(i, p)
                if name not in masks or masks[name].shape != w.shape:
                    raise EdgefuseError(f"mask for {name} is missing or has the wrong shape "
                                        f"({tuple(masks[name].shape) if name in masks else None} vs {tuple(w.shape)})")
                w.mul_(masks[name].to(device=w.device, dtype=w.dtype))
    return lm


def _check_reloads(cfg) -> None:
    """Refuse a pruned config that transformers would not load back from ``config.json``.

    Why: the pruned model is shipped as a directory; a config whose checks tie other fields to the
    pruned widths (e.g. Phi-3's long-RoPE factors, sized by hidden / heads) must fail here, clearly.
    """
    try:
        type(cfg).from_dict(cfg.to_dict())
    except (ValueError, TypeError, KeyError) as e:
        raise EdgefuseError(f"the pruned {cfg.model_type} config would not reload ({e}); prune with another "
                            "structure or ratio") from None


def apply_plan(model, plan: dict[str, Any]):
    """The pruned model: a fresh model of the pruned config holding the kept slices of the base weights."""
    from transformers import AutoModelForCausalLM

    if not is_uniform(plan):
        raise EdgefuseError("this plan has per-layer widths; a transformers config can only express uniform widths")
    base = plan["base_config"]
    lm = unwrap(model)
    names = family_of(base).names
    remap = {old: new for new, old in enumerate(plan["kept_layers"])}
    pat = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    sd = {}
    for key, t in lm.state_dict().items():
        m = pat.match(key)
        if m is None:
            sd[key] = t
            continue
        old, rest = int(m[1]), m[2]
        if old not in remap:
            continue
        parts = rest.split(".")
        if len(parts) >= 2 and parts[-2] in names:
            entry = plan["modules"][module_name(old, parts[-2])]
            out_f, in_f = full_shape(base, parts[-2])
            if entry["rows"] is not None:
                t = t[torch.tensor(from_runs(entry["rows"], out_f), device=t.device)]
            if entry["cols"] is not None and parts[-1] == "weight":
                t = t[:, torch.tensor(from_runs(entry["cols"], in_f), device=t.device)]
        sd[f"model.layers.{remap[old]}.{rest}"] = t.clone()
    spec = plan["layers"][str(plan["kept_layers"][0])]
    cfg = copy.deepcopy(lm.config)
    cfg.num_hidden_layers = len(plan["kept_layers"])
    cfg.num_attention_heads = len(spec["heads"])
    cfg.num_key_value_heads = len(spec["kv_heads"])
    cfg.intermediate_size = len(spec["mlp_channels"])
    cfg.head_dim = base["head_dim"]
    if isinstance(getattr(cfg, "layer_types", None), list):  # e.g. Gemma's sliding/full attention per layer
        cfg.layer_types = [cfg.layer_types[i] for i in plan["kept_layers"]]
    _check_reloads(cfg)
    new = AutoModelForCausalLM.from_config(cfg, dtype=lm.dtype)  # computed buffers (RoPE) stay float32
    missing, unexpected = new.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise EdgefuseError(f"pruned weights do not fit the pruned config (missing {missing}, unexpected {unexpected})")
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    new.config.name_or_path = f"{getattr(lm.config, 'name_or_path', 'model')}-pruned"
    new.to(next(lm.parameters()).device)
    new.eval()
    return new


def save_pruned(result: PruneResult, tokenizer, out_dir: str | Path, force: bool = True) -> Path:
    """Write the pruned model as an HF directory with ``plan.json`` and ``edgefuse_model.json``."""
    from edgefuse.models import fingerprint

    out_dir = Path(out_dir)
    h = plan_hash(result.plan)
    name = f"{result.plan.get('base_model') or 'model'}-{result.plan['structure']}-{result.plan['method']}-" \
           f"{result.plan['ratio']:g}-{h[:8]}"
    with atomic_dir(out_dir, overwrite=force) as tmp:
        result.model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / PLAN_FILE, result.plan)
        atomic_write_json(tmp / MODEL_META, {"name": name, "plan_hash": h,
                                             "base_fingerprint": result.plan["base_fingerprint"],
                                             "pruned_fingerprint": fingerprint(result.model)})
    return out_dir


def read_plan(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    return validate_plan(read_json(path), path)


def load_pruned(directory: str | Path, device: str | None = None, dtype: str | None = None):
    """``(model, tokenizer, plan)`` of a pruned directory, checked against its plan and fingerprint (which
    does not depend on ``dtype``: `edgefuse.models.fingerprint`)."""
    from edgefuse.models import fingerprint, load_model

    directory = Path(directory)
    if not directory.is_dir():
        raise EdgefuseError("pruned model directory not found", path=directory)
    plan = read_plan(directory)
    meta = read_json(directory / MODEL_META) if (directory / MODEL_META).is_file() else {}
    if meta.get("plan_hash") and meta["plan_hash"] != plan_hash(plan):
        raise EdgefuseError("plan.json was changed after the model was pruned (plan hash differs)", path=directory)
    try:
        model, tok = load_model(str(directory), device=device, dtype=dtype)
    except EdgefuseError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers/safetensors raise many types for broken files
        msg = str(e).splitlines()[0] if str(e) else ""
        raise EdgefuseError(f"cannot load the pruned model ({type(e).__name__}: {msg})", path=directory) from None
    cfg = model.config
    spec = plan["layers"][str(plan["kept_layers"][0])]
    want = (len(plan["kept_layers"]), len(spec["heads"]), len(spec["kv_heads"]), len(spec["mlp_channels"]))
    got = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)
    if want != got:
        raise EdgefuseError(f"model shapes {got} contradict plan.json {want} (layers, heads, kv heads, channels)",
                            path=directory)
    if meta.get("pruned_fingerprint") and meta["pruned_fingerprint"] != fingerprint(model):
        raise EdgefuseError("model weights differ from those written at pruning time (fingerprint)", path=directory)
    return model, tok, plan


def describe(plan: dict[str, Any], before: int, after: int) -> str:
    spec = plan["layers"][str(plan["kept_layers"][0])]
    b = plan["base_config"]
    return (f"{plan['structure']} {plan['method']} ratio {plan['ratio']:g}: layers {len(plan['kept_layers'])}/"
            f"{b['num_hidden_layers']}, heads {len(spec['heads'])}/{b['num_attention_heads']}, kv heads "
            f"{len(spec['kv_heads'])}/{b['num_key_value_heads']}, MLP channels {len(spec['mlp_channels'])}/"
            f"{b['intermediate_size']}; parameters {after:,}/{before:,} ({after / before:.1%})")


def dumps_plan(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=2)
