"""RegMean on LoRA factors: the least-squares merge of each linear layer on the domains' inputs.

Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023
(arXiv 2212.09849): per linear layer, the W minimising Σ_i ‖W X_i − W_i X_i‖² is (Σ_i W_i G_i)(Σ_i G_i)⁻¹ with
G_i = X_iᵀX_i, the off-diagonal of each G shrunk, G̃ = α G + (1 − α) diag(G). With a shared base W_0 and
W_i = W_0 + ΔW_i the W_0 term passes through unchanged, so the merged update is (Σ ΔW_i G̃_i)(Σ G̃_i)⁻¹.

On LoRA this is exact and factored: Σ_i B_i (A_i G̃_i) = [B_1 … B_K] [A_1G̃_1; …; A_KG̃_K], so the result is
B = [B_1 … B_K] (m × Σr) and A = [A_iG̃_i]_i (Σ G̃)⁻¹ (Σr × d_in) — only d_in × d_in matrices, never m × n.
Edgefuse's choices: the Grams come from the *base* model on public prompts (the cloud has no fine-tuned models'
activations or edge data); an adapter's weight w_i weighs its domain's regression term (G̃_i → w_i G̃_i, so
equal weights are the paper's method); an adapter lacking a module contributes no update there but its domain's
inputs still count; and when Σ G̃ is singular (no Cholesky factor) a ridge of ``ridge``·mean(diag) is added.
"""

from __future__ import annotations

import torch

from edgefuse.adapters import LoraModule
from edgefuse.fusion import lowrank
from edgefuse.fusion.context import Ctx


def shrink(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G): the paper's reduction of the off-diagonal."""
    out = G * alpha
    out.diagonal().copy_(G.diagonal())
    return out


SINGULAR = 1e-12  # a Cholesky pivot² below this × max(diag S) means Σ G̃ is numerically singular


def cholesky_with_ridge(S: torch.Tensor, ridge: float) -> torch.Tensor:
    """Lower Cholesky factor of S, or of S + ridge·mean(diag S)·I when S is singular: no factor, or a pivot² below
    `SINGULAR`·max(diag S) (a rank-deficient S can factor with pivots of rounding size, and its solve is noise)."""
    L, info = torch.linalg.cholesky_ex(S)
    top = float(S.diagonal().max())
    if int(info) == 0 and float(L.diagonal().min()) ** 2 > SINGULAR * top:
        return L
    lam = ridge * float(S.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(S + lam * torch.eye(S.shape[0], dtype=S.dtype))
    if int(info) != 0 or lam <= 0:
        raise ValueError("regmean: the summed Gram matrices are singular even with the ridge (all-zero inputs?)")
    return L


def regmean(mods: list[LoraModule | None], weights: list[float], ctx: Ctx) -> LoraModule:
    """RegMean of one module from its K factors and ``ctx.grams`` (each adapter's domain Gram, d_in × d_in).

    ``ctx.params``: ``alpha`` (off-diagonal kept), ``ridge``. ``ctx.rank``: truncate exactly (None: Σ r_k).
    """
    if any(w < 0 for w in weights):
        raise ValueError("regmean: weights weigh each domain's regression term and must be ≥ 0")
    alpha, ridge = float(ctx.params["alpha"]), float(ctx.params["ridge"])
    S = None
    updated, AGs = [], []
    for k, (m, G) in enumerate(zip(mods, ctx.grams)):
        if weights[k] == 0:
            continue
        Gt = shrink(G.double(), alpha)
        Gt.mul_(weights[k])
        S = Gt if S is None else S.add_(Gt)
        if m is not None:
            updated.append(m)
            AGs.append(m.A.double() @ Gt)
        del Gt
    if S is None or not updated:
        raise ValueError(f"regmean: no adapter with a positive weight has module {ctx.name}")
    L = cholesky_with_ridge(S, ridge)
    A = torch.cholesky_solve(torch.cat(AGs, dim=0).T, L).T  # (Σr × d) = [A_iG̃_i] S⁻¹ (S symmetric)
    B = torch.empty(updated[0].B.shape[0], A.shape[0])  # [s_1B_1 … s_KB_K] written in place: no m × r temporaries
    col = 0
    for m in updated:
        B[:, col:col + m.rank].copy_(m.B).mul_(m.scale)
        col += m.rank
    if ctx.rank is not None and ctx.rank < A.shape[0]:
        return lowrank.truncate(B, A.float(), ctx.rank)
    return LoraModule(A=A.float().contiguous(), B=B, scale=1.0)
