"""LoRA-LEGO: merge LoRAs by clustering their rank-one Minimal Semantic Units (MSUs).

Zhao, Shen, Zhu, Li, Su, Wang, Kuang, Wu, "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA
to Extremes Through Rank-Wise Clustering", ICLR 2025.

A LoRA ΔW = Σ_i b_i a_iᵀ is a set of MSUs (b_i, a_i). Two properties make them LEGO bricks:
permutation invariance (reordering the rank index leaves ΔW unchanged) and concatenation–summation
equivalence (concatenating MSUs of several LoRAs sums their ΔW). LoRA-LEGO pools every MSU of the K
adapters, clusters them into k groups and assembles a rank-k LoRA from the centroids, then applies a dual
reweighting. Our reading of the two reweightings (documented because the paper gives them as scalings):
- parameter reweighting: averaging non-parallel MSUs shrinks the centroid ("norm decay"); each centroid's
  b̄ and ā are rescaled to the mean norm of their members;
- output reweighting: a cluster stands for the sum of its members (concatenation–summation), whose size
  grows with the cluster ("variance expansion"); each merged unit is rescaled so that its ΔW has the exact
  Frobenius norm of the sum of the units it replaces (computed from r×r Gram matrices, no m×n matrix).
With k ≥ number of MSUs every unit is its own cluster and the result is exactly Σ w_k ΔW_k.

Determinism and invariance: each MSU is canonicalised (balanced norms, sign fixed by the largest entry of
a), k-means starts from a farthest-point traversal seeded at the largest unit, so the result depends on
the set of MSUs only, not on their order.
"""

from __future__ import annotations

import torch

from edgefuse.adapters import LoraModule
from edgefuse.fusion.context import Ctx, present


def _units(mods, weights):
    bs, as_ = [], []
    for k, mod in present(mods):
        c = weights[k] * mod.scale
        for i in range(mod.rank):
            b, a = mod.B[:, i].double() * c, mod.A[i].double()
            nb, na = b.norm(), a.norm()
            if nb == 0 or na == 0:
                continue
            g = (nb * na).sqrt()
            b, a = b / nb * g, a / na * g
            if a[a.abs().argmax()] < 0:
                b, a = -b, -a
            bs.append(b)
            as_.append(a)
    return torch.stack(bs), torch.stack(as_)


def _kmeans(X: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Lloyd's k-means with a farthest-point start; returns the assignment of each row."""
    first = int(X.norm(dim=1).argmax())
    centers = [first]
    d = (X - X[first]).norm(dim=1)
    for _ in range(1, k):
        nxt = int(d.argmax())
        centers.append(nxt)
        d = torch.minimum(d, (X - X[nxt]).norm(dim=1))
    C = X[centers].clone()
    assign = torch.cdist(X, C).argmin(dim=1)
    for _ in range(iters):
        for c in range(k):
            members = assign == c
            if members.any():
                C[c] = X[members].mean(0)
        new = torch.cdist(X, C).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def lora_lego(mods, weights, ctx: Ctx) -> LoraModule:
    """Rank-wise clustering of MSUs into ``rank`` clusters with dual reweighting (``reweight='dual'|'none'``).

    Not in PEFT or mergekit. ``iters`` bounds the k-means iterations.
    """
    Bu, Au = _units(mods, weights)
    n_units = Bu.shape[0]
    k = ctx.rank or max(x.rank for _, x in present(mods))
    out_dtype = next(m.A.dtype for _, m in present(mods))
    if k >= n_units:
        return LoraModule(A=Au.to(out_dtype), B=Bu.T.contiguous().to(out_dtype), scale=1.0)
    assign = _kmeans(torch.cat([Bu, Au], dim=1), k, int(ctx.params.get("iters", 50)))
    reweight = ctx.params.get("reweight", "dual")
    bs, as_, norms = [], [], []
    for c in range(k):
        idx = (assign == c).nonzero().flatten()
        if idx.numel() == 0:
            continue
        b, a = Bu[idx].mean(0), Au[idx].mean(0)
        if reweight == "dual":
            b = b * (Bu[idx].norm(dim=1).mean() / b.norm().clamp_min(1e-300))
            a = a * (Au[idx].norm(dim=1).mean() / a.norm().clamp_min(1e-300))
            target = ((Bu[idx] @ Bu[idx].T) * (Au[idx] @ Au[idx].T)).sum().clamp_min(0).sqrt()
            g = (target / (b.norm() * a.norm()).clamp_min(1e-300)).sqrt()
            b, a = b * g, a * g
        elif reweight != "none":
            raise ValueError(f"lora_lego: reweight must be 'dual' or 'none', not {reweight!r}")
        bs.append(b)
        as_.append(a)
        norms.append(float(b.norm() * a.norm()))
    order = sorted(range(len(bs)), key=lambda i: -norms[i])
    B = torch.stack([bs[i] for i in order], dim=1)
    A = torch.stack([as_[i] for i in order], dim=0)
    return LoraModule(A=A.to(out_dtype).contiguous(), B=B.to(out_dtype).contiguous(), scale=1.0)
