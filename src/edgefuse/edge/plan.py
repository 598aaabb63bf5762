"""The pruning plan (``plan.json``): what was kept, enough to rebuild the pruned model and to recover.

Why a separate module: pruning writes plans, recovery and training read them, and both must agree
on one interpretation. The source of truth is per layer: ``kept_layers`` (original indices, in
order) and, for each kept layer, its kept ``mlp_channels``, ``kv_heads`` and query ``heads``. Widths
may differ per layer in the format even though the first pruner is uniform. ``modules`` spells the
same information out per projection of the model's family (kept output ``rows`` / input ``cols`` as
``[start, stop)`` runs, ``null`` = all; a fused projection's rows are its segments' kept rows at their
offsets, see `edgefuse.edge.families`) and is checked against the layers on load, so a hand-edited
plan that contradicts itself is refused. ``base_config["family"]`` names the family (absent in older
plans: Llama). The plan holds no data (calibration prompts appear only as a hash).

The pruned model lives here too, since it is a function of the base model and its plan: `apply_plan`
rebuilds it from a config with the plan's (uniform) widths, so it reloads from its directory with plain
transformers; `save_pruned` / `load_pruned` write and read it with ``plan.json`` and ``edgefuse_model.json``
(names in `edgefuse.edge.schema`), checked against each other on load. Choosing what to keep is
`edgefuse.edge.prune`'s job.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgefuse.edge.families import (
    CHANNELS,
    DEFAULT_FAMILY,
    FAMILIES,
    HEADS,
    HIDDEN,
    KV,
    family_of,
    part_of,
    projection_shape,
    segments,
    supported,
)
from edgefuse.edge.importance import decoder_layers, projection, projection_names
from edgefuse.artifacts import PrunedModelMeta, PrunePlan
from edgefuse.edge.schema import MODEL_META, PLAN_FILE
from edgefuse.errors import EdgefuseError
from edgefuse.io import atomic_dir, atomic_write_json, hash_obj, read_json
from edgefuse.models import fingerprint, load_model, unwrap


def keep_count(n: int, ratio: float) -> int:
    """How many of ``n`` groups survive pruning ``ratio`` of them: round half up, at least one.

    E.g. SmolLM2's 3 KV groups at ratio 0.5 keep ``floor(1.5 + 0.5) = 2`` (a third pruned), its
    1536 MLP channels keep 768.
    """
    return max(1, min(n, int((1.0 - ratio) * n + 0.5)))


def width_counts(base: dict[str, Any], ratio: float) -> tuple[int, int]:
    """(KV groups, MLP channels) kept per layer by width pruning at ``ratio``.

    KV groups are few (SmolLM2 has 3), so rounding them alone can miss the ratio by a sixth of the
    attention; the MLP channels absorb that error: they are chosen so that the layer's seven
    projections (or Phi-3's four, fused, holding the same weights) together keep ``1 - ratio`` of their
    parameters, to within one MLP channel. E.g.
    SmolLM2 at 0.5 keeps 2 of 3 KV groups and 683 of 1536 channels (50.0% of the parameters, where
    rounding each part alone, 2 groups and 768 channels, kept 54%). Why: the ratio is what the
    memory budget and the user ask for, so it must be the parameter ratio of what is pruned.
    """
    h, kv, heads = base["hidden_size"], base["num_key_value_heads"], base["num_attention_heads"]
    d, inter = base["head_dim"], base["intermediate_size"]
    kv_keep = keep_count(kv, ratio)
    per_kv = 2 * h * d * (heads // kv) + 2 * h * d  # q and o rows/cols of the group's heads, k and v of the group
    per_channel = 3 * h  # gate and up rows, down column
    target = (1.0 - ratio) * (kv * per_kv + inter * per_channel)
    mlp_keep = int((target - kv_keep * per_kv) / per_channel + 0.5)
    return kv_keep, max(1, min(inter, mlp_keep))


def to_runs(indices: Iterable[int]) -> list[list[int]]:
    """Sorted indices as ``[start, stop)`` runs: compact for the contiguous blocks heads make."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def from_runs(runs: list[list[int]] | None, full: int) -> list[int]:
    if runs is None:
        return list(range(full))
    return [i for a, b in runs for i in range(a, b)]


def plan_hash(plan: dict[str, Any]) -> str:
    """Content hash of a plan (canonical JSON), recorded in every package trained on it."""
    return hash_obj(plan)


def module_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{part_of(proj)}.{proj}"


def full_shape(base: dict[str, Any], proj: str) -> tuple[int, int]:
    """(out, in) of a projection in the unpruned model."""
    return projection_shape(base, family_of(base).projection(proj))


def head_rows(heads: Iterable[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in sorted(heads) for j in range(head_dim)]


def kept_in_segments(base: dict[str, Any], spec: dict, kinds: Iterable[str]) -> list[list[int]] | None:
    """Kept indices along stacked segments (each segment's kept indices at its offset) as runs; None = all."""
    hd = base["head_dim"]
    kept = {HEADS: head_rows(spec["heads"], hd), KV: head_rows(spec["kv_heads"], hd), CHANNELS: spec["mlp_channels"]}
    idx, total = [], 0
    for kind, start, size in segments(base, kinds):
        idx += [start + j for j in (range(size) if kind == HIDDEN else sorted(kept[kind]))]
        total += size
    return None if len(idx) == total else to_runs(idx)


def derive_modules(base: dict[str, Any], kept_layers: list[int], layers: dict[str, dict]) -> dict[str, dict]:
    """Per-projection kept rows/cols (runs, None = all) and names in the pruned model."""
    out: dict[str, dict] = {}
    for new, old in enumerate(kept_layers):
        spec = layers[str(old)]
        for p in family_of(base).projections:
            out[module_name(old, p.name)] = {"pruned_name": module_name(new, p.name),
                                             "rows": kept_in_segments(base, spec, p.rows),
                                             "cols": kept_in_segments(base, spec, (p.cols,))}
    return out


def kept_shape(base: dict[str, Any], entry: dict, proj: str) -> tuple[int, int]:
    o, i = full_shape(base, proj)
    return len(from_runs(entry["rows"], o)), len(from_runs(entry["cols"], i))


def validate_plan(plan: Any, path: str | Path | None = None) -> dict[str, Any]:
    """Check a plan's structure and internal consistency; return it or raise one clear error."""
    where = path or PLAN_FILE
    PrunePlan.parse(plan, where)  # fields, types, kind and version; the checks between fields follow
    base = plan["base_config"]
    try:
        nl, nq, nkv = base["num_hidden_layers"], base["num_attention_heads"], base["num_key_value_heads"]
        ni = base["intermediate_size"]
        if base.get("family", DEFAULT_FAMILY) not in FAMILIES:
            raise EdgefuseError(f"plan is for model family {base['family']!r}; supported families: {supported()}",
                                path=where)
        kept = [int(i) for i in plan["kept_layers"]]
        if not kept or sorted(set(kept)) != kept or kept[0] < 0 or kept[-1] >= nl:
            raise EdgefuseError("kept_layers must be distinct ascending layer indices of the base model", path=where)
        if sorted(plan["layers"], key=int) != [str(i) for i in kept]:
            raise EdgefuseError("layers must have one entry per kept layer", path=where)
        rep = nq // nkv
        for i in kept:
            spec = plan["layers"][str(i)]
            kv, heads, ch = spec["kv_heads"], spec["heads"], spec["mlp_channels"]
            if not kv or any(not 0 <= g < nkv for g in kv) or len(set(kv)) != len(kv):
                raise EdgefuseError(f"layer {i}: invalid kv_heads", path=where)
            if sorted(heads) != [g * rep + j for g in sorted(kv) for j in range(rep)]:
                raise EdgefuseError(f"layer {i}: heads must be exactly the query heads of the kept kv_heads (GQA)",
                                    path=where)
            if not ch or any(not 0 <= c < ni for c in ch) or len(set(ch)) != len(ch):
                raise EdgefuseError(f"layer {i}: invalid mlp_channels", path=where)
        if derive_modules(base, kept, plan["layers"]) != plan["modules"]:
            raise EdgefuseError("modules contradict the per-layer kept heads/channels", path=where)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise EdgefuseError(f"malformed plan ({type(e).__name__}: {e})", path=where) from None
    return plan


def is_uniform(plan: dict[str, Any]) -> bool:
    specs = [plan["layers"][str(i)] for i in plan["kept_layers"]]
    return len({(len(s["heads"]), len(s["kv_heads"]), len(s["mlp_channels"])) for s in specs}) == 1


# --- the pruned model: built from a plan, written and read back with it ---


@dataclass
class PruneResult:
    """A pruned model with its plan (and the memory estimate that chose the ratio, if a budget did)."""

    model: Any
    plan: dict[str, Any]
    estimate: dict[str, Any] | None = None


def is_masked(plan: dict[str, Any]) -> bool:
    """Whether the plan zeroes weights inside unchanged shapes (unstructured / 2:4), which it cannot list."""
    return plan["structure"] in ("unstructured", "2:4") and bool(plan.get("sparsity"))


def weight_masks(pruned_model) -> dict[str, torch.Tensor]:
    """Per projection, which weights a masked pruned model keeps (nonzero). Applying these masks to the
    base model gives the pruned weights exactly (a base weight that was already 0 stays 0 either way)."""
    masks = {}
    for i, layer in enumerate(decoder_layers(unwrap(pruned_model))):
        for p in projection_names(pruned_model):
            masks[module_name(i, p)] = projection(layer, p).weight.detach() != 0
    return masks


def apply_masks(model, plan: dict[str, Any], masks: dict[str, torch.Tensor]):
    """A copy of the base model with the given masks applied: how an edge rebuilds a masked plan's model."""
    lm = copy.deepcopy(unwrap(model))
    lm.__dict__.pop("_edgefuse_fingerprint", None)
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(lm)):
            for p in projection_names(lm):
                w, name = projection(layer, p).weight, module_name(i, p)
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
    out_dir = Path(out_dir)
    h = plan_hash(result.plan)
    name = f"{result.plan.get('base_model') or 'model'}-{result.plan['structure']}-{result.plan['method']}-" \
           f"{result.plan['ratio']:g}-{h[:8]}"
    validate_plan(result.plan, out_dir / PLAN_FILE)
    with atomic_dir(out_dir, overwrite=force) as tmp:
        result.model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / PLAN_FILE, result.plan)
        PrunedModelMeta(name=name, plan_hash=h, base_fingerprint=result.plan["base_fingerprint"],
                        pruned_fingerprint=fingerprint(result.model)).write(tmp / MODEL_META)
    return out_dir


