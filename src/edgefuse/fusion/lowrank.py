"""Factored LoRA algebra: exact sums, inner products and truncated SVDs without m×n matrices.

Why: a sum of K LoRA updates Σ c_k B_k A_k is itself a low-rank product [c_1 B_1 … c_K B_K]·[A_1; …; A_K]
of rank R = Σ r_k. Its exact SVD follows from the stacked factors alone — thin QRs and an R×R core SVD
(`factored_svd`), or, faster for a truncation, two R×R Gram matrices and their eigendecompositions
(`truncate`) — costing O((m+n)R² + R³) instead of O(mn·min(m,n)). Dense ΔW appears only in the
element-wise methods, one module at a time, re-factorised exactly by `dense_truncated_svd`.
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

    Returns U (m×q), S (q), Vh (q×n) with q ≤ rank; singular values ≤ tol·S_max are dropped. For a truncation
    to the top triplets, `truncate` is faster.
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


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int | None, tol: float = 1e-14) -> LoraModule:
    """Best rank-``rank`` approximation (Eckart–Young) of M = B @ A (m×R times R×n), from two R×R Gram
    matrices — no QR of the m×R and n×R factors, no m×n matrix.

    With Ga = A Aᵀ = L Lᵀ (L = W_a √Λ_a from its eigendecomposition, no inverse needed) the nonzero
    eigenvalues of M Mᵀ = (BL)(BL)ᵀ are those of the R×R matrix K = Lᵀ (BᵀB) L = Z Λ Zᵀ, so
    U = B L Z Λ^{-1/2}, σ = Λ^{1/2}, and the matching rows of Vᵀ follow from σ Vᵀ = Uᵀ M = σ⁻¹ Zᵀ Lᵀ (BᵀB) A.
    Balanced output factors: B' = U√σ = B·(L Z Λ^{-1/4}), A' = √σ Vᵀ = Λ^{-3/4} Zᵀ Lᵀ (BᵀB)·A.
    Cost: two m/n×R Gram products and two R×R eigendecompositions (float64), against QR of both stacked
    factors and an R×R SVD in `factored_svd` — measured 2.3× faster on SmolLM2-sized modules (BENCHMARKS.md).
    Accuracy: everything small is float64, so the squared spectrum only matters for σ_i < ~1e-7·σ_1 (triplets
    with Λ_i ≤ ``tol``·Λ_1 are returned as zeros); their share of M is below float32 output rounding.
    """
    dtype = B.dtype
    R = B.shape[1]
    k = R if rank is None else min(rank, R)
    Bd, Ad = B.double(), A.double()
    Gb = Bd.T @ Bd
    la, Wa = torch.linalg.eigh(Ad @ Ad.T)
    L = Wa * la.clamp_min(0).sqrt()
    K = L.T @ Gb @ L
    lam, Z = torch.linalg.eigh((K + K.T) / 2)
    lam, Z = lam.flip(0)[:k], Z.flip(1)[:, :k]
    keep = (lam > 0) & (lam > tol * lam[:1])
    lam = torch.where(keep, lam, torch.ones_like(lam))
    LZ = L @ Z
    B_out = Bd @ (LZ * (lam.pow(-0.25) * keep))
    A_out = ((lam.pow(-0.75) * keep)[:, None] * (LZ.T @ Gb)) @ Ad
    return LoraModule(A=A_out.to(dtype).contiguous(), B=B_out.to(dtype).contiguous(), scale=1.0)


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


_EPS32 = 2.0**-24


def _panels(M: torch.Tensor, dtype: torch.dtype, numel: int = 1 << 16):
    """Blocks of M along its longer side, in ``dtype``: rows M[s] (c = n columns) when m ≥ n, else columns
    M[:, s] (c = m rows), of about ``numel`` elements. Views of M (a converted copy of one block only when
    ``dtype`` differs)."""
    m, n = M.shape
    tall = m >= n
    size = max(1, numel // min(m, n))
    for i in range(0, m if tall else n, size):
        s = slice(i, min(i + size, m if tall else n))
        yield s, (M[s] if tall else M[:, s]).to(dtype)


def _gram_lower(M: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Lower triangle (all that ``eigh`` reads) of the smaller Gram matrix (MᵀM or MMᵀ) in ``dtype``."""
    tall = M.shape[0] >= M.shape[1]
    c = min(M.shape)
    G = torch.zeros((c, c), dtype=dtype, device=M.device).mT  # column-major: LAPACK decomposes it in place
    cols = [slice(j, min(j + 128, c)) for j in range(0, c, 128)]
    for _, b in _panels(M, dtype):
        for i, ci in enumerate(cols):
            for cj in cols[i:]:
                if tall:
                    G[cj, ci].addmm_(b[:, cj].T, b[:, ci])
                else:
                    G[cj, ci].addmm_(b[cj], b[ci].T)
    return G


