"""The aligned family: express every adapter in one shared basis, merge the aligned parts, map back.

Both methods write ΔW_k = L · T_k · R with L and R common to the K adapters and a small task tensor T_k; an
existing element-wise merge (``inner``: TIES by default, any recipe of the element-wise family) then merges
the T_k entry by entry, and ΔW = L · T_merged · R is truncated exactly to the output rank. `merge` is that
shared step; the methods differ only in their alignment:

- KnOTS (Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model merging with SVD to tie the KnOTS", ICLR 2025):
  the joint SVD of the side-by-side updates, [ΔW_1 … ΔW_K] = U Σ [V_1ᵀ … V_Kᵀ], gives every adapter the same
  U and Σ, so L = U Σ, T_k = V_kᵀ and R = I. In factored form: QR of the stacked B's and of each Aᵀ, and a
  (Σr)×(Σr) core SVD; the element-wise work is on n×(Σr) blocks.
- Core Space (Panariello, Marczak, Magistri, Porrello, Twardowski, Bagdanov, Calderara, van de Weijer,
  "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025): with U_B the left singular
  vectors of [B_1 … B_K] and V_A the right singular vectors of [A_1; …; A_K], L = U_B, R = V_Aᵀ and the
  (Σr)×(Σr) core T_k = U_Bᵀ B_k A_k V_A. The projection is lossless (every B_k, A_k lies in those spans), so
  the cost is independent of m×n.

With ``inner='task_arithmetic'`` both give exactly Σ w_k ΔW_k (then truncated). Neither is in PEFT.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from edgefuse.adapters import LoraModule
from edgefuse.fusion import lowrank
from edgefuse.fusion.context import Ctx, present
from edgefuse.fusion.elementwise import merge_stack


class Alignment(NamedTuple):
    """The adapters of one module in a shared basis."""

    tasks: torch.Tensor  # K × … float64 task tensors (zero where an adapter lacks the module)
    rebuild: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # merged T → factors (B, A) of ΔW


def _basis(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of a tall float64 matrix.

    Args:
        X: an m×R matrix.

    Returns:
        Its left singular vectors with non-negligible singular values (> 1e-12·σ_1), via QR then SVD of R.
    """
    Q, R = torch.linalg.qr(X)
    Ur, S, _ = torch.linalg.svd(R, full_matrices=False)
    keep = S > 1e-12 * S[0]
    return Q @ Ur[:, keep]


def joint_svd(items: list[tuple[int, LoraModule]], K: int) -> Alignment:
    """KnOTS' alignment: the V_k of the joint SVD [ΔW_1 … ΔW_K] = U Σ [V_1ᵀ … V_Kᵀ], from the factors.

    Args:
        items: (adapter index, module) of the adapters that have this module.
        K: number of adapters (slots of the task stack).

    Returns:
        Tasks V (K × n × t) and the rebuild V_merged ↦ (U Σ, V_mergedᵀ).
    """
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
    n = items[0][1].A.shape[1]
    V = torch.zeros((K, n, S.shape[0]), dtype=torch.float64, device=Bcat.device)
    start = 0
    for (k, m), Qa in zip(items, Qas):
        w = Qa.shape[1]
        V[k] = Qa @ Vch[:, start : start + w].T
        start += w
    return Alignment(V, lambda merged: ((Qb @ Uc) * S[None, :], merged.T.contiguous()))


def core_basis(items: list[tuple[int, LoraModule]], K: int) -> Alignment:
    """Core Space's alignment: the cores M_k = U_Bᵀ B_k A_k V_A in the spans of all B's and all A's.

    Args:
        items: (adapter index, module) of the adapters that have this module.
        K: number of adapters (slots of the task stack).

    Returns:
        Tasks M (K × p × q) and the rebuild M_merged ↦ (U_B M_merged, V_Aᵀ).
    """
    Ub = _basis(torch.cat([m.B.double() * m.scale for _, m in items], dim=1))
    Va = _basis(torch.cat([m.A.double() for _, m in items], dim=0).T)
    M = torch.zeros((K, Ub.shape[1], Va.shape[1]), dtype=torch.float64, device=Ub.device)
    for k, m in items:
        M[k] = (Ub.T @ (m.B.double() * m.scale)) @ (m.A.double() @ Va)
    return Alignment(M, lambda merged: (Ub @ merged, Va.T.contiguous()))


def merge(
    mods: list[LoraModule | None],
    weights: list[float],
    ctx: Ctx,
    align: Callable[[list[tuple[int, LoraModule]], int], Alignment],
) -> LoraModule:
    """The aligned family's kernel: align, merge the task tensors with ``ctx.recipe``, rebuild, truncate.

    Args:
        mods: the module of each of the K adapters (None where an adapter lacks it).
        weights: one weight per adapter.
        ctx: the inner recipe with its density, gamma, majority and per-adapter random streams; the rank.
        align: `joint_svd` (KnOTS) or `core_basis` (Core Space).

    Returns:
        The merged module at rank ``ctx.rank`` (default: the largest input rank), in the inputs' dtype.
    """
    items = present(mods)
    dtype = items[0][1].A.dtype
    tasks, rebuild = align(items, len(mods))
    merged = merge_stack(
        tasks,
        list(weights),
        ctx.recipe,
        density=ctx.density,
        gamma=ctx.gamma,
        majority=ctx.majority,
        generators=ctx.generators(len(mods)),
        present=[x is not None for x in mods],
    )
    B, A = rebuild(merged)
    out = lowrank.truncate(B, A, ctx.rank or max(m.rank for _, m in items))
    return LoraModule(out.A.to(dtype), out.B.to(dtype), 1.0)
