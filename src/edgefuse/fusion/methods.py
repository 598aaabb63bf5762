"""The classic merging methods as configurations of two shared paths.

- Linear recipes (linear, cat, task arithmetic, svd) are exact in factored form: the weighted sum is the
  concatenation of the factors, and a chosen rank comes from the exact QR-based truncated SVD.
- Element-wise recipes (TIES, DARE, magnitude pruning, breadcrumbs) need ΔW: one module at a time, its K
  dense updates are merged row block by row block by `pipeline.merge_rows` (at most one dense ΔW alive, plus
  small blocks), and the merged ΔW is re-factorised by an exact truncated SVD (`lowrank.dense_truncated_svd`).

Every method takes the modules of the K adapters (None where an adapter lacks the module: a zero update),
their weights and a `Ctx`, and returns one `LoraModule`.
"""

from __future__ import annotations

import torch

from edgefuse.adapters import LoraModule
from edgefuse.fusion import lowrank
from edgefuse.fusion.context import Ctx, present
from edgefuse.fusion.pipeline import RECIPES, FactorRows, Recipe, merge_rows


def _factored_sum(mods, coefs, rank: int | None) -> LoraModule:
    B, A = lowrank.stack([(m, coefs[k]) for k, m in present(mods)])
    if rank is None or rank >= A.shape[0]:
        return LoraModule(A=A, B=B, scale=1.0)
    return lowrank.truncate(B, A, rank)


def linear(mods, weights, ctx: Ctx) -> LoraModule:
    """Weighted average Σ w̄_k ΔW_k with w̄ = w / Σw (model soups: Wortsman et al., "Model soups: averaging
    weights of multiple fine-tuned models improves accuracy without increasing inference time", ICML 2022).

    Exact in factored form (rank Σ r_k, or the exact truncated SVD when ``rank`` is given).
    PEFT's ``linear`` differs: it averages the factors, A = Σ √c_k A_k and B = Σ √c_k B_k (c_k = w_k·scale_k,
    equal ranks required), so ΔW = Σ_k c_k B_k A_k + Σ_{j≠k} √(c_j c_k) B_j A_k. It equals the weighted sum
    only when the cross terms vanish (K = 1, or B_j A_k = 0 for j ≠ k, e.g. adapters on disjoint rank
    slots), and it does not normalise the weights. ``normalize=False`` gives the plain weighted sum.
    """
    total = sum(weights)
    coefs = list(weights)
    if ctx.params.get("normalize", True):
        if abs(total) < 1e-12:
            raise ValueError("linear: weights sum to zero and cannot be normalised (pass normalize=False)")
        coefs = [w / total for w in weights]
    return _factored_sum(mods, coefs, ctx.rank)


def cat(mods, weights, ctx: Ctx) -> LoraModule:
    """Exact weighted sum by concatenating the factors; the rank is Σ r_k (never truncated).

    CAT in Prabhakar et al., "LoRA Soups: Merging LoRAs for Practical Skill Composition Tasks", COLING 2025
    (industry track). Same ΔW as PEFT ``cat`` (which folds weight·scale into A).
    """
    return _factored_sum(mods, list(weights), None)


def task_arithmetic(mods, weights, ctx: Ctx) -> LoraModule:
    """λ·Σ w_k ΔW_k (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023); ``scaling`` = λ.

    Exact in factored form; with ``rank`` the exact truncated SVD of the scaled sum.
    """
    lam = float(ctx.params.get("scaling", 1.0))
    return _factored_sum(mods, [lam * w for w in weights], ctx.rank)


def svd(mods, weights, ctx: Ctx) -> LoraModule:
    """Best rank-r approximation (Eckart & Young, "The approximation of one matrix by another of lower rank",
    Psychometrika 1936) of Σ w_k ΔW_k, the merge used by kohya's sd-scripts and PEFT ``svd``.

    Computed exactly from the stacked factors (`lowrank.truncate`: two (Σr)×(Σr) Gram matrices in float64 and
    their eigendecompositions — the issue asked for QR of the stacked factors; the Gram route gives the same
    truncation to float32 rounding and measured 2.3× faster, BENCHMARKS.md) — never an m×n matrix.
    Same ΔW as PEFT ``svd`` (dense full SVD of the dense sum); the default rank is the largest input rank.
    """
    B, A = lowrank.stack([(m, weights[k]) for k, m in present(mods)])
    return lowrank.truncate(B, A, ctx.rank or max(x.rank for _, x in present(mods)))