def _project(M: torch.Tensor, Y: torch.Tensor, gram: bool = True):
    """XY and, if ``gram``, (XᵀX)·Y = Xᵀ(XY) in float64, without forming XᵀX (X = M, or Mᵀ when m < n)."""
    tall = M.shape[0] >= M.shape[1]
    XY = torch.empty((max(M.shape), Y.shape[1]), dtype=torch.float64, device=M.device)
    GY = torch.zeros_like(Y) if gram else None
    for s, b in _panels(M, torch.float64):
        XY[s] = b @ Y if tall else (Y.T @ b).T
        if gram:
            GY.addmm_(b.T if tall else b, XY[s])
    return XY, GY


def _top_eigvecs(M: torch.Tensor, r: int, tol: float = 1e-8, iters: int = 3):
    """The top-``r`` eigenvectors V (c × r, float64, largest first) of the Gram matrix G = XᵀX of M, and
    X·V when it was computed on the way (else None).

    Fast path: a float32 eigendecomposition G ≈ W Θ Wᵀ, then refinement in float64 of the top-r invariant
    subspace: Rayleigh–Ritz on Y (Ritz values μ, residual R = GY − Yμ with G applied exactly as Xᵀ(XY)) and
    a correction step that solves (G − μ_j) t_j = −r_j on the complement with the float32 decomposition,
    t_j = W⊥ (W⊥ᵀ r_j)/(μ_j − θ_⊥) (an inexact Newton step for the invariant subspace; cf. Ogita & Aishima,
    "Iterative refinement for symmetric eigenvalue decomposition", Japan J. Indust. Appl. Math. 2018).
    Stop test (Davis–Kahan sin Θ theorem): ‖sin Θ(Y, top-r eigenspace)‖_F ≤ ‖R‖_F / δ with
    δ = μ_r − λ_{r+1}, where λ_{r+1} is bounded by its float32 value widened by c·ε₃₂·θ_max plus ten times
    the largest float32 error observed on the top r. Accepted at ≤ ``tol`` (1e-8; one correction usually
    suffices); otherwise — a near-degenerate gap at r, or r ≥ c — the float64 eigendecomposition is used.
    """
    c = min(M.shape)
    if r < c:
        W = _gram_lower(M, torch.float32)
        theta = torch.empty(c, dtype=W.dtype, device=M.device)
        torch.linalg.eigh(W, UPLO="L", out=(theta, W))  # in place: W holds the eigenvectors (ascending)
        theta = theta.double()
        Wc, tc = W[:, : c - r], theta[: c - r]
        Y = W[:, c - r :].double()
        for _ in range(iters):
            Y = torch.linalg.qr(Y).Q
            XY, GY = _project(M, Y)
            mu, Z = torch.linalg.eigh(Y.T @ GY)
            Y, GY = Y @ Z, GY @ Z
            R = GY - Y * mu
            eta = c * _EPS32 * float(theta[-1].abs()) + 10 * float((mu - theta[c - r :]).abs().max())
            gap = float(mu[0] - tc[-1]) - eta
            if gap <= 0:
                break
            if float(R.norm()) <= tol * gap:
                return Y.flip(1), (XY @ Z).flip(1)
            C = (Wc.T @ R.to(Wc.dtype)).double() / (mu[None, :] - tc[:, None])
            Y = Y + (Wc @ C.to(Wc.dtype)).double()
        del W, Wc
    G = _gram_lower(M, torch.float64)
    L = torch.empty(c, dtype=torch.float64, device=M.device)
    torch.linalg.eigh(G, UPLO="L", out=(L, G))  # in place: G's columns become the eigenvectors (ascending)
    return G[:, c - r :].flip(1).contiguous(), None


