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
Llama, Mistral, Qwen2/3, Gemma 2/3 text, Phi-3 with its fused ``qkv_proj`` / ``gate_up_proj``).

This module scores (through `edgefuse.edge.importance`) and selects; the plan it returns is turned into
the pruned model, written and read back by `edgefuse.edge.plan` (`apply_plan`, `save_pruned`, `load_pruned`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from edgefuse.edge import importance as imp
from edgefuse.edge.families import base_dims
from edgefuse.edge.memory import GIB, estimate_training_bytes
from edgefuse.edge.plan import PruneResult, apply_plan, derive_modules, keep_count, module_name, width_counts
from edgefuse.artifacts import FORMAT_VERSION, PLAN_KIND
from edgefuse.edge.schema import METHODS, STRUCTURES, TrainConfig
from edgefuse.errors import EdgefuseError
from edgefuse.io import hash_obj
from edgefuse.models import fingerprint, unwrap

BUDGET_GRID = [round(0.05 * k, 2) for k in range(20)]  # 0.00 … 0.95


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


def estimate_for(model, structure: str, ratio: float, train_cfg: TrainConfig) -> dict:
    cfg = unwrap(model).config
    return estimate_training_bytes(
        pruned_dims(base_config(model), structure, ratio), batch=train_cfg.batch, seq=train_cfg.seq,
        rank=train_cfg.rank, targets=list(train_cfg.targets), vocab=cfg.vocab_size,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        grad_checkpointing=bool(getattr(train_cfg, "grad_checkpointing", False)))


def ratio_for_budget(model, structure: str, budget_gib: float, train_cfg: TrainConfig) -> tuple[float, dict]:
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
                calib_prompts: list[str] | None = None, train_cfg: TrainConfig | None = None,
                seed: int = 0) -> PruneResult:
    """Score, choose what to keep, and build the pruned model and its plan.

    ``ratio`` 0 is accepted here as the identity plan (the control in tests and benches); the CLI
    asks for (0, 1). With ``memory_budget_gib`` the ratio is chosen by `ratio_for_budget`.
    """
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
        "kind": PLAN_KIND, "format_version": FORMAT_VERSION,
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