def elementwise(mods, weights, ctx: Ctx, recipe: Recipe) -> LoraModule:
    """Merge ONE module's dense updates with the recipe, row block by row block (`pipeline.merge_rows`: never
    the K dense ΔW at once), then re-factorise the merged ΔW to ``ctx.rank`` (exact by default)."""
    items = present(mods)
    merged = merge_rows(
        [FactorRows(m) for _, m in items],
        [weights[k] for k, _ in items],
        recipe,
        density=ctx.density,
        gamma=ctx.gamma,
        majority=ctx.majority,
        generators=[ctx.generator(k) for k, _ in items] if recipe.sparsify == "random" else None,
    )
    rank = ctx.rank or max(x.rank for _, x in items)
    return lowrank.dense_truncated_svd(
        merged, rank, ctx.svd_solver, generator=torch.Generator().manual_seed(ctx.seed)
    )


def ties(mods, weights, ctx: Ctx) -> LoraModule:
    """TIES-Merging (Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging
    Models", NeurIPS 2023): trim each ΔW_k to its top-``density`` magnitudes, elect the sign of largest total
    mass per element (``majority='total'``, or ``'frequency'``), average the agreeing entries, re-factorise.

    = PEFT ``ties_svd`` for equal positive weights (PEFT elects on unweighted tensors). PEFT's plain ``ties``
    applies TIES to the A and B factors separately, which is not TIES on ΔW (products of trimmed factors).
    """
    return elementwise(mods, weights, ctx, RECIPES["ties"])


def dare_linear(mods, weights, ctx: Ctx) -> LoraModule:
    """DARE (Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous Models
    as a Free Lunch", ICML 2024): drop each entry with probability 1−density, rescale by 1/density, weighted sum.

    Unbiased: the mean over seeds is Σ w_k ΔW_k. = PEFT ``dare_linear_svd`` with ``rng='sequential'``.
    """
    return elementwise(mods, weights, ctx, RECIPES["dare_linear"])


def dare_ties(mods, weights, ctx: Ctx) -> LoraModule:
    """DARE's drop-and-rescale followed by TIES' sign election and disjoint mean (Yu et al., ICML 2024).

    = PEFT ``dare_ties_svd`` with ``rng='sequential'`` (same Bernoulli draws when modules are visited in
    PEFT's order) and equal positive weights. PEFT's plain ``dare_ties`` drops entries of the A and B factors
    separately, so its ΔW is a product of two sparsified factors, not DARE on ΔW.
    """
    return elementwise(mods, weights, ctx, RECIPES["dare_ties"])


def magnitude_prune(mods, weights, ctx: Ctx) -> LoraModule:
    """Magnitude pruning of each ΔW_k to ``density`` then the weighted sum (the trim step of TIES without
    election, Yadav et al., NeurIPS 2023; PEFT ``magnitude_prune_svd``)."""
    return elementwise(mods, weights, ctx, RECIPES["magnitude_prune"])


def breadcrumbs(mods, weights, ctx: Ctx) -> LoraModule:
    """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
    Masks", ECCV 2024): per ΔW_k drop the ``gamma`` fraction of largest-magnitude outliers and keep the next
    ``density`` fraction (the small tail is dropped), then the weighted sum. mergekit's parametrisation of the
    paper's two thresholds. Not in PEFT."""
    return elementwise(mods, weights, ctx, RECIPES["breadcrumbs"])


def breadcrumbs_ties(mods, weights, ctx: Ctx) -> LoraModule:
    """Breadcrumbs' outlier-and-tail mask followed by TIES' sign election (mergekit's ``breadcrumbs_ties``;
    Davari & Belilovsky ECCV 2024 + Yadav et al. NeurIPS 2023)."""
    return elementwise(mods, weights, ctx, RECIPES["breadcrumbs_ties"])
