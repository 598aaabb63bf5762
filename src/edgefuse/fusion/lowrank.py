"""Factored LoRA algebra: exact sums, inner products and truncated SVDs without m×n matrices.

Why: a sum of K LoRA updates Σ c_k B_k A_k is itself a low-rank product [c_1 B_1 … c_K B_K]·[A_1; …; A_K]
of rank R = Σ r_k. Its exact SVD follows from thin QRs of the stacked factors (m×R and n×R) and the SVD
of an R×R core, costing O((m+n)R² + R³) instead of O(mn·min(m,n)). Dense ΔW appears only in the
element-wise methods, one module at a time, re-factorised by `dense_truncated_svd`.
"""

from __future__ import annotations

import torch

from edgefuse.adapters import LoraModule


def stack(terms: list[tuple[LoraModule, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``coef·scale·B`` column-wise and ``A`` row-wise: B_cat @ A_cat = Σ coef·ΔW (exact)."""
    Bs = [m.B * (c * m.scale) for m, c in terms]
    As = [m.A for m, _ in terms]
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def factored_svd(B: torch.Tensor, A: torch.Tensor, tol: float = 0.0):
    """Exact thin SVD of B @ A via QR(B), QR(Aᵀ) and the SVD of the small core (float64 inside).

    Returns U (m×q), S (q), Vh (q×n) with q ≤ rank; singular values ≤ tol·S_max are dropped.
    """
    dtype = B.dtype
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    if tol > 0 and S.numel():
        keep = S > tol * S[0]
        Uc, S, Vch = Uc[:, keep], S[keep], Vch[keep]
    return (Qb @ Uc).to(dtype), S.to(dtype), (Vch @ Qa.T).to(dtype)


def from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int | None) -> LoraModule:
    """Balanced factors B = U√S, A = √S Vh of the top ``rank`` triplets (scale 1)."""
    k = S.shape[0] if rank is None else min(rank, S.shape[0])
    root = S[:k].clamp_min(0).sqrt()
    return LoraModule(
        A=(root[:, None] * Vh[:k]).contiguous(), B=(U[:, :k] * root[None, :]).contiguous(), scale=1.0
    )


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int | None) -> LoraModule:
    """Best rank-``rank`` approximation (Eckart–Young) of B @ A, computed in factored form."""
    U, S, Vh = factored_svd(B, A)
    return from_svd(U, S, Vh, rank)


def inner(x: LoraModule, y: LoraModule) -> float:
    """Frobenius inner product ⟨ΔW_x, ΔW_y⟩ = Σ (B_xᵀB_y) ∘ (A_x A_yᵀ), an r_x×r_y computation."""
    bb = x.B.double().T @ y.B.double()
    aa = x.A.double() @ y.A.double().T
    return float((bb * aa).sum()) * x.scale * y.scale


def fro_norm(x: LoraModule) -> float:
    return max(inner(x, x), 0.0) ** 0.5


def _randomized_svd(
    M: torch.Tensor, rank: int, oversample: int, niter: int, generator: torch.Generator | None
):
    """Halko–Martinsson–Tropp randomized SVD with QR-stabilised subspace iteration."""
    m, n = M.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, dtype=M.dtype, device="cpu").to(M.device)
    Q, _ = torch.linalg.qr(M @ omega)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(M.T @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ Ub, S, Vh


def dense_truncated_svd(
    M: torch.Tensor,
    rank: int,
    solver: str = "auto",
    *,
    oversample: int = 16,
    niter: int = 4,
    generator: torch.Generator | None = None,
) -> LoraModule:
    """Re-factorise one dense module update to ``rank``.

    ``exact`` uses LAPACK's thin SVD; ``randomized`` a subspace iteration (≈20× faster on 1536×576, top
    singular subspace accurate to the spectral gap); ``auto`` picks exact when the matrix is small.
    """
    m, n = M.shape
    rank = min(rank, m, n)
    if solver == "auto":
        solver = "exact" if min(m, n) <= 4 * (rank + oversample) else "randomized"
    if solver == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    elif solver == "randomized":
        U, S, Vh = _randomized_svd(M, rank, oversample, niter, generator)
    else:
        raise ValueError(f"unknown svd solver {solver!r}")
    return from_svd(U, S, Vh, rank)
