"""Synthetic adapters and dense references (from the papers' definitions) shared by the fusion tests.

Plain functions and constants; the `make_adapters` fixture in conftest.py hands out the factory."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from edgefuse.adapters import LoraAdapter, LoraModule

NAMES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.1.mlp.up_proj": (16, 24)}


def make_adapters(K=3, ranks=(2, 4, 6), seed=0, names=NAMES, scales=(0.5, 2.0, 1.3)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(K):
        mods = {}
        for name, (m, n) in names.items():
            r = ranks[k % len(ranks)]
            mods[name] = LoraModule(
                torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), scales[k % len(scales)]
            )
        out.append(LoraAdapter(mods))
    return out


def deltas(adapters, name):
    m, n = next(a.modules[name].shape for a in adapters if name in a.modules)
    return [
        a.modules[name].delta().double() if name in a.modules else torch.zeros(m, n, dtype=torch.float64)
        for a in adapters
    ]


def rel(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


def truncated(M, r):
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def kept_mask(t, density, gamma=0.0):
    """The entries TIES' trim keeps, from its definition: the ⌈density·n⌉ largest |x| (breadcrumbs: after the
    ⌊gamma·n⌋ largest), magnitudes ranked by a stable sort so that ties go to the earlier row-major position.
    Counts from the decimal the float was written as (Fraction of its repr), not from float products."""
    n = t.numel()
    top = math.floor(Fraction(repr(gamma)) * n)
    keep = min(math.ceil(Fraction(repr(density)) * n), n - top)
    order = torch.argsort(t.abs().flatten(), descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[top : top + keep]] = True
    return mask.view_as(t)


def ref_elementwise(
    ds,
    weights,
    *,
    trim=None,
    density=1.0,
    gamma=0.0,
    elect=False,
    majority="total",
    masks=None,
    rescale=False,
):
    """sparsify → weight → (elect sign, disjoint mean) | sum, straight from TIES / DARE / Breadcrumbs."""
    ts = []
    for k, d in enumerate(ds):
        if trim == "magnitude":
            d = d * kept_mask(d, density)
        elif trim == "breadcrumbs":
            d = d * kept_mask(d, density, gamma)
        elif trim == "random":
            d = d * masks[k]
            if rescale:
                d = d / density
        ts.append(d * weights[k])
    T = torch.stack(ts)
    if not elect:
        return T.sum(0)
    s = T.sum(0) if majority == "total" else torch.sign(T).sum(0)
    sign = torch.where(s >= 0, 1.0, -1.0).double()
    agree = torch.sign(T) == sign
    return (T * agree).sum(0) / agree.sum(0).clamp(min=1)

