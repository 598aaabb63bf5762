"""Kernels of the factored family: merges that are exact on the LoRA factors, with no dense ΔW.

A weighted sum of LoRA updates is the concatenation of their factors, Σ c_k B_k A_k = [c_1 B_1 … c_K B_K]
[A_1; …; A_K], so linear averaging, CAT and task arithmetic are one kernel (`weighted_sum`) that differ only
in how the coefficients c_k come from the weights (the specs in `fusion.registry` name those configurations);
a chosen rank is the exact truncated SVD of the stacked factors (`lowrank.truncate`).

Every kernel takes the modules of the K adapters (None where an adapter lacks the module: a zero update),
their weights and a `Ctx`, and returns one `LoraModule`.
"""

from __future__ import annotations

from edgefuse.adapters import LoraModule
from edgefuse.fusion import lowrank
from edgefuse.fusion.context import Ctx, present


def coefficients(weights: list[float], normalize: bool = False, scaling: float = 1.0) -> list[float]:
    """The coefficient of each adapter's ΔW in a linear merge.

    Args:
        weights: one weight per adapter.
        normalize: divide by Σ w (a weighted average, as in model soups) instead of a plain weighted sum.
        scaling: task arithmetic's λ, multiplying every coefficient.

    Returns:
        c_k = λ · w_k (/ Σ w when ``normalize``).

    Raises:
        ValueError: ``normalize`` with weights that sum to zero.
    """
    coefs = list(weights)
    if normalize:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise ValueError("linear: weights sum to zero and cannot be normalised (pass normalize=False)")
        coefs = [w / total for w in weights]
    return [scaling * c for c in coefs]


def weighted_sum(mods: list[LoraModule | None], weights: list[float], ctx: Ctx) -> LoraModule:
    """Σ c_k ΔW_k exactly, by concatenating the factors (rank Σ r_k), truncated exactly when ``ctx.rank`` is
    smaller. The kernel of linear averaging (Wortsman et al., ICML 2022), CAT (Prabhakar et al., COLING 2025)
    and task arithmetic (Ilharco et al., ICLR 2023).

    Args:
        mods: the module of each of the K adapters (None where an adapter lacks it).
        weights: one weight per adapter.
        ctx: ``ctx.params`` may hold ``normalize`` and ``scaling`` (see `coefficients`); ``ctx.rank`` the
            output rank (None: keep Σ r_k).

    Returns:
        The merged module, scale 1.
    """
    coefs = coefficients(weights, bool(ctx.params.get("normalize", False)), float(ctx.params.get("scaling", 1.0)))
    B, A = lowrank.stack([(m, coefs[k]) for k, m in present(mods)])
    if ctx.rank is None or ctx.rank >= A.shape[0]:
        return LoraModule(A=A, B=B, scale=1.0)
    return lowrank.truncate(B, A, ctx.rank)


def truncated_sum(mods: list[LoraModule | None], weights: list[float], ctx: Ctx) -> LoraModule:
    """Best rank-r approximation of Σ w_k ΔW_k (Eckart & Young, Psychometrika 1936), always re-factorised.

    Computed from the stacked factors (`lowrank.truncate`: two (Σr)×(Σr) Gram matrices in float64 and their
    eigendecompositions; the same truncation as QR of the stacked factors to float32 rounding, and measured
    2.3× faster, BENCHMARKS.md) — never an m×n matrix.

    Args:
        mods: the module of each of the K adapters (None where an adapter lacks it).
        weights: one weight per adapter.
        ctx: ``ctx.rank`` is r (None: the largest input rank).

    Returns:
        The rank-r module with balanced factors, scale 1.
    """
    B, A = lowrank.stack([(m, weights[k]) for k, m in present(mods)])
    return lowrank.truncate(B, A, ctx.rank or max(x.rank for _, x in present(mods)))
