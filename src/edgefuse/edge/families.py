"""Decoder families the edge layer understands, described as data: projections and what their rows/columns are.

Why one table: pruning, importance scores, recovery, training targets and the memory estimate all ask the
same two questions of a model — which linear projections does a decoder layer have, and which of their
output rows / input columns belong to a query head, a KV group or an MLP channel. A fused projection is
just a projection whose rows are several such segments stacked: Phi-3's ``qkv_proj`` rows are
``[q heads | k heads | v heads]`` and its ``gate_up_proj`` rows ``[gate | up]``. So the pruning, recovery and
scoring code is written once against `Projection` and every family is a row of `FAMILIES`.

Everything else that distinguishes the families acts on sizes width pruning never changes (the hidden size
and ``head_dim``), so the pruned model's config carries it over unchanged: Gemma's sqrt(hidden) embedding
scale, its attention and final-logit soft-capping, its extra pre/post feed-forward and post-attention
norms, the query/key norms of Qwen3 and Gemma 3 (over ``head_dim``), sliding-window layer types (kept
per layer by depth pruning) and ``head_dim`` set independently of hidden / heads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edgefuse.errors import EdgefuseError

# What a row or column range of a projection stands for; only "hidden" is never pruned.
HIDDEN, HEADS, KV, CHANNELS = "hidden", "heads", "kv", "channels"
DEFAULT_FAMILY = "llama"  # plans written before families were recorded are all of this layout


@dataclass(frozen=True)
class Projection:
    """One linear layer of a decoder layer: where it lives and what its rows and columns are made of.

    ``rows`` lists the segments stacked along the output (one for a plain projection, several for a fused
    one); ``cols`` is the single segment along the input. ``roles`` are the Llama projection names whose
    work this one does (``qkv_proj`` does ``q_proj``, ``k_proj`` and ``v_proj``): training targets given in
    either spelling resolve through them, so one target list serves every family.
    """

    name: str
    part: str  # attribute of the decoder layer holding it: "self_attn" or "mlp"
    rows: tuple[str, ...]
    cols: str
    roles: tuple[str, ...]


def _plain(name: str, part: str, rows: str, cols: str) -> Projection:
    return Projection(name, part, (rows,), cols, (name,))


SEPARATE = (
    _plain("q_proj", "self_attn", HEADS, HIDDEN), _plain("k_proj", "self_attn", KV, HIDDEN),
    _plain("v_proj", "self_attn", KV, HIDDEN), _plain("o_proj", "self_attn", HIDDEN, HEADS),
    _plain("gate_proj", "mlp", CHANNELS, HIDDEN), _plain("up_proj", "mlp", CHANNELS, HIDDEN),
    _plain("down_proj", "mlp", HIDDEN, CHANNELS),
)
FUSED = (
    Projection("qkv_proj", "self_attn", (HEADS, KV, KV), HIDDEN, ("q_proj", "k_proj", "v_proj")),
    SEPARATE[3],
    Projection("gate_up_proj", "mlp", (CHANNELS, CHANNELS), HIDDEN, ("gate_proj", "up_proj")),
    SEPARATE[6],
)


@dataclass(frozen=True)
class Family:
    """A transformers ``model_type`` and the projection layout of its decoder layers."""

    model_type: str
    label: str
    projections: tuple[Projection, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.projections)

    def projection(self, name: str) -> Projection:
        for p in self.projections:
            if p.name == name:
                return p
        raise EdgefuseError(f"{self.label} models have no projection {name!r} (they have {', '.join(self.names)})")


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama", SEPARATE), Family("mistral", "Mistral", SEPARATE),
    Family("qwen2", "Qwen2", SEPARATE), Family("qwen3", "Qwen3", SEPARATE),
    Family("gemma2", "Gemma 2", SEPARATE), Family("gemma3_text", "Gemma 3 (text)", SEPARATE),
    Family("phi3", "Phi-3", FUSED),
)}
ROLES = tuple(p.name for p in SEPARATE)  # the seven Llama names: the default training targets, "everything"
ALL_PROJECTIONS = tuple(dict.fromkeys(p.name for f in FAMILIES.values() for p in f.projections))
_PART = {p.name: p.part for f in FAMILIES.values() for p in f.projections}
_ROLES = {p.name: p.roles for f in FAMILIES.values() for p in f.projections}


def supported() -> str:
    """The supported families for error messages: label and model_type."""
    return ", ".join(f"{f.label} ({t})" for t, f in FAMILIES.items())


def family_for(config) -> Family:
    """The family of a transformers config; refuses other architectures naming the ones supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise EdgefuseError(f"model_type {model_type!r} is not supported by pruning, recovery and training; "
                            f"supported families: {supported()}")
    return FAMILIES[model_type]


def base_dims(config) -> dict[str, Any]:
    """What pruning needs of a model's config: its family and the dimensions pruning counts in.

    ``head_dim`` is read, not derived, where the config has it (Gemma's is independent of hidden / heads).
    """
    family = family_for(config)
    return {"num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "family": family.model_type}


def family_of(base: dict[str, Any]) -> Family:
    """The family a plan's ``base_config`` records (older plans, which lack it, were all Llama-layout)."""
    name = base.get("family", DEFAULT_FAMILY)
    if name not in FAMILIES:
        raise EdgefuseError(f"plan family {name!r} is not supported; supported families: {supported()}")
    return FAMILIES[name]


def part_of(proj: str) -> str:
    """``self_attn`` or ``mlp``: projection names mean the same thing in every family."""
    if proj not in _PART:
        raise EdgefuseError(f"unknown projection {proj!r}; known: {', '.join(ALL_PROJECTIONS)}")
    return _PART[proj]


def resolve_targets(family: Family, targets: Iterable[str]) -> list[str]:
    """The family's projections that do the work of ``targets`` (names of any family), in layer order.

    ``q_proj`` on Phi-3 adapts ``qkv_proj`` (PEFT adapts whole linear layers, so a fused projection is
    adapted whole); ``qkv_proj`` on Llama adapts ``q_proj``, ``k_proj`` and ``v_proj``.
    """
    roles = {r for t in targets for r in _ROLES.get(t, ())}
    return [p.name for p in family.projections if roles & set(p.roles)]


def segment_size(base: dict[str, Any], kind: str) -> int:
    """Length of one segment of a projection's rows or columns in a model of these dimensions."""
    hd = base["head_dim"]
    return {HIDDEN: base["hidden_size"], HEADS: base["num_attention_heads"] * hd,
            KV: base["num_key_value_heads"] * hd, CHANNELS: base["intermediate_size"]}[kind]


def segments(base: dict[str, Any], kinds: Iterable[str]) -> list[tuple[str, int, int]]:
    """``(kind, start, size)`` of stacked segments, e.g. ``qkv_proj``'s rows q, k, v at their offsets."""
    out, start = [], 0
    for kind in kinds:
        size = segment_size(base, kind)
        out.append((kind, start, size))
        start += size
    return out


def projection_shape(base: dict[str, Any], proj: Projection) -> tuple[int, int]:
    """(out, in) of a projection in a model of these dimensions."""
    return sum(segment_size(base, k) for k in proj.rows), segment_size(base, proj.cols)
