"""KnOTS: align the adapters with one joint SVD, then merge their aligned task-specific parts.

Stoica, Ramesh, Hoffman, Beery, Hoffman (et al.), "Model merging with SVD to tie the KnOTS", ICLR 2025.

Concatenating the updates side by side, [ΔW_1 … ΔW_K] = U Σ [V_1ᵀ … V_Kᵀ], gives every adapter the same
output basis U and scales Σ, so ΔW_k = U Σ V_kᵀ. Differences between tasks now live in the V_k, which are
aligned coordinates; an existing merge (``inner``: ties by default, dare_ties, task_arithmetic, …) merges
the V_k element-wise and ΔW = U Σ V_mergedᵀ. All in factored form: QR of the stacked B's and of each Aᵀ, a
(Σr)×(Σr) core SVD, and element-wise work on n×(Σr) blocks only. With ``inner='task_arithmetic'`` the result
is exactly Σ w_k ΔW_k (then truncated). Not in PEFT.
"""

from __future__ import annotations

import torch

from edgefuse.adapters import LoraModule
from edgefuse.fusion import lowrank
from edgefuse.fusion.context import Ctx, present
from edgefuse.fusion.pipeline import inner_recipe, merge_inner


def knots(mods, weights, ctx: Ctx) -> LoraModule:
    """KnOTS alignment + ``inner`` merge of the V_k, truncated to ``rank`` (exact SVD of the factored result)."""
    inner = inner_recipe(ctx, "knots")
    items = present(mods)
    dtype = items[0][1].A.dtype
    Bcat = torch.cat([m.B.double() * m.scale for _, m in items], dim=1)
    Qb, Rb = torch.linalg.qr(Bcat)
    blocks, Qas, start = [], [], 0
    for _, m in items:
        Qa, Ra = torch.linalg.qr(m.A.double().T)  # Aᵀ = Qa Ra
        blocks.append(Rb[:, start : start + m.rank] @ Ra.T)
        Qas.append(Qa)
        start += m.rank
    Uc, S, Vch = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = S > 1e-12 * S[0]
    Uc, S, Vch = Uc[:, keep], S[keep], Vch[keep]
    t = S.shape[0]
    n = items[0][1].A.shape[1]
    V = torch.zeros((len(mods), n, t), dtype=torch.float64, device=Bcat.device)
    start = 0
    for (k, m), Qa in zip(items, Qas):
        w = Qa.shape[1]
        V[k] = Qa @ Vch[:, start : start + w].T
        start += w
    merged = merge_inner(V, weights, inner, ctx, mods)
    B = (Qb @ Uc) * S[None, :]
    rank = ctx.rank or max(m.rank for _, m in items)
    out = lowrank.truncate(B, merged.T.contiguous(), rank)
    return LoraModule(out.A.to(dtype), out.B.to(dtype), 1.0)
