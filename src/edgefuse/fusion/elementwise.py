"""The shared element-wise merge mechanism: sparsify → weight → sign consensus → combine, in row blocks.

Why: TIES, DARE (linear and TIES), magnitude pruning, Model Breadcrumbs and task arithmetic differ only in
which step they switch on (as mergekit frames them). One `Recipe` names the configuration (each method's
recipe is part of its spec in `fusion.registry`) and one function, `merge_rows`, runs it on K task tensors —
the dense ΔW of one module (`merge_module`, the kernel of the element-wise family), or the aligned task
tensors of KnOTS and Core Space (`merge_stack`, called by `fusion.aligned`).

Memory: the K task tensors are never held at once. Each is a *row source* that produces any block of its
rows on demand (rows of scale·B·A from the factors, or rows of an existing small tensor). Two passes:
1. magnitude bounds (trim, breadcrumbs): for one adapter at a time, |ΔW_k| is assembled from the same row
   blocks as pass 2 (in the output's buffer, overwritten later) and its k-th largest magnitude(s) selected
   exactly, with the positions of any ties the cut runs through (the tie rule below);
2. the output is built one row block at a time: each adapter's block is recomputed (bitwise the values of
   pass 1: same product of the same operands), masked, weighted, and the K blocks combined into that block.
The peak is one dense tensor (the output) plus K + 4 row-block buffers: a further adapter costs a block, not
a dense update. Every step is float arithmetic on preallocated buffers (masks as hardshrink / sign·relu), no
boolean temporaries per block.
Random drops need no pass 1: each adapter draws from its own stream block after block, which gives exactly
the draws of one full-tensor draw from that stream.

Conventions (each explicit, and documented where PEFT differs):
- the magnitude trim is an exact top-k (TIES, Yadav et al., NeurIPS 2023, arXiv 2306.01708): an adapter keeps
  ⌈density·n⌉ of its n entries (`keep_count`; at least one for any density > 0) and breadcrumbs first drops the
  ⌊gamma·n⌋ largest. Tie rule: entries are ranked by |x| descending, then by position (row-major, earlier
  first), so an adapter keeps exactly that many entries even when magnitudes tie at the cut; entries of
  magnitude 0 are kept or dropped to no effect. PEFT/mergekit keep ``int(density · n)`` by ``torch.topk``
  (ties in no stated order): the same entries whenever density·n is an integer and no tie straddles the cut;
- sparsification acts on unweighted tensors (rankings are scale-invariant), then weights multiply;
- a random drop keeps an entry when u < density for u ~ U[0, 1) drawn in row-major order, which is what
  ``torch.bernoulli(torch.full_like(x, density))`` draws from the same generator (PEFT's DARE; the tests check
  both against PEFT and against masks drawn with ``torch.bernoulli``);
- the sign is elected on the *weighted* tensors (mergekit; a negative weight flips what the adapter
  contributes). PEFT elects on unweighted tensors: identical whenever the weights are equal and positive;
- TIES' disjoint merge divides by the number of agreeing non-zero entries (paper, PEFT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgefuse.adapters import LoraModule
from edgefuse.fusion import lowrank
from edgefuse.fusion.context import Ctx, present

BLOCK = 1 << 16  # elements per adapter and row block: K blocks and their temporaries stay small (and in cache)


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


class FactorRows:
    """Rows of ``coef·scale·B·A`` (float32), computed on demand from a LoRA module's factors."""

    def __init__(self, mod, coef: float = 1.0):
        self.B = mod.B.float() * (mod.scale * coef)
        self.A = mod.A.float()
        self.shape = (self.B.shape[0], self.A.shape[1])
        self.dtype, self.device = self.A.dtype, self.A.device

    def rows(self, s: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``s`` (into ``out`` if given, else a fresh tensor the caller may modify)."""
        return torch.mm(self.B[s], self.A, out=out)


class TensorRows:
    """Rows of an existing tensor seen as (first dim × the rest)."""

    def __init__(self, t: torch.Tensor):
        self.t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
        self.shape = tuple(self.t.shape)
        self.dtype, self.device = t.dtype, t.device

    def rows(self, s: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.t[s].clone() if out is None else out.copy_(self.t[s])


def row_blocks(shape: tuple[int, int], target: int | None = None) -> list[slice]:
    """Split the rows of a matrix into consecutive ranges of about ``target`` elements each.

    Args:
        shape: (rows, cols) of the matrix.
        target: elements per range (default `BLOCK`); a range holds at least one row.

    Returns:
        Slices covering ``range(rows)`` in order.
    """
    rows, cols = shape
    step = max(1, (target or BLOCK) // max(1, cols))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def keep_count(fraction: float, n: int, *, up: bool) -> int:
    """⌈fraction·n⌉ (``up``) or ⌊fraction·n⌋, where a product within float rounding of an integer is that integer.

    Why: densities are written as decimals, and the binary float of 0.1 times 10 is 1.0000000000000000555, whose
    ceiling would keep 2 entries, not 1 (and ⌊0.29·100⌋ would be 28).
    """
    x = fraction * n
    if abs(x - round(x)) <= 1e-9 * max(1.0, abs(x)):
        return int(round(x))
    return math.ceil(x) if up else math.floor(x)


@dataclass(frozen=True)
class Cut:
    """The k-th largest magnitude ``t`` of one adapter, with how many entries lie above it (``gt``) and at it
    (``eq``): the top k are the ``gt`` entries above t and the first ``k − gt`` of the ``eq`` tied ones."""

    t: torch.Tensor
    gt: int
    eq: int
    k: int

    @property
    def partial(self) -> bool:
        """The cut runs through a group of ties of non-zero magnitude (a threshold alone would keep them all)."""
        return self.k - self.gt < self.eq and float(self.t) > 0


def _kth_largest(a: torch.Tensor, k: int, buf: torch.Tensor | None = None) -> Cut:
    """Exact k-th largest entry (1 ≤ k ≤ numel) of the non-negative tensor ``a``, faster than ``kthvalue``, with
    the numbers of entries above it and equal to it.

    A random sample brackets the answer in [lo, hi]; with c entries above hi, the answer is the (k−c)-th
    largest of the few entries inside the bracket, which also holds every entry equal to it and every entry
    between it and hi. Counting runs over chunks into reused buffers (c > hi counted as Σ sign(relu(c − hi)),
    exact for floats), so the workspace is a chunk. If the bracket misses, fall back to a full selection.
    """
    flat = a.reshape(-1)
    n = flat.numel()
    if n > 1 << 16:
        idx = torch.randint(n, (8192,), generator=torch.Generator().manual_seed(n)).to(a.device)
        sample = flat[idx]  # random, not strided: low-rank ΔW has periodic structure
        ns = sample.numel()
        pos = (1 - k / n) * (ns - 1)
        margin = int(4 * (ns * (k / n) * (1 - k / n)) ** 0.5) + 8
        lo = torch.kthvalue(sample, max(0, int(pos) - margin) + 1).values
        hi = torch.kthvalue(sample, min(ns - 1, int(pos) + 1 + margin) + 1).values
        buf = torch.empty(1 << 16, dtype=a.dtype, device=a.device) if buf is None else buf.reshape(-1)
        chunks = flat.split(buf.numel())
        ge, le = (torch.empty(buf.numel(), dtype=torch.bool, device=a.device) for _ in range(2))
        above = 0
        for c in chunks:
            above += int(torch.sub(c, hi, out=buf[: c.numel()]).relu_().sign_().sum())
        need = k - above
        if need > 0:
            parts = []
            for c in chunks:
                m, m2 = ge[: c.numel()], le[: c.numel()]
                torch.ge(c, lo, out=m)
                parts.append(c[m.logical_and_(torch.le(c, hi, out=m2))])
            band = torch.cat(parts)
            if band.numel() >= need:
                t = torch.kthvalue(band, band.numel() - need + 1).values
                return Cut(t, above + int((band > t).sum()), int((band == t).sum()), k)
    t = torch.kthvalue(flat, n - k + 1).values
    return Cut(t, int((flat > t).sum()), int((flat == t).sum()), k)


def _below(t: torch.Tensor) -> float:
    """The largest value of t's dtype below the scalar t (≥ 0): |x| > _below(t) ⇔ |x| ≥ t, for ``hardshrink``."""
    return float(torch.nextafter(t, torch.zeros_like(t)))


@dataclass(frozen=True)
class Trim:
    """The entries one adapter keeps: ``lo ≤ |x| < hi`` as ``hardshrink`` thresholds (None: that side unbounded),
    except the tied entries at ``ties`` (ascending flat row-major indices), kept where ``keep`` is 1."""

    lo: float | None
    hi: float | None
    ties: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    def fixes(self, s: slice, cols: int):
        """(indices within the row block ``s``, keep flags) of the tied entries there, or None."""
        if self.ties is None:
            return None
        i0, i1 = (int(torch.searchsorted(self.ties, x)) for x in (s.start * cols, s.stop * cols))
        return (self.ties[i0:i1] - s.start * cols, self.keep[i0:i1]) if i1 > i0 else None


def _tie_fixes(a: torch.Tensor, lo: Cut | None, hi: Cut | None, dtype):
    """Where a cut runs through tied magnitudes: every entry of that group, and whether it is kept, by the tie
    rule (earlier row-major position ranks higher). Rare with float data, so built only when needed."""
    values = {float(c.t) for c in (lo, hi) if c is not None and c.partial}
    if not values:
        return None, None
    flat = a.reshape(-1)
    idx, keep = [], []
    for v in sorted(values):
        at = (flat == v).nonzero().flatten()  # ascending: rank in the group = row-major order
        rank = torch.arange(at.numel(), device=at.device)
        whole = lo is None or float(lo.t) != v  # v = hi.t > lo.t: the whole group ranks within top + keep
        kept = torch.ones_like(rank, dtype=torch.bool) if whole else rank < lo.k - lo.gt
        if hi is not None and float(hi.t) == v:  # its first hi.k − hi.gt are among the dropped outliers
            kept &= rank >= hi.k - hi.gt
        idx.append(at)
        keep.append(kept.to(dtype))
    idx, keep = torch.cat(idx), torch.cat(keep)
    order = torch.argsort(idx)
    return idx[order], keep[order]


def _trim(src, recipe: Recipe, density: float, gamma: float, blocks: list[slice], buf, a: torch.Tensor):
    """The `Trim` of one adapter (None: it keeps nothing): the entries ranked top+1 … top+keep by magnitude,
    where keep = ⌈density·n⌉ and top = ⌊gamma·n⌋ for breadcrumbs, else 0 (magnitude pruning is breadcrumbs
    without the outliers). |ΔW_k| is assembled in ``a`` with the same products (into the same block buffer) as
    pass 2, so both passes see the same values."""
    rows, cols = src.shape
    n = rows * cols
    top = keep_count(gamma, n, up=False) if recipe.sparsify == "breadcrumbs" else 0
    keep = min(keep_count(density, n, up=True), n - top)
    if keep <= 0:
        return None
    if top == 0 and keep >= n:
        return Trim(None, None)
    for s in blocks:
        torch.abs(src.rows(s, out=buf[: s.stop - s.start]), out=a[s])
    lo = _kth_largest(a, top + keep, buf) if top + keep < n else None
    hi = _kth_largest(a, top, buf) if top > 0 else None
    ties, flags = _tie_fixes(a, lo, hi, a.dtype)
    return Trim(None if lo is None else _below(lo.t), None if hi is None else _below(hi.t), ties, flags)


def _mask_(t: torch.Tensor, lo: float | None, hi: float | None, tmp: torch.Tensor) -> None:
    """Keep the entries with lo ≤ |x| < hi: hardshrink(x, lo⁻) − hardshrink(x, hi⁻), exact and all-float."""
    if hi is not None:
        t.sub_(torch.hardshrink(t, hi, out=tmp))
    if lo is not None:
        torch.hardshrink(t, lo, out=t)


def _trim_(t: torch.Tensor, trim: Trim | None, s: slice, tmp: torch.Tensor) -> None:
    """Apply one adapter's `Trim` to its row block ``s`` (in place): thresholds, then the tie rule."""
    if trim is None:
        t.zero_()
        return
    fix = trim.fixes(s, t.shape[1])
    if fix is not None:
        vals = t.view(-1)[fix[0]]
    _mask_(t, trim.lo, trim.hi, tmp)
    if fix is not None:
        t.view(-1)[fix[0]] = vals * fix[1]


def _streams(generators, sources) -> list[torch.Generator]:
    """One random stream per source. A generator shared by several sources (one stream over adapters, PEFT's
    order) is split: each earlier source gets a copy of its state, and the shared one skips that source's
    draws, so blocked draws equal the sequential full-tensor draws."""
    gens = [torch.default_generator if g is None else g for g in generators]
    out = []
    for k, (g, src) in enumerate(zip(gens, sources)):
        if any(h is g for h in gens[k + 1 :]):
            own = torch.Generator(device=g.device)
            own.set_state(g.get_state())
            n = src.shape[0] * src.shape[1]
            for i in range(0, n, 1 << 20):
                torch.rand(min(1 << 20, n - i), generator=g, dtype=src.dtype)
            out.append(own)
        else:
            out.append(g)
    return out


def _drop_(t: torch.Tensor, density: float, gen: torch.Generator, rescale: bool, tmp: torch.Tensor) -> None:
    """Keep x where u < density (u ~ U[0, 1) from ``gen``), as t·sign(relu(density − u)): exact, all-float."""
    torch.rand(t.shape, generator=gen, dtype=t.dtype, out=tmp)
    d = float(torch.tensor(density, dtype=t.dtype))  # the comparison runs in t's precision, like bernoulli's
    t.mul_(tmp.neg_().add_(d).relu_().sign_())
    if rescale:
        t.div_(density)


def _combine(parts: list[torch.Tensor], recipe: Recipe, majority: str, out: torch.Tensor, w) -> None:
    """Merge the weighted, sparsified blocks of one row range (consumed) into ``out``.

    TIES with elected sign s = ±1 (s = +1 where the election ties at 0): an entry agrees when s·x > 0, so the
    agreeing mass is s·Σ relu(s·x_k) and the count Σ sign(relu(s·x_k)) — the same sums as masking, all-float.
    """
    tmp, count, sgn = w["tmp"], None, None
    if recipe.consensus:
        el, count = w["el"], w["count"]
        if majority == "total":
            el.copy_(parts[0])
            for p in parts[1:]:
                el.add_(p)
        else:
            torch.sign(parts[0], out=el)
            for p in parts[1:]:
                el.add_(torch.sign(p, out=tmp))
        sgn = torch.copysign(w["ones"], el, out=el)  # ±0 only when every entry is 0: nothing agrees either way
        count.zero_()
        for p in parts:
            p.mul_(sgn).relu_()
            count.add_(torch.sign(p, out=tmp))
    elif recipe.combine == "disjoint_mean":
        count = w["count"].zero_()
        for p in parts:
            count.add_(torch.sign(p, out=tmp).abs_())
    out.copy_(parts[0])
    for p in parts[1:]:
        out.add_(p)
    if sgn is not None:
        out.mul_(sgn)
    if recipe.combine == "disjoint_mean":
        out.div_(count.clamp_min_(1.0))


def merge_rows(
    sources,
    weights: list[float],
    recipe: Recipe,
    *,
    density: float = 1.0,
    gamma: float = 0.0,
    majority: str = "total",
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Merge K task tensors with ``recipe``, one row block at a time.

    Every block operation writes into buffers allocated once per call (K + 4 blocks), so the allocator is
    not involved per block.

    Args:
        sources: one row source (`FactorRows`, `TensorRows`) per adapter that has this module; an adapter
            without it is a zero update and contributes nothing to any recipe, so it is simply left out.
        weights: one weight per source, applied after sparsification.
        recipe: which shared steps run.
        density: fraction of entries kept by the sparsifier.
        gamma: breadcrumbs only, the fraction of largest-magnitude outliers dropped.
        majority: TIES sign election by ``'total'`` mass or by ``'frequency'``.
        generators: one random stream per source for random drops (None: the default generator).

    Returns:
        The merged (rows × cols) tensor in the sources' dtype.
    """
    if majority not in ("total", "frequency"):
        raise ValueError(f"majority must be 'total' or 'frequency', not {majority!r}")
    if recipe.sparsify not in ("none", "magnitude", "random", "breadcrumbs"):
        raise ValueError(f"unknown sparsifier {recipe.sparsify!r}")
    shape, dtype, device = sources[0].shape, sources[0].dtype, sources[0].device
    blocks = row_blocks(shape)
    step = blocks[0].stop
    new = lambda: torch.empty((step, shape[1]), dtype=dtype, device=device)  # noqa: E731
    parts = [new() for _ in sources]
    w = {"tmp": new(), "el": new(), "count": new(), "ones": new().fill_(1.0)}
    out = torch.empty(shape, dtype=dtype, device=device)  # also pass 1's |ΔW_k| buffer: one dense tensor
    trims = streams = None
    if recipe.sparsify in ("magnitude", "breadcrumbs"):
        trims = [_trim(src, recipe, density, gamma, blocks, parts[k], out) for k, src in enumerate(sources)]
    elif recipe.sparsify == "random" and density < 1:
        streams = _streams(generators or [None] * len(sources), sources)
    for s in blocks:
        n = s.stop - s.start
        views = []
        for k, src in enumerate(sources):
            t = src.rows(s, out=parts[k][:n])
            if trims is not None:
                _trim_(t, trims[k], s, w["tmp"][:n])
            elif streams is not None:
                _drop_(t, density, streams[k], recipe.rescale, w["tmp"][:n])
            if weights[k] != 1:
                t.mul_(weights[k])
            views.append(t)
        _combine(views, recipe, majority, out[s], {key: b[:n] for key, b in w.items()})
    return out


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
) -> torch.Tensor:
    """`merge_rows` on a stack of K task tensors of one shape.

    Args:
        T: a K×… tensor or a list of K tensors.
        weights, recipe, density, gamma, majority: as in `merge_rows`.
        generators: one random stream per slot k (None: the default generator).
        present: ``present[k]`` False marks an adapter that lacks this module (a zero slot): it is neither
            sparsified nor drawn for, so random streams match a merge of only the present adapters.

    Returns:
        The merged tensor, in the shape of one task tensor.
    """
    K = len(T)
    present = present or [True] * K
    generators = generators or [None] * K
    keep = [k for k in range(K) if present[k]]
    out = merge_rows(
        [TensorRows(T[k]) for k in keep],
        [weights[k] for k in keep],
        recipe,
        density=density,
        gamma=gamma,
        majority=majority,
        generators=[generators[k] for k in keep],
    )
    return out.view(T[keep[0]].shape)


def merge_module(mods: list[LoraModule | None], weights: list[float], ctx: Ctx) -> LoraModule:
    """The element-wise family's kernel: merge ONE module's dense updates with ``ctx.recipe``, row block by row
    block (never the K dense ΔW at once), then re-factorise the merged ΔW exactly to ``ctx.rank``.

    TIES (Yadav et al., NeurIPS 2023): each adapter keeps exactly its top ⌈density·n⌉ |entries| of the module,
    ties at the cut going to the earlier row-major position; the sign is elected on the weighted sum, and the
    agreeing entries are averaged (module docstring: every convention).

    Args:
        mods: the module of each of the K adapters (None where an adapter lacks it).
        weights: one weight per adapter.
        ctx: the method's recipe, density, gamma, majority, solver and random streams for this module.

    Returns:
        The merged module at rank ``ctx.rank`` (default: the largest input rank), scale 1.
    """
    items = present(mods)
    merged = merge_rows(
        [FactorRows(m) for _, m in items],
        [weights[k] for k, _ in items],
        ctx.recipe,
        density=ctx.density,
        gamma=ctx.gamma,
        majority=ctx.majority,
        generators=[ctx.generator(k) for k, _ in items] if ctx.recipe.sparsify == "random" else None,
    )
    rank = ctx.rank or max(x.rank for _, x in items)
    return lowrank.dense_truncated_svd(
        merged, rank, ctx.svd_solver, generator=torch.Generator().manual_seed(ctx.seed)
    )
