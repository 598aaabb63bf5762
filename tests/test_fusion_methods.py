"""Each method against a dense computation written here from the papers' definitions."""

import hashlib
import math
from fractions import Fraction

import pytest
import torch
from helpers.fusion import NAMES, deltas, kept_mask, make_adapters, ref_elementwise, rel, truncated

from edgefuse.adapters import LoraAdapter, LoraModule
from edgefuse.errors import EdgefuseError
from edgefuse.fusion import elementwise, fuse_adapters, lowrank

W = [0.5, 1.5, -0.7]


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def ads():
    return make_adapters()


@pytest.fixture(params=["one block", "tiny blocks"])
def blocks(request, monkeypatch):
    """Element-wise merges run row block by row block; at test sizes a module is one block unless the block
    is made tiny (1–2 rows), which exercises the multi-block paths (thresholds, random streams, consensus)."""
    if request.param == "tiny blocks":
        monkeypatch.setattr(elementwise, "BLOCK", 40)
    return request.param


def test_linear_cat_task_arithmetic_exact(ads):
    for name in NAMES:
        ds = deltas(ads, name)
        s = sum(w * d for w, d in zip(W, ds))
        lin, _ = fuse_adapters(ads, "linear", W)
        assert rel(lin.modules[name].delta(), s / sum(W)) <= 1e-5
        cat, _ = fuse_adapters(ads, "cat", W)
        assert cat.modules[name].rank == 12 and rel(cat.modules[name].delta(), s) <= 1e-5
        ta, _ = fuse_adapters(ads, "task_arithmetic", W, scaling=0.3)
        assert rel(ta.modules[name].delta(), 0.3 * s) <= 1e-5


def test_svd_equals_dense_truncated_svd(ads):
    for r in (1, 3, 6):
        out, _ = fuse_adapters(ads, "svd", W, rank=r)
        for name in NAMES:
            s = sum(w * d for w, d in zip(W, deltas(ads, name)))
            assert out.modules[name].rank == r
            assert rel(out.modules[name].delta(), truncated(s, r)) <= 1e-5
    # linear/task_arithmetic with a chosen rank are the same exact truncation
    ta, _ = fuse_adapters(ads, "task_arithmetic", W, rank=3)
    name = next(iter(NAMES))
    assert (
        rel(ta.modules[name].delta(), truncated(sum(w * d for w, d in zip(W, deltas(ads, name))), 3)) <= 1e-5
    )


@pytest.mark.parametrize(
    "method,kw",
    [
        ("ties", dict(trim="magnitude", elect=True)),
        ("magnitude_prune", dict(trim="magnitude")),
        ("breadcrumbs", dict(trim="breadcrumbs", gamma=0.05)),
        ("breadcrumbs_ties", dict(trim="breadcrumbs", gamma=0.05, elect=True)),
    ],
)
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_elementwise_equals_dense_reference(ads, method, kw, majority, blocks):
    if majority == "frequency" and not kw.get("elect"):
        pytest.skip("majority only matters with sign election")
    density = 0.3
    params = {"gamma": kw["gamma"]} if "gamma" in kw else {}
    if kw.get("elect"):
        params["majority"] = majority
    full, _ = fuse_adapters(ads, method, W, rank=16, density=density, **params)
    low, _ = fuse_adapters(ads, method, W, rank=4, density=density, **params)
    for name in NAMES:
        ref = ref_elementwise(deltas(ads, name), W, density=density, majority=majority, **kw)
        assert rel(full.modules[name].delta(), ref) <= 1e-5
        assert rel(low.modules[name].delta(), truncated(ref, 4)) <= 1e-5


def _dare_masks(ads, density, seed):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name in NAMES:  # natural order == insertion order here
        masks[name] = [
            torch.bernoulli(torch.full(a.modules[name].shape, density), generator=g).double() for a in ads
        ]
    return masks


