"""The shared element-wise merge mechanism: sparsify → weight → sign consensus → combine.

Why: TIES, DARE (linear and TIES), magnitude pruning, Model Breadcrumbs and task arithmetic differ only in
which step they switch on (as mergekit frames them). One `Recipe` names the configuration and one function,
`merge_stack`, runs it on a stack of K task tensors — dense ΔW of one module, KnOTS' aligned V blocks, or
Core Space's core matrices. Work is in place on the stack, so peak memory is the stack plus ~2 buffers.

Conventions (each explicit, and documented where PEFT differs):
- counts use ``int(density · numel)`` like PEFT/mergekit;
- sparsification acts on unweighted tensors (rankings are scale-invariant), then weights multiply;
- the sign is elected on the *weighted* tensors (mergekit; a negative weight flips what the adapter
  contributes). PEFT elects on unweighted tensors: identical whenever the weights are equal and positive;
- TIES' disjoint merge divides by the number of agreeing non-zero entries (paper, PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Recipe:
    """A configuration of the shared steps."""

    sparsify: str = "none"  # none | magnitude | random | breadcrumbs
    rescale: bool = False  # DARE: divide survivors by density to keep the expectation
    consensus: bool = False  # TIES: elect a sign per element, drop disagreeing entries
    combine: str = "sum"  # sum | disjoint_mean

    @property
    def is_linear(self) -> bool:
        """Linear recipes are exact in factored form; no dense ΔW is ever needed."""
        return self.sparsify == "none" and not self.consensus and self.combine == "sum"


def _rows(x: torch.Tensor, target: int = 1 << 16):
    """Row-chunk views of x (as 2-D) of about ``target`` elements: workspace stays a chunk, not a tensor."""
    v = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    step = max(1, target // max(1, v.shape[1]))
    return [v[i : i + step] for i in range(0, v.shape[0], step)]


def _kth_largest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest |x| without a full-size copy of |x| (and faster than ``kthvalue`` on it).

    A random sample brackets the answer in [lo, hi]; with c entries above hi, the answer is the (k−c)-th
    largest of the few entries inside the bracket, all counted chunk by chunk. If the bracket misses, fall
    back to a full selection.
    """
    n = x.numel()
    flat = x.reshape(-1)
    if n > 1 << 16:
        idx = torch.randint(n, (8192,), generator=torch.Generator().manual_seed(n), device="cpu").to(x.device)
        sample = flat[idx].abs().sort().values  # random, not strided: low-rank ΔW has periodic structure
        ns = sample.numel()
        pos = (1 - k / n) * (ns - 1)
        margin = int(4 * (ns * (k / n) * (1 - k / n)) ** 0.5) + 8
        lo = sample[max(0, int(pos) - margin)]
        hi = sample[min(ns - 1, int(pos) + 1 + margin)]
        chunks = _rows(x)
        need = k - sum(int((c.abs() > hi).sum()) for c in chunks)
        if need > 0:
            band = torch.cat([c.abs()[(c.abs() >= lo) & (c.abs() <= hi)] for c in chunks])
            if band.numel() >= need:
                return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(flat.abs(), n - k + 1).values


