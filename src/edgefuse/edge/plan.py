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
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
from edgefuse.errors import EdgefuseError
from edgefuse.io import hash_obj

PLAN_FILE = "plan.json"
PLAN_VERSION = 1
PLAN_KIND = "edgefuse-prune-plan"
METHODS = ("magnitude", "wanda", "taylor", "random")
STRUCTURES = ("width", "depth", "unstructured", "2:4")


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


_REQUIRED = ("format_version", "base_fingerprint", "method", "structure", "ratio", "base_config", "kept_layers",
             "layers", "modules")


def validate_plan(plan: Any, path: str | Path | None = None) -> dict[str, Any]:
    """Check a plan's structure and internal consistency; return it or raise one clear error."""
    where = path or PLAN_FILE
    if not isinstance(plan, dict) or plan.get("kind", PLAN_KIND) != PLAN_KIND:
        raise EdgefuseError("not an edgefuse pruning plan", path=where)
    missing = [k for k in _REQUIRED if k not in plan]
    if missing:
        raise EdgefuseError(f"plan lacks {', '.join(missing)}", path=where)
    if plan["format_version"] != PLAN_VERSION:
        raise EdgefuseError(f"plan format_version {plan['format_version']} is not supported (expects {PLAN_VERSION})",
                            path=where)
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