@pytest.mark.parametrize("method,elect", [("dare_linear", False), ("dare_ties", True)])
def test_dare_fixed_seed_equals_reference(ads, method, elect, blocks):
    density, seed = 0.6, 7
    out, _ = fuse_adapters(ads, method, W, rank=16, density=density, seed=seed, rng="sequential")
    masks = _dare_masks(ads, density, seed)
    for name in NAMES:
        ref = ref_elementwise(
            deltas(ads, name), W, trim="random", density=density, masks=masks[name], rescale=True, elect=elect
        )
        assert rel(out.modules[name].delta(), ref) <= 1e-5
    again, _ = fuse_adapters(ads, method, W, rank=16, density=density, seed=seed)
    other, _ = fuse_adapters(ads, method, W, rank=16, density=density, seed=seed + 1)
    name = next(iter(NAMES))
    assert torch.equal(
        again.modules[name].A,
        fuse_adapters(ads, method, W, rank=16, density=density, seed=seed)[0].modules[name].A,
    )
    assert rel(again.modules[name].delta(), other.modules[name].delta()) > 0.05


def _module_stream(seed, name, k):
    """rng='module' (the default): adapter k's stream for a module is seeded by SHA-256 of "seed:name:k"."""
    digest = hashlib.sha256(f"{seed}:{name}:{k}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@pytest.mark.parametrize("method,elect", [("dare_linear", False), ("dare_ties", True)])
def test_dare_module_streams_equal_reference(ads, method, elect, blocks):
    """Default streams: one per (seed, module, adapter), so masks do not depend on module order or blocking."""
    density, seed = 0.4, 5
    out, _ = fuse_adapters(ads, method, W, rank=16, density=density, seed=seed)
    for name in NAMES:
        masks = [
            torch.bernoulli(torch.full(a.modules[name].shape, density), generator=_module_stream(seed, name, k))
            for k, a in enumerate(ads)
        ]
        ref = ref_elementwise(
            deltas(ads, name), W, trim="random", density=density, masks=masks, rescale=True, elect=elect
        )
        assert rel(out.modules[name].delta(), ref) <= 1e-5


def test_elementwise_large_module_against_reference():
    """A module above the sampling threshold of the exact k-th-magnitude selection (64k entries) and wider
    than one row block, re-factorised by the default solver: still the dense reference, truncated exactly."""
    name = "model.layers.0.mlp.up_proj"
    big = make_adapters(names={name: (400, 300)}, ranks=(6, 5, 7), scales=(1.0, 1.0, 1.0))
    ds = deltas(big, name)
    cases = [
        ("ties", dict(trim="magnitude", elect=True), {}),
        ("magnitude_prune", dict(trim="magnitude"), {}),
        ("breadcrumbs_ties", dict(trim="breadcrumbs", gamma=0.02, elect=True), {"gamma": 0.02}),
    ]
    for method, kw, params in cases:
        out, _ = fuse_adapters(big, method, W, rank=8, density=0.35, **params)
        ref = ref_elementwise(ds, W, density=0.35, **kw)
        assert rel(out.modules[name].delta(), truncated(ref, 8)) <= 1e-5, method
    out, _ = fuse_adapters(big, "dare_ties", W, rank=8, density=0.35, seed=2)
    masks = [torch.bernoulli(torch.full((400, 300), 0.35), generator=_module_stream(2, name, k)) for k in range(3)]
    ref = ref_elementwise(ds, W, trim="random", density=0.35, masks=masks, rescale=True, elect=True)
    assert rel(out.modules[name].delta(), truncated(ref, 8)) <= 1e-5


def _one_product_modules(K, m, n, r, seed, integers=False):
    """K LoRA modules whose rank-one parts touch disjoint columns (A has one non-zero per column) and whose scale
    is a power of two, so every ΔW entry is ONE product: float32 rounds it once, however it is blocked, and the
    float64 product rounded to float32 is the same number. ``integers``: small integers, many tied magnitudes."""
    g = torch.Generator().manual_seed(seed)
    mods = []
    for _ in range(K):
        owner = torch.randint(r, (n,), generator=g)
        if integers:
            a, B = torch.randint(1, 4, (n,), generator=g).float(), torch.randint(-3, 4, (m, r), generator=g).float()
            a = a * (torch.randint(2, (n,), generator=g) * 2 - 1)
        else:
            a, B = torch.randn(n, generator=g), torch.randn(m, r, generator=g)
        A = torch.zeros(r, n)
        A[owner, torch.arange(n)] = a
        mods.append(LoraModule(A, B, 0.5))
    return mods


def _float32_deltas(mods):
    """Each ΔW as the float32 numbers the adapters define (exact: one product per entry), held in float64."""
    return [(m.scale * m.B.double() @ m.A.double()).float().double() for m in mods]


def _dense_ties(ds, weights, density):
    """TIES written out (Yadav et al. 2023, §3): trim each ΔW_k to its exact top-⌈density·n⌉ |entries| (ties to
    the earlier row-major position), elect the sign of Σ_k w_k·trimmed_k, average the agreeing non-zero entries."""
    n = ds[0].numel()
    keep = math.ceil(Fraction(repr(density)) * n)
    T = []
    for d, w in zip(ds, weights):
        order = torch.argsort(d.abs().flatten(), descending=True, stable=True)
        mask = torch.zeros(n, dtype=torch.float64)
        mask[order[:keep]] = 1
        T.append(w * d * mask.view_as(d))
    T = torch.stack(T)
    sign = torch.where(T.sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(T) == sign).double()
    return (T * agree).sum(0) / agree.sum(0).clamp(min=1)


_TIES = elementwise.Recipe(sparsify="magnitude", consensus=True, combine="disjoint_mean")
_TRIM = elementwise.Recipe(sparsify="magnitude")


@pytest.mark.parametrize("shape", [(192, 576), (24, 40)])  # SmolLM2's k_proj (sampled k-th selection), a small one
@pytest.mark.parametrize("density", [0.5, 0.37])  # 0.37·n is not an integer: ⌈·⌉ and int() differ by one entry
def test_ties_trim_is_the_exact_top_k_of_dense_ties(shape, density, blocks):
    """The merged ΔW of TIES equals an independent dense TIES at 1e-6, and each adapter keeps exactly
    ⌈density·n⌉ entries — the very entries of a dense top-k — when no magnitudes tie at the cut."""
    mods = _one_product_modules(2, *shape, r=8, seed=3)
    ds = _float32_deltas(mods)
    keep = math.ceil(Fraction(repr(density)) * ds[0].numel())
    merged = elementwise.merge_rows([elementwise.FactorRows(m) for m in mods], [1.0, 1.0], _TIES, density=density)
    assert rel(merged, _dense_ties(ds, [1.0, 1.0], density)) <= 1e-6
    for m, d in zip(mods, ds):
        mags = d.abs().flatten().sort(descending=True).values
        assert mags[keep - 1] != mags[keep] and mags[keep] > 0  # no tie at the cut, nothing zero kept
        kept = elementwise.merge_rows([elementwise.FactorRows(m)], [1.0], _TRIM, density=density) != 0
        assert int(kept.sum()) == keep
        assert torch.equal(kept, kept_mask(d, density))
    W3 = [0.5, 1.5, -0.7]  # weighted, three adapters: the same reference with weights before the election
    mods3 = _one_product_modules(3, *shape, r=8, seed=4)
    merged = elementwise.merge_rows([elementwise.FactorRows(m) for m in mods3], W3, _TIES, density=density)
    assert rel(merged, _dense_ties(_float32_deltas(mods3), W3, density)) <= 1e-6


@pytest.mark.parametrize("shape", [(192, 576), (24, 40)])
def test_tie_rule_keeps_exactly_k_ties_by_row_major_position(shape, blocks):
    """Integer factors: magnitudes tie by the thousand. The trim still keeps exactly ⌈density·n⌉ entries, the tied
    ones at the cut in row-major order (breadcrumbs likewise at both cuts), and TIES equals the dense reference."""
    mods = _one_product_modules(2, *shape, r=3, seed=5, integers=True)
    ds = _float32_deltas(mods)
    density, gamma = 0.37, 0.05
    keep = math.ceil(Fraction(repr(density)) * ds[0].numel())
    for m, d in zip(mods, ds):
        mags = d.abs().flatten().sort(descending=True).values
        assert mags[keep - 1] == mags[keep] > 0  # the cut runs through a group of ties
        kept = elementwise.merge_rows([elementwise.FactorRows(m)], [1.0], _TRIM, density=density) != 0
        assert int(kept.sum()) == keep and torch.equal(kept, kept_mask(d, density))
        crumbs = elementwise.Recipe(sparsify="breadcrumbs")
        kept = elementwise.merge_rows([elementwise.FactorRows(m)], [1.0], crumbs, density=density, gamma=gamma) != 0
        assert torch.equal(kept, kept_mask(d, density, gamma))
    merged = elementwise.merge_rows([elementwise.FactorRows(m) for m in mods], [1.0, 1.0], _TIES, density=density)
    assert rel(merged, _dense_ties(ds, [1.0, 1.0], density)) <= 1e-6


def test_tie_rule_when_every_magnitude_ties(blocks):
    """All |x| equal: magnitude pruning keeps the first ⌈density·n⌉ entries in row-major order, breadcrumbs the
    next ⌈density·n⌉ after the first ⌊gamma·n⌋ (both cuts inside one group of ties)."""
    m, n = 30, 20
    signs = torch.where(torch.rand(1, n, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)
    mod = LoraModule(signs, torch.ones(m, 1), 1.0)
    src = [elementwise.FactorRows(mod)]
    kept = (elementwise.merge_rows(src, [1.0], _TRIM, density=0.37) != 0).flatten()
    assert torch.equal(kept.nonzero().flatten(), torch.arange(222))  # ⌈0.37·600⌉ = 222
    crumbs = elementwise.Recipe(sparsify="breadcrumbs")
    kept = (elementwise.merge_rows(src, [1.0], crumbs, density=0.37, gamma=0.05) != 0).flatten()
    assert torch.equal(kept.nonzero().flatten(), torch.arange(30, 252))  # ⌊0.05·600⌋ = 30 dropped first


def test_keep_count_rounds_the_decimal_not_the_binary_float():
    assert elementwise.keep_count(0.1, 10, up=True) == 1  # 0.1·10 = 1.0000000000000000555 in binary
    assert elementwise.keep_count(0.29, 100, up=False) == 29  # 28.999999999999996
    assert elementwise.keep_count(0.37, 600, up=True) == 222 and elementwise.keep_count(0.37, 601, up=True) == 223
    assert elementwise.keep_count(0.05, 599, up=False) == 29
    assert elementwise.keep_count(1e-6, 16, up=True) == 1  # any density > 0 keeps an entry
    (a,) = make_adapters(K=1, ranks=(2,), names={"model.layers.0.self_attn.q_proj": (4, 4)})
    out, _ = fuse_adapters([a], "magnitude_prune", rank=4, density=0.01)
    d = a.modules["model.layers.0.self_attn.q_proj"].delta()
    assert rel(out.modules["model.layers.0.self_attn.q_proj"].delta(), d * kept_mask(d, 0.01)) <= 1e-6


def _spectrum_matrix(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (150, 150), (40, 7)])
def test_default_solver_is_the_exact_truncation(shape):
    """Default re-factorisation = the float64 SVD truncation of the same float32 matrix (tall, wide, square,
    rank ≥ min dimension), far closer than a float32 LAPACK SVD is; 'auto' is the same solver."""
    g = torch.Generator().manual_seed(1)
    m, n = shape
    # a flat spectrum, like a sparsified merge: many similar singular values around the cut
    M = (torch.randn(m, n, generator=g) + 0.5 * torch.randn(m, 12, generator=g) @ torch.randn(12, n, generator=g))
    for r in (1, 6, 10, min(m, n)):
        ref = truncated(M, r)
        out = lowrank.dense_truncated_svd(M, r)
        assert out.rank == min(r, m, n)
        assert rel(out.B @ out.A, ref) <= 1e-6, r
        lapack = lowrank.dense_truncated_svd(M, r, "exact")
        assert rel(lapack.B @ lapack.A, ref) <= 1e-4
        auto = lowrank.dense_truncated_svd(M, r, "auto")
        assert torch.equal(auto.A, out.A) and torch.equal(auto.B, out.B)


def test_default_solver_degenerate_and_zero():
    # σ_4 = σ_5: the rank-4 truncation is not unique; any answer must reach the optimal error √Σ_{i>4} σ_i²
    s = [5.0, 4.0, 3.0, 2.0, 2.0, 1.0, 0.5]
    M = _spectrum_matrix(60, 30, s).float()
    out = lowrank.dense_truncated_svd(M, 4)
    err = float((M.double() - (out.B @ out.A).double()).norm())
    assert err == pytest.approx(sum(x * x for x in s[4:]) ** 0.5, rel=1e-5)
    # a rank-2 matrix asked for rank 4: exact, with zero extra directions
    M2 = _spectrum_matrix(50, 20, [3.0, 1.0]).float()
    out2 = lowrank.dense_truncated_svd(M2, 4)
    assert rel(out2.B @ out2.A, M2) <= 1e-6 and torch.isfinite(out2.A).all()
    zero = lowrank.dense_truncated_svd(torch.zeros(30, 20), 3)
    assert float(zero.A.abs().sum() + zero.B.abs().sum()) == 0
    with pytest.raises(ValueError, match="valid: gram, exact, randomized, auto"):
        lowrank.dense_truncated_svd(M, 2, "nope")


@pytest.mark.parametrize("m,n,R", [(300, 120, 24), (120, 300, 24), (40, 30, 64)])
def test_factored_truncation_is_the_dense_truncation(m, n, R):
    """`lowrank.truncate` (two R×R Gram eigendecompositions) = float64 SVD truncation of the dense B @ A:
    for a steep spectrum, for stacked factors that are rank-deficient (the same adapter twice, as after a
    round that started every edge from one fused model), for R larger than the matrix, and for zero."""
    g = torch.Generator().manual_seed(3)
    B = torch.randn(m, R, generator=g) * torch.logspace(0, -4, R)
    A = torch.randn(R, n, generator=g)
    half = R // 2
    dup_B, dup_A = torch.cat([B[:, :half], 2 * B[:, :half]], 1), torch.cat([A[:half], A[:half]], 0)
    for Bx, Ax in ((B, A), (dup_B, dup_A)):
        M = Bx.double() @ Ax.double()
        for r in (1, 5, R // 2, R):
            out = lowrank.truncate(Bx, Ax, r)
            assert out.rank == min(r, R)
            assert rel(out.B @ out.A, truncated(M, r)) <= 2e-6, (r, Bx is B)
            assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    zero = lowrank.truncate(torch.zeros(m, 4), A[:4], 3)
    assert zero.rank == 3 and float(zero.A.abs().sum() + zero.B.abs().sum()) == 0


def test_all_finite_sum_fast_path():
    """A sum that overflows from finite values must not be mistaken for NaN/Inf; NaN and Inf are caught."""
    from edgefuse.adapters import all_finite

    assert all_finite(torch.full((8,), 3e38), torch.zeros(0), torch.arange(3))
    assert not all_finite(torch.ones(5), torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))
    assert not all_finite(torch.tensor([3e38, 3e38, float("inf")]))


def test_dare_mean_over_seeds_approaches_sum(ads):
    name = next(iter(NAMES))
    s = sum(w * d for w, d in zip(W, deltas(ads, name)))
    acc = torch.zeros_like(s)
    errs = {}
    for i in range(1, 201):
        out, _ = fuse_adapters(ads, "dare_linear", W, rank=16, density=0.5, seed=i)
        acc += out.modules[name].delta().double()
        if i in (10, 200):
            errs[i] = rel(acc / i, s)
    assert errs[200] < 0.12 and errs[200] < errs[10] / 2


def test_k1_identity_where_defined():
    (a,) = make_adapters(K=1, ranks=(4,))
    cases = [
        ("linear", {}),
        ("cat", {}),
        ("task_arithmetic", {}),
        ("svd", {}),
        ("lora_lego", {}),
        ("ties", {"density": 1.0}),
        ("dare_linear", {"density": 1.0}),
        ("dare_ties", {"density": 1.0}),
        ("magnitude_prune", {"density": 1.0}),
        ("knots", {"inner": "task_arithmetic"}),
        ("core_space", {"inner": "task_arithmetic"}),
        ("knots", {"density": 1.0}),
        ("core_space", {"density": 1.0}),
    ]
    for method, kw in cases:
        out, _ = fuse_adapters([a], method, **kw)
        for name in NAMES:
            assert rel(out.modules[name].delta(), a.modules[name].delta()) <= 1e-5, method


def test_missing_module_counts_as_zero(ads):
    name = "model.layers.1.mlp.up_proj"
    partial = [ads[0], LoraAdapter({k: v for k, v in ads[1].modules.items() if k != name}), ads[2]]
    ds = deltas(partial, name)
    assert float(ds[1].abs().sum()) == 0
    out, _ = fuse_adapters(partial, "cat", W)
    assert rel(out.modules[name].delta(), sum(w * d for w, d in zip(W, ds))) <= 1e-5
    out, _ = fuse_adapters(partial, "ties", W, rank=16, density=0.4)
    assert (
        rel(out.modules[name].delta(), ref_elementwise(ds, W, trim="magnitude", density=0.4, elect=True))
        <= 1e-5
    )


def test_lora_lego_permutation_invariance_and_concat_sum(ads):
    perm_ads = []
    g = torch.Generator().manual_seed(3)
    for a in reversed(ads):  # permuted adapter order and permuted rank units
        mods = {}
        for n, m in a.modules.items():
            p = torch.randperm(m.rank, generator=g)
            mods[n] = LoraModule(m.A[p], m.B[:, p], m.scale)
        perm_ads.append(LoraAdapter(mods))
    w_rev = list(reversed(W))
    x, _ = fuse_adapters(ads, "lora_lego", W, rank=5)
    y, _ = fuse_adapters(perm_ads, "lora_lego", w_rev, rank=5)
    for name in NAMES:
        assert x.modules[name].rank == 5
        assert rel(x.modules[name].delta(), y.modules[name].delta()) <= 1e-5
        # concatenation–summation equivalence: enough clusters for every unit → the exact weighted sum
        full, _ = fuse_adapters(perm_ads, "lora_lego", w_rev, rank=12)
        assert rel(full.modules[name].delta(), sum(w * d for w, d in zip(W, deltas(ads, name)))) <= 1e-5


def test_lora_lego_merges_duplicate_units_exactly():
    """Identical MSUs in two adapters form one cluster whose output reweighting restores their exact sum."""
    (a,) = make_adapters(K=1, ranks=(3,))
    out, _ = fuse_adapters([a, a], "lora_lego", [1.0, 1.0], rank=3)
    for name in NAMES:
        assert rel(out.modules[name].delta(), 2 * a.modules[name].delta()) <= 1e-5


def _knots_ref(ds, weights, density, rank):
    cat = torch.cat(ds, dim=1)
    U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
    keep = S > 1e-6 * S[0]  # deltas come from float32 products: drop rounding-noise directions
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    n = ds[0].shape[1]
    Vs = [Vh[:, k * n : (k + 1) * n].T for k in range(len(ds))]
    Vm = ref_elementwise(Vs, weights, trim="magnitude", density=density, elect=True)
    return truncated(U @ torch.diag(S) @ Vm.T, rank)


def _core_ref(ads, name, weights, density, rank):
    Bc = torch.cat([a.modules[name].B.double() * a.modules[name].scale for a in ads], dim=1)
    Ac = torch.cat([a.modules[name].A.double() for a in ads], dim=0)
    Ub = torch.linalg.svd(Bc, full_matrices=False)[0]
    Va = torch.linalg.svd(Ac, full_matrices=False)[2].T
    Ms = [Ub.T @ d @ Va for d in deltas(ads, name)]
    Mm = ref_elementwise(Ms, weights, trim="magnitude", density=density, elect=True)
    return truncated(Ub @ Mm @ Va.T, rank)


def test_knots_and_core_space_against_dense_reference(ads):
    w = [1.0, 0.8, 1.2]
    for r in (12, 4):
        k, _ = fuse_adapters(ads, "knots", w, rank=r, density=0.3)
        c, _ = fuse_adapters(ads, "core_space", w, rank=r, density=0.3)
        for name in NAMES:
            assert rel(k.modules[name].delta(), _knots_ref(deltas(ads, name), w, 0.3, r)) <= 1e-4
            assert rel(c.modules[name].delta(), _core_ref(ads, name, w, 0.3, r)) <= 1e-4
    for method in ("knots", "core_space"):  # linear inner merge is lossless
        out, _ = fuse_adapters(ads, method, W, rank=12, inner="task_arithmetic")
        for name in NAMES:
            assert rel(out.modules[name].delta(), sum(x * d for x, d in zip(W, deltas(ads, name)))) <= 1e-5


def test_randomized_solver_close_to_exact():
    ads = make_adapters(names={"model.layers.0.mlp.down_proj": (300, 200)}, ranks=(4, 4, 4))
    ex, _ = fuse_adapters(ads, "ties", rank=4, density=0.3, svd_solver="exact")
    rd, _ = fuse_adapters(ads, "ties", rank=4, density=0.3, svd_solver="randomized")
    name = "model.layers.0.mlp.down_proj"
    assert rel(rd.modules[name].delta(), ex.modules[name].delta()) < 0.05


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(method="nope"), "valid: linear, cat"),
        (dict(method="ties", density=0.0), "density must be in (0, 1]"),
        (dict(method="ties", density=1.5), "density must be in (0, 1]"),
        (dict(method="linear", density=0.5), "takes no density"),
        (dict(method="cat", rank=4), "exact concatenated rank"),
        (dict(method="svd", weights=[1.0]), "1 weights given for 3 adapters"),
        (dict(method="ties", foo=1), "no parameter(s) foo"),
        (dict(method="svd", cr="bogus"), "valid: element, direction, hybrid"),
    ],
)
def test_bad_arguments(ads, kwargs, msg):
    method = kwargs.pop("method")
    with pytest.raises(EdgefuseError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        fuse_adapters(ads, method, **kwargs)


def test_bad_tensors(ads):
    name = next(iter(NAMES))
    bad = LoraAdapter({name: LoraModule(ads[0].modules[name].A.clone(), ads[0].modules[name].B.clone())})
    bad.modules[name].A[0, 0] = float("nan")
    with pytest.raises(EdgefuseError, match="NaN or Inf"):
        fuse_adapters([ads[1], bad], "linear")
    wrong = LoraAdapter({name: LoraModule(torch.randn(2, 5), torch.randn(7, 2))})
    with pytest.raises(EdgefuseError, match="different shapes"):
        fuse_adapters([ads[1], wrong], "linear")


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_reports_every_module_once(ads, workers):
    """The CLI's and the runner's fusion bars: the module count first, then one step per fused module."""
    calls = []
    out, _ = fuse_adapters(ads, "ties", density=0.5, workers=workers,
                           progress=lambda k, total=None: calls.append((k, total)))
    assert calls[0] == (0, len(out.modules)) and len(out.modules) == len(NAMES)
    assert calls[1:] == [(1, None)] * len(out.modules)