def gram_truncated_svd(M: torch.Tensor, rank: int) -> LoraModule:
    """Exact best rank-``rank`` approximation of a dense M (Eckart–Young) from the top eigenvectors of its
    smaller Gram matrix: for m ≥ n, MᵀM = V Σ² Vᵀ and M_r = (M V_r) V_rᵀ (for m < n the same on Mᵀ).

    Accuracy: the top-r eigenspace comes out of `_top_eigvecs` certified to ‖sin Θ‖ ≤ 1e-8 (or from a float64
    eigendecomposition, whose error is about ε₆₄‖M‖²/(σ_r² − σ_{r+1}²): Davis & Kahan, "The rotation of
    eigenvectors by a perturbation III", SIAM J. Numer. Anal. 1970); products with M are taken in float64
    and the singular values recomputed as ‖M v_i‖. Both are far below the error ε₃₂‖M‖/(σ_r − σ_{r+1}) of a
    float32 LAPACK SVD of the same M, so the result is the exact truncation up to float32 output rounding.
    Memory: M is read in blocks (never copied); beyond M, a float32 c×c Gram matrix decomposed in place plus
    LAPACK's workspace (1 + 6c + 2c² floats), c = min(m, n); twice that on the float64 fallback.
    """
    m, n = M.shape
    V, P = _top_eigvecs(M, rank)
    if P is None:
        P, _ = _project(M, V, gram=False)  # M v_i = σ_i u_i (or Mᵀ u_i = σ_i v_i)
    S = P.norm(dim=0)
    root = S.sqrt()
    left = P * torch.where(root > 0, 1 / root, torch.zeros_like(root))  # U √Σ
    right = (V * root).T  # √Σ Vᵀ
    B, A = (left, right) if m >= n else (right.T, left.T)
    return LoraModule(A=A.to(M.dtype).contiguous(), B=B.to(M.dtype).contiguous(), scale=1.0)


SOLVERS = ("gram", "exact", "randomized", "auto")


def dense_truncated_svd(
    M: torch.Tensor,
    rank: int,
    solver: str = "gram",
    *,
    oversample: int = 16,
    niter: int = 4,
    generator: torch.Generator | None = None,
) -> LoraModule:
    """Re-factorise one dense module update to ``rank``.

    - ``gram`` (default; ``auto`` is the same): exact, from the top eigenvectors of the smaller Gram matrix
      refined in float64 (`gram_truncated_svd`) — faster than LAPACK's SVD here and more accurate than a
      float32 one;
    - ``exact``: LAPACK's thin SVD (``torch.linalg.svd``) in M's precision, as PEFT's ``*_svd`` merges do;
    - ``randomized``: Halko–Martinsson–Tropp subspace iteration (Halko, Martinsson, Tropp, "Finding structure
      with randomness", SIAM Review 2011). Only an approximation: a TIES/DARE ΔW is nearly full-rank with a
      flat spectrum, so its top-r subspace is poorly separated and the result can differ from the exact
      truncation by tens of percent (measured in BENCHMARKS.md). Explicit opt-in only.
    """
    m, n = M.shape
    rank = min(rank, m, n)
    if solver in ("gram", "auto"):
        return gram_truncated_svd(M, rank)
    if solver == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    elif solver == "randomized":
        U, S, Vh = _randomized_svd(M, rank, oversample, niter, generator)
    else:
        raise ValueError(f"unknown svd solver {solver!r}; valid: {', '.join(SOLVERS)}")
    return from_svd(U, S, Vh, rank)