def read_model_meta(directory: str | Path) -> PrunedModelMeta | None:
    """The note beside a pruned model (None for a pruned directory written without one)."""
    path = Path(directory) / MODEL_META
    return PrunedModelMeta.read(path) if path.is_file() else None


def read_plan(path: str | Path) -> dict[str, Any]:
    """The validated plan in ``path`` (a ``plan.json`` or a pruned model directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    return validate_plan(read_json(path), path)


def load_pruned(directory: str | Path, device: str | None = None, dtype: str | None = None):
    """``(model, tokenizer, plan)`` of a pruned directory, checked against its plan and fingerprint (which
    does not depend on ``dtype``: `edgefuse.models.fingerprint`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EdgefuseError("pruned model directory not found", path=directory)
    plan = read_plan(directory)
    meta = read_model_meta(directory)
    if meta is not None and meta.plan_hash != plan_hash(plan):
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
    if meta is not None and meta.pruned_fingerprint != fingerprint(model):
        raise EdgefuseError("model weights differ from those written at pruning time (fingerprint)", path=directory)
    return model, tok, plan


def describe(plan: dict[str, Any], before: int, after: int) -> str:
    """One line on what a plan kept, with the parameter counts before and after (``edgefuse prune`` prints it)."""
    spec = plan["layers"][str(plan["kept_layers"][0])]
    b = plan["base_config"]
    return (f"{plan['structure']} {plan['method']} ratio {plan['ratio']:g}: layers {len(plan['kept_layers'])}/"
            f"{b['num_hidden_layers']}, heads {len(spec['heads'])}/{b['num_attention_heads']}, kv heads "
            f"{len(spec['kv_heads'])}/{b['num_key_value_heads']}, MLP channels {len(spec['mlp_channels'])}/"
            f"{b['intermediate_size']}; parameters {after:,}/{before:,} ({after / before:.1%})")
