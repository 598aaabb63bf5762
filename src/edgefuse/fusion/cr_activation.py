"""LoRA-CR on measured interference (strategy ``activation``): find the modules where the fused update is furthest
from some edge *on that edge's own inputs*, and re-solve only those with a data-aware step (RegMean).

Why: the parameter-space score of `fusion.conflict` (the most negative cosine between two adapters' ΔW) is ≈ 0 for
independently trained updates (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, report 0.01–0.06),
so it never fires; yet adapter j still moves domain i's outputs by ΔW_j H_i ≠ 0 (Zhang et al., "Unraveling LoRA
Interference: Orthogonal Subspaces for Robust Model Merging" (OSRM), ACL 2025, arXiv 2505.22934). What a fusion
loses shows on activations, so that is where this strategy measures and acts.

Score of a module, with G_i = H_iᵀH_i the Gram matrix of the module's inputs on domain i's public prompts
(`edgefuse grams`), ΔW_f the base method's fused update and ΔW_i edge i's own update:

    s = max_i ‖(ΔW_f − ΔW_i) H_i‖ / ‖ΔW_i H_i‖    over the edges i with a weight > 0 and a non-zero own output,

the "fused deviation" of `interference.metrics`, computed the same way in factored form (r × r and r × d_in products,
no m × n matrix), on the raw Grams (the figures `edgefuse conflicts --activations` shows). For task arithmetic with
unit weights the i-th term is ‖Σ_{j≠i} ΔW_j H_i‖ / ‖ΔW_i H_i‖, the other adapters' combined interference on domain
i; for other methods it also counts what the method loses on its own (trimming, averaging, a rank cut). Its square,
summed over i, is the objective RegMean minimises (there on the shrunk Grams G̃_i, weighted by w_i), so a high score
marks a module where the data-aware solution has the most to recover. 0 means the fusion reproduces every edge
exactly on its domain; 1, an error as large as the edge's update itself.

Selection, as for the other LoRA-CR strategies: modules with s > ``threshold``, or with ``share`` = q the ⌈q·M⌉ of
the M modules with the highest positive scores (ties by name), a knob independent of the scores' scale, so a sweep
over q traces how much editing buys.

Resolution: a flagged module's fused update is replaced by RegMean's for that module (Jin, Ren, Preotiuc-Pietro,
Cheng, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023, arXiv 2212.09849) — the same
kernel as ``--method regmean`` (`fusion.regmean`), so W = argmin Σ_i w_i ‖(W − ΔW_i) H̃_i‖² exactly on the factors, at
rank Σ r_k like that method, or truncated exactly to ``--rank`` when the caller gives one (a method's own default
rank, such as TIES' largest input rank, is not imposed: it would add an error that has nothing to do with
interference). Its ``alpha`` and ``ridge`` are the regmean method's defaults (`fusion.registry`), or the call's own
when the method is regmean. Every other module keeps the base method's result (the same objects), so ``share`` = 1
is the regmean method whatever the base method, and a sweep over ``share`` runs from the plain method to RegMean.

Stats per module: ``score``, ``deviation`` (per edge), ``flagged``, and for a flagged module ``score_after`` (the
RegMean module's score) and ``changed_params`` = m·n: the whole fused update of that module is replaced. The
totals count the fused adapter's parameters (Σ m·n over its modules), so ``share_changed`` is the share of the fused
model's adapted weights that the strategy rewrote.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from edgefuse.adapters import LoraModule
from edgefuse.fusion import regmean
from edgefuse.fusion.context import Ctx
from edgefuse.interference.metrics import difference_norm2, scaled_factors, norm_ratio, output_products


def module_deviation(mods: list[LoraModule | None], fused: LoraModule, grams: list[torch.Tensor],
                     weights: list[float]) -> tuple[float, list[float | None]]:
    """(score, per-edge deviations) of one module: ‖(ΔW_f − ΔW_i) H_i‖ / ‖ΔW_i H_i‖ per edge i (None for an edge
    with weight ≤ 0, without the module, or with a zero output on its domain), and their maximum (0 if none)."""
    shape = fused.shape
    ffac = scaled_factors(fused, shape)
    dev: list[float | None] = []
    for m, G, w in zip(mods, grams, weights):
        if m is None or w <= 0:
            dev.append(None)
            continue
        e = scaled_factors(m, shape)
        dev.append(norm_ratio(difference_norm2(ffac, e, G), float(output_products([e], G)[0, 0])))
    return max((d for d in dev if d is not None), default=0.0), dev


def select(scores: dict[str, float], threshold: float, share: float | None) -> set[str]:
    """The flagged modules: score > threshold, or the ⌈share·M⌉ highest positive scores (ties by name)."""
    if share is None:
        return {n for n, s in scores.items() if s > threshold}
    ranked = sorted((n for n, s in scores.items() if s > 0), key=lambda n: (-scores[n], n))
    return set(ranked[: math.ceil(share * len(scores))])


def resolve_on_activations(
    mods_of: Callable[[str], list[LoraModule | None]],
    fused: dict[str, LoraModule],
    scored: dict[str, tuple[float, list[float | None]]],
    weights: list[float],
    grams_of: Callable[[str], list[torch.Tensor]],
    ctx_of: Callable[[str], Ctx],
    strategy: str,
    threshold: float,
    share: float | None,
    already_regmean: bool = False,
) -> tuple[dict[str, LoraModule], dict]:
    """Replace the flagged modules of ``fused`` (name → the base method's module) by RegMean's; returns (modules,
    stats). ``scored``: `module_deviation` of every module; ``mods_of(name)``: the K adapters' modules;
    ``grams_of(name)``: the K domains' checked Grams; ``ctx_of(name)``: the RegMean context (params alpha, ridge;
    rank). ``already_regmean``: the base method is RegMean with these settings, so a flagged module is already
    RegMean's; it is kept and counted as unchanged (re-solving would give the same module)."""
    chosen = select({n: s for n, (s, _) in scored.items()}, threshold, share)
    out = dict(fused)
    per_module, total, changed = {}, 0, 0
    for name, module in fused.items():
        size = module.shape[0] * module.shape[1]
        total += size
        score, dev = scored[name]
        entry = {"score": score, "deviation": dev, "flagged": name in chosen, "changed_params": 0}
        if entry["flagged"] and already_regmean:
            entry["score_after"] = score
        elif entry["flagged"]:
            mods, grams = mods_of(name), grams_of(name)
            ctx = ctx_of(name)
            ctx.grams = grams
            new = regmean.regmean(mods, weights, ctx)
            out[name] = new
            entry["score_after"] = module_deviation(mods, new, grams, weights)[0]
            entry["changed_params"] = size
            changed += size
        per_module[name] = entry
    stats = {
        "strategy": strategy,
        "threshold": threshold,
        "share": share,
        "score": "max_i ‖(ΔW_fused − ΔW_i) H_i‖ / ‖ΔW_i H_i‖",
        "modules_total": len(per_module),
        "modules_flagged": len(chosen),
        "params_total": total,
        "params_changed": changed,
        "share_changed": changed / total if total else 0.0,
        "modules": per_module,
    }
    return out, stats
