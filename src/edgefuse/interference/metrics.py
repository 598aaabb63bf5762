"""Interference of LoRA updates measured on activations, in factored form (no m×n matrix).

Why: the parameter cosine between independently trained updates is ≈ 0 (Ilharco et al., ICLR 2023), yet
adapter j still changes domain i's outputs by ΔW_j H_i (OSRM, Zhang et al., ACL 2025, arXiv 2505.22934). With
the Gram matrix G_i = H_iᵀH_i of the module's inputs, every output inner product is a trace of small matrices:
⟨ΔW_j H_i, ΔW_k H_i⟩_F = tr(B_j A_j G_i A_kᵀ B_kᵀ) = Σ (B_jᵀB_k) ∘ (A_j G_i A_kᵀ) — r_j × r_k products only.

Per module and domain i (adapter i is domain i's edge):
- ratio[i][j] = ‖ΔW_j H_i‖ / ‖ΔW_i H_i‖: how loud adapter j is on domain i's inputs next to i's own update;
- deviation[i] = ‖(ΔW_f − ΔW_i) H_i‖ / ‖ΔW_i H_i‖: how far the fused update is from edge i on i's inputs,
  through the concatenated low-rank product [B_f, −B_i][A_f; A_i];
- cosine[i][j][k] = ⟨ΔW_j H_i, ΔW_k H_i⟩ / (‖ΔW_j H_i‖‖ΔW_k H_i‖): whether two adapters push i's outputs the
  same way (> 0) or against each other (< 0).
Whole-model figures pool the squared norms and inner products over modules before the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from edgefuse.adapters import LoraAdapter, LoraModule, module_names
from edgefuse.errors import EdgefuseError


def scaled_factors(m: LoraModule | None, shape: tuple[int, int], weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B·scale·weight, A) in float64; a missing module is a rank-0 update of the same shape."""
    if m is None:
        return torch.zeros(shape[0], 0, dtype=torch.float64), torch.zeros(0, shape[1], dtype=torch.float64)
    return m.B.double() * (m.scale * weight), m.A.double()


def output_products(factors: list[tuple[torch.Tensor, torch.Tensor]], G: torch.Tensor) -> torch.Tensor:
    """P[j][k] = ⟨ΔW_j H, ΔW_k H⟩_F for updates ΔW = B A on inputs with Gram G = HᵀH (float64, K × K)."""
    K = len(factors)
    AG = [A @ G for _, A in factors]
    P = torch.zeros(K, K, dtype=torch.float64)
    for j in range(K):
        for k in range(j, K):
            Bj, Aj = factors[j]
            Bk, Ak = factors[k]
            P[j, k] = P[k, j] = ((Bj.T @ Bk) * (AG[j] @ Ak.T)).sum()
    return P


def difference_norm2(f: tuple[torch.Tensor, torch.Tensor], e: tuple[torch.Tensor, torch.Tensor],
                      G: torch.Tensor) -> float:
    """‖(B_f A_f − B_e A_e) H‖² as one concatenated low-rank product [B_f, −B_e][A_f; A_e]."""
    B = torch.cat([f[0], -e[0]], dim=1)
    A = torch.cat([f[1], e[1]], dim=0)
    return float(((B.T @ B) * (A @ G @ A.T)).sum())


def norm_ratio(num2: float, den2: float) -> float | None:
    return math.sqrt(max(num2, 0.0) / den2) if den2 > 0 else None


def _cos(p: torch.Tensor, i: int, j: int) -> float | None:
    d = float(p[i, i]) * float(p[j, j])
    return float(p[i, j]) / math.sqrt(d) if d > 0 else None


def interference(adapters: list[LoraAdapter], grams: list[Mapping], fused: LoraAdapter | None = None,
                 weights: list[float] | None = None) -> dict:
    """Interference statistics of K adapters, adapter k being domain k's edge and ``grams[k]`` its domain's
    module → Gram matrix (d_in × d_in). ``fused`` defaults to the weighted sum Σ w_k ΔW_k (task arithmetic).

    Returns ``{"modules": {name: {ratio, deviation, cosine, own, interference, max_deviation}}, "summary":
    {ratio, deviation, cosine, max_interference, max_deviation}}`` (None where a norm is zero).
    """
    K = len(adapters)
    if len(grams) != K:
        raise EdgefuseError(f"{len(grams)} domains of Gram matrices for {K} adapters")
    weights = [1.0] * K if weights is None else list(weights)
    names = module_names(adapters)
    pooled = torch.zeros(K, K, K, dtype=torch.float64)  # [domain i, adapter j, adapter k]
    pooled_dev = [0.0] * K
    modules = {}
    for name in names:
        mods = [a.modules.get(name) for a in adapters]
        shape = next(m.shape for m in mods if m is not None)
        d_in = shape[1]
        facs = [scaled_factors(m, shape) for m in mods]
        if fused is None:  # Σ w_k ΔW_k = [w_1 B_1 … w_K B_K][A_1; …; A_K]
            ffac = (torch.cat([scaled_factors(m, shape, w)[0] for m, w in zip(mods, weights)], dim=1),
                    torch.cat([f[1] for f in facs], dim=0))
        else:
            ffac = scaled_factors(fused.modules.get(name), shape)
        P, dev = [], []
        for i in range(K):
            G = _gram(grams[i], name, d_in, i)
            p = output_products(facs, G)
            P.append(p)
            pooled[i] += p
            d2 = difference_norm2(ffac, facs[i], G) if mods[i] is not None else None
            if d2 is not None:
                pooled_dev[i] += d2
            dev.append(None if d2 is None else norm_ratio(d2, float(p[i, i])))
        ratio = [[norm_ratio(float(P[i][j, j]), float(P[i][i, i])) for j in range(K)] for i in range(K)]
        off = [r for i in range(K) for j, r in enumerate(ratio[i]) if j != i and r is not None]
        modules[name] = {
            "ratio": ratio,
            "deviation": dev,
            "cosine": [[[_cos(P[i], j, k) for k in range(K)] for j in range(K)] for i in range(K)],
            "own": [math.sqrt(max(float(P[i][i, i]), 0.0)) for i in range(K)],
            "interference": max(off, default=None),
            "max_deviation": max((d for d in dev if d is not None), default=None),
        }
    summary_ratio = [[norm_ratio(float(pooled[i, j, j]), float(pooled[i, i, i])) for j in range(K)] for i in range(K)]
    return {
        "modules": modules,
        "summary": {
            "modules": len(names),
            "ratio": summary_ratio,
            "deviation": [norm_ratio(pooled_dev[i], float(pooled[i, i, i])) for i in range(K)],
            "cosine": [[[_cos(pooled[i], j, k) for k in range(K)] for j in range(K)] for i in range(K)],
            "max_interference": max((e["interference"] for e in modules.values() if e["interference"] is not None),
                                    default=None),
            "max_deviation": max((e["max_deviation"] for e in modules.values() if e["max_deviation"] is not None),
                                 default=None),
        },
    }


def _gram(grams: Mapping, name: str, d_in: int, i: int) -> torch.Tensor:
    if name not in grams:
        where = getattr(grams, "path", f"domain {i}")
        raise EdgefuseError(f"no Gram matrix for module {name} (domain {getattr(grams, 'domain', i)})", path=where)
    get = getattr(grams, "get_checked", None)
    if get is not None:
        return get(name, d_in)
    from edgefuse.interference.grams import check_gram  # local: torch-backed, kept off the CLI start-up path (+3 ms on `edgefuse --help`, measured)

    return check_gram(grams[name], d_in, f"module {name}", f"domain {i}")
