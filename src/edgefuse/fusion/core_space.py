"""Core Space merging: merge LoRAs in the small space spanned by all their bases.

Panariello, Marczak, Magistri, Porrello, Twardowski, Bagdanov, Calderara, van de Weijer, "Accurate and
Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025.

With U_B the left singular vectors of [B_1 … B_K] and V_A the right singular vectors of [A_1; …; A_K], every
update is exactly ΔW_k = U_B M_k V_Aᵀ with a (Σr)×(Σr) core M_k = U_Bᵀ B_k A_k V_A (the projection is
lossless because every B_k, A_k lies in those spans). Any merge (``inner``: ties by default, dare_ties,
task_arithmetic, …) then runs on the tiny cores, and ΔW = U_B M V_Aᵀ. Linear merges are exact; element-wise
ones act in an aligned basis instead of on raw entries, at a cost independent of m×n. Not in PEFT.
"""

from __future__ import annotations

import torch

from edgefuse.adapters import LoraModule
from edgefuse.fusion import lowrank
from edgefuse.fusion.context import Ctx, present
from edgefuse.fusion.pipeline import inner_recipe, merge_inner


def _basis(X: torch.Tensor) -> torch.Tensor:
    """Left singular vectors of X (tall, float64) with non-negligible singular values, via QR then SVD."""
    Q, R = torch.linalg.qr(X)
    Ur, S, _ = torch.linalg.svd(R, full_matrices=False)
    keep = S > 1e-12 * S[0]
    return Q @ Ur[:, keep]


def core_space(mods, weights, ctx: Ctx) -> LoraModule:
    """Core Space projection, ``inner`` merge of the cores, reconstruction and exact truncation to ``rank``."""
    inner = inner_recipe(ctx, "core_space")
    items = present(mods)
    dtype = items[0][1].A.dtype
    Ub = _basis(torch.cat([m.B.double() * m.scale for _, m in items], dim=1))
    Va = _basis(torch.cat([m.A.double() for _, m in items], dim=0).T)
    M = torch.zeros((len(mods), Ub.shape[1], Va.shape[1]), dtype=torch.float64, device=Ub.device)
    for k, m in items:
        M[k] = (Ub.T @ (m.B.double() * m.scale)) @ (m.A.double() @ Va)
    merged = merge_inner(M, weights, inner, ctx, mods)
    rank = ctx.rank or max(m.rank for _, m in items)
    out = lowrank.truncate(Ub @ merged, Va.T.contiguous(), rank)
    return LoraModule(out.A.to(dtype), out.B.to(dtype), 1.0)