def sparsify_(
    x: torch.Tensor,
    recipe: Recipe,
    density: float,
    gamma: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sparsify one task tensor in place (chunk by chunk) and return it."""
    n = x.numel()
    if recipe.sparsify == "magnitude":
        k = int(density * n)
        if k >= n:
            return x
        if k <= 0:
            return x.zero_()
        thr = _kth_largest_abs(x, k)
        for c in _rows(x):
            c.mul_(c.abs() >= thr)
    elif recipe.sparsify == "random":
        if density >= 1:
            return x
        for c in _rows(x):  # row chunks in order draw exactly the same Bernoulli stream as one full draw
            c.mul_(torch.bernoulli(torch.full_like(c, density), generator=generator))
            if recipe.rescale:
                c.div_(density)
    elif recipe.sparsify == "breadcrumbs":
        top = int(gamma * n)
        keep = min(int(density * n), n - top)
        if keep <= 0:
            return x.zero_()
        lo = _kth_largest_abs(x, top + keep) if top + keep < n else None
        hi = _kth_largest_abs(x, top) if top > 0 else None
        for c in _rows(x):
            a = c.abs()
            mask = torch.ones_like(a, dtype=torch.bool) if lo is None else a >= lo
            if hi is not None:
                mask &= a < hi
            c.mul_(mask)
    elif recipe.sparsify != "none":
        raise ValueError(f"unknown sparsifier {recipe.sparsify!r}")
    return x


def _chunks(n_rows: int, row_numel: int, target: int = 1 << 16):
    step = max(1, target // max(1, row_numel))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def merge_stack(
    T,
    weights: list[float],
    recipe: Recipe,
    *,
    density: float = 1.0,
    gamma: float = 0.0,
    majority: str = "total",
    generators: list[torch.Generator | None] | None = None,
    present: list[bool] | None = None,
    sparsified: bool = False,
) -> torch.Tensor:
    """Run ``recipe`` on the K task tensors ``T`` (a K×… tensor or a list), consuming them; returns the merge
    (stored in T[0]).

    ``present[k]`` False marks an adapter that lacks this module (a zero slot): it is neither sparsified
    nor drawn for, so random streams match a merge of only the present adapters. ``sparsified`` says the
    caller already ran `sparsify_` (to keep only one unsparsified tensor alive at a time). Sign election and
    the disjoint mean run over row chunks, so their workspace is a few chunks, not whole tensors.
    """
    K = len(T)
    present = present or [True] * K
    generators = generators or [None] * K
    for k in range(K):
        if present[k] and recipe.sparsify != "none" and not sparsified:
            sparsify_(T[k], recipe, density, gamma, generators[k])
        T[k].mul_(weights[k])
    out = T[0]
    rows = out.shape[0] if out.dim() else 1
    views = [t.view(rows, -1) for t in T]
    for s in _chunks(rows, views[0].shape[1]):
        parts = [v[s] for v in views]
        count = None
        if recipe.consensus:
            if majority == "total":
                elected = sum(p for p in parts[1:]) + parts[0] if K > 1 else parts[0].clone()
            elif majority == "frequency":
                elected = parts[0].sign()
                for p in parts[1:]:
                    elected.add_(p.sign())
            else:
                raise ValueError(f"majority must be 'total' or 'frequency', not {majority!r}")
            elected = torch.where(elected >= 0, 1.0, -1.0).to(out.dtype)
            count = torch.zeros_like(elected)
            for p in parts:
                agree = (p * elected) > 0
                p.mul_(agree)
                count.add_(agree)
        elif recipe.combine == "disjoint_mean":
            count = sum((p != 0).to(out.dtype) for p in parts)
        for p in parts[1:]:
            parts[0].add_(p)
        if recipe.combine == "disjoint_mean":
            parts[0].div_(count.clamp_min_(1.0))
    return out


# Named configurations of the shared steps (also the inner merges of KnOTS and Core Space).
RECIPES: dict[str, Recipe] = {
    "task_arithmetic": Recipe(),
    "ties": Recipe(sparsify="magnitude", consensus=True, combine="disjoint_mean"),
    "dare_linear": Recipe(sparsify="random", rescale=True),
    "dare_ties": Recipe(sparsify="random", rescale=True, consensus=True, combine="disjoint_mean"),
    "magnitude_prune": Recipe(sparsify="magnitude"),
    "breadcrumbs": Recipe(sparsify="breadcrumbs"),
    "breadcrumbs_ties": Recipe(sparsify="breadcrumbs", consensus=True, combine="disjoint_mean"),
}


def inner_recipe(ctx, method: str) -> str:
    """The element-wise recipe KnOTS / Core Space apply after alignment (``inner`` parameter, TIES by default)."""
    inner = ctx.params.get("inner", "ties")
    if inner not in RECIPES:
        raise ValueError(f"{method}: inner must be one of {', '.join(RECIPES)}, not {inner!r}")
    return inner


def merge_inner(stack: torch.Tensor, weights, inner: str, ctx, mods) -> torch.Tensor:
    """Run the named element-wise recipe (``inner``) on a stack of aligned updates with the fusion context's
    density/gamma/majority and seed: the shared last step of KnOTS and Core Space."""
    return merge_stack(
        stack,
        list(weights),
        RECIPES[inner],
        density=ctx.density,
        gamma=ctx.gamma,
        majority=ctx.majority,
        generators=[ctx.generator()] * len(mods),
        present=[x is not None for x in mods],
    )
