"""LoRA-CR ``activation`` on synthetic adapters and random module inputs: the module scores against a dense
computation, the RegMean step against the dense closed form (every module with share 1; only the flagged ones
otherwise, the rest bit-identical to the base method), selection by threshold and by share, a module built to
interfere flagged alone where the parameter cosine sees nothing, and the refusal without Gram matrices."""

import math

import pytest
import torch
from helpers.fusion import rel, truncated

from edgefuse.adapters import LoraAdapter, LoraModule
from edgefuse.errors import EdgefuseError
from edgefuse.fusion import fuse_adapters, resolve_conflicts

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

NAMES = {
    "model.layers.0.self_attn.q_proj": (24, 16),
    "model.layers.0.mlp.up_proj": (32, 16),
    "model.layers.1.self_attn.o_proj": (16, 24),
    "model.layers.1.mlp.down_proj": (16, 32),
}
TOKENS = 40  # above every d_in: the Grams are non-singular


def _inputs(K, seed=11):
    """Per domain: each module's inputs H (tokens × d_in), mixed by a domain-specific matrix so domains differ."""
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(TOKENS, d, generator=g, dtype=torch.float64)
             @ torch.randn(d, d, generator=g, dtype=torch.float64) for n, (_, d) in NAMES.items()}
            for _ in range(K)]


def _grams(H):
    return [{n: h.T @ h for n, h in dom.items()} for dom in H]


def _dense_deviation(adapters, fused_delta, H, name, weights):
    """‖(ΔW_f − ΔW_i) H_i‖ / ‖ΔW_i H_i‖ per edge (None for weight ≤ 0), straight from the dense matrices."""
    out = []
    for a, dom, w in zip(adapters, H, weights):
        if w <= 0:
            out.append(None)
            continue
        D = a.modules[name].delta(torch.float64)
        out.append(float(((fused_delta - D) @ dom[name].T).norm() / (D @ dom[name].T).norm()))
    return out


def _dense_regmean(adapters, grams, name, weights, alpha=0.9):
    """(Σ w_i ΔW_i G̃_i)(Σ w_i G̃_i)⁻¹, G̃ = αG + (1 − α) diag G (Jin et al. 2023), densely."""
    num, S = 0, 0
    for a, g, w in zip(adapters, grams, weights):
        G = g[name]
        Gt = alpha * G + (1 - alpha) * torch.diag(torch.diag(G))
        num = num + w * a.modules[name].delta(torch.float64) @ Gt
        S = S + w * Gt
    return torch.linalg.solve(S, num.T).T


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {}), ("ties", {"density": 0.5}),
                                       ("ties", {"density": 0.5, "rank": 3})])
def test_share_one_is_regmean_on_every_module(make_adapters, method, kw):
    ads = make_adapters(K=3, names=NAMES)
    grams = _grams(_inputs(3))
    fused, st = fuse_adapters(ads, method, grams=grams, cr="activation", cr_share=1.0, **kw)
    rank = kw.get("rank")  # RegMean keeps Σ r_k = 12 unless a rank is asked for (not ties' default of 6)
    for name in NAMES:
        want = _dense_regmean(ads, grams, name, [1.0] * 3)
        if rank is not None:
            want = truncated(want, rank)
        assert fused.modules[name].rank == (rank or 12)
        assert rel(fused.modules[name].delta(torch.float64), want) < 1e-5, name
    cr = st["cr"]
    assert cr["modules_flagged"] == cr["modules_total"] == 4 and cr["share_changed"] == 1.0
    assert cr["params_total"] == sum(m * n for m, n in NAMES.values())


def test_on_regmean_it_flags_but_changes_nothing(make_adapters):
    """The regmean method's modules already are RegMean's: flagged, kept as they are, counted as unchanged."""
    ads = make_adapters(K=3, names=NAMES)
    grams = _grams(_inputs(3))
    plain, _ = fuse_adapters(ads, "regmean", grams=grams)
    fused, st = fuse_adapters(ads, "regmean", grams=grams, cr="activation", cr_share=1.0)
    for name in NAMES:
        assert rel(fused.modules[name].delta(torch.float64), plain.modules[name].delta(torch.float64)) == 0, name
    cr = st["cr"]
    assert cr["modules_flagged"] == 4 and cr["params_changed"] == 0 and cr["share_changed"] == 0.0
    assert all(m["score_after"] == m["score"] for m in cr["modules"].values())


def test_subset_edits_only_the_top_modules(make_adapters):
    ads = make_adapters(K=3, names=NAMES, seed=4)
    H = _inputs(3, seed=5)
    grams = _grams(H)
    w = [1.0, 0.5, 2.0]
    plain, _ = fuse_adapters(ads, "ties", w, density=0.5)
    want_scores = {}
    for name in NAMES:
        dev = _dense_deviation(ads, plain.modules[name].delta(torch.float64), H, name, w)
        want_scores[name] = max(dev)
    ranked = sorted(NAMES, key=lambda n: -want_scores[n])
    assert want_scores[ranked[1]] > want_scores[ranked[2]] * (1 + 1e-6)  # a clear cut between 2nd and 3rd

    fused, st = fuse_adapters(ads, "ties", w, density=0.5, grams=grams, cr="activation", cr_share=0.5)
    cut = (want_scores[ranked[1]] + want_scores[ranked[2]]) / 2
    by_threshold, st_t = fuse_adapters(ads, "ties", w, density=0.5, grams=grams, cr="activation", cr_threshold=cut)
    for out, stats in ((fused, st), (by_threshold, st_t)):
        cr = stats["cr"]
        flagged = {n for n, e in cr["modules"].items() if e["flagged"]}
        assert flagged == set(ranked[:2]) and cr["modules_flagged"] == 2
        changed = sum(NAMES[n][0] * NAMES[n][1] for n in flagged)
        assert cr["params_changed"] == changed
        assert cr["share_changed"] == pytest.approx(changed / sum(m * n for m, n in NAMES.values()))
        for name in NAMES:
            assert cr["modules"][name]["score"] == pytest.approx(want_scores[name], rel=1e-5)
            got = out.modules[name]
            if name in flagged:
                want = _dense_regmean(ads, grams, name, w)
                assert rel(got.delta(torch.float64), want) < 1e-5, name
                assert cr["modules"][name]["changed_params"] == NAMES[name][0] * NAMES[name][1]
            else:  # the base method's module, bit for bit
                base = plain.modules[name]
                assert torch.equal(got.A, base.A) and torch.equal(got.B, base.B) and got.scale == base.scale, name
                assert cr["modules"][name]["changed_params"] == 0

    nothing, st0 = fuse_adapters(ads, "ties", w, density=0.5, grams=grams, cr="activation",
                                 cr_threshold=max(want_scores.values()) * 2)
    assert st0["cr"]["modules_flagged"] == 0 and st0["cr"]["share_changed"] == 0
    for name, m in nothing.modules.items():
        assert torch.equal(m.A, plain.modules[name].A) and torch.equal(m.B, plain.modules[name].B)


def test_scores_match_dense_and_weight_zero_edges_do_not_count(make_adapters):
    ads = make_adapters(K=3, names=NAMES, seed=8)
    H = _inputs(3, seed=9)
    w = [1.0, 0.0, 0.7]
    fused_plain, _ = fuse_adapters(ads, "task_arithmetic", w)
    _, st = fuse_adapters(ads, "task_arithmetic", w, grams=_grams(H), cr="activation", cr_threshold=0.0)
    for name, e in st["cr"]["modules"].items():
        want = _dense_deviation(ads, fused_plain.modules[name].delta(torch.float64), H, name, w)
        assert e["deviation"][1] is None and want[1] is None
        for got, ref in zip(e["deviation"], want):
            assert got is None or got == pytest.approx(ref, rel=1e-5), name
        assert e["score"] == pytest.approx(max(x for x in want if x is not None), rel=1e-5)


def _split_adapters(r=3, seed=0):
    """Two adapters that cannot conflict in parameter space (outputs in disjoint halves, so ⟨ΔW_0, ΔW_1⟩ = 0 and
    the cosine is 0 in every module) and that read disjoint input coordinates (domain 0: the first 8, domain 1: the
    last 8) — except in module ``INTERFERING``, where adapter 1 also reads domain 0's coordinates: there, and only
    there, ΔW_1 H_0 ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    mods = [{}, {}]
    for name in NAMES3:
        m, n = 24, 16
        for k in range(2):
            A = torch.zeros(r, n)
            A[:, 8 * k:8 * k + 8] = torch.randn(r, 8, generator=g)
            if k == 1 and name == INTERFERING:
                A[:, :8] = torch.randn(r, 8, generator=g)
            B = torch.zeros(m, r)
            B[12 * k:12 * k + 12] = torch.randn(12, r, generator=g)
            mods[k][name] = LoraModule(A, B, 1.0)
    return [LoraAdapter(m) for m in mods]


NAMES3 = [f"model.layers.{i}.self_attn.v_proj" for i in range(3)]
INTERFERING = NAMES3[1]


def test_flags_exactly_the_module_built_to_interfere():
    ads = _split_adapters()
    g = torch.Generator().manual_seed(3)
    H = []
    for k in range(2):
        h = torch.zeros(TOKENS, 16, dtype=torch.float64)
        h[:, 8 * k:8 * k + 8] = torch.randn(TOKENS, 8, generator=g, dtype=torch.float64)
        H.append({n: h for n in NAMES3})
    _, cos_stats = resolve_conflicts(ads, strategy="element")
    assert cos_stats["modules_flagged"] == 0  # the parameter cosine sees nothing anywhere
    assert all(abs(e["cosine"][0][1]) < 1e-6 for e in cos_stats["modules"].values())

    fused, st = fuse_adapters(ads, "task_arithmetic", grams=_grams(H), cr="activation")  # default threshold
    cr = st["cr"]
    assert {n for n, e in cr["modules"].items() if e["flagged"]} == {INTERFERING}
    e = cr["modules"][INTERFERING]
    D0, D1 = (a.modules[INTERFERING].delta(torch.float64) for a in ads)
    H0 = H[0][INTERFERING]
    assert e["score"] == pytest.approx(float((D1 @ H0.T).norm() / (D0 @ H0.T).norm()), rel=1e-5)
    assert e["score"] > 0.1 and e["deviation"][1] < 1e-6
    for n in NAMES3:
        if n != INTERFERING:
            assert cr["modules"][n]["score"] < 1e-6
    # inputs and outputs separate here, so RegMean reproduces both edges on their own domains
    assert e["score_after"] < 1e-5
    assert cr["share_changed"] == pytest.approx(1 / 3)


def test_refused_without_grams_in_one_line(make_adapters):
    ads = make_adapters(K=2, names=NAMES)
    with pytest.raises(EdgefuseError) as e:
        fuse_adapters(ads, "ties", cr="activation")
    assert str(e.value).startswith("LoRA-CR strategy activation needs Gram matrices") and "\n" not in str(e.value)
    with pytest.raises(EdgefuseError, match="LoRA-CR strategy activation: no Gram matrix for module"):
        fuse_adapters(ads, "ties", cr="activation", grams=[{}, {}])
    with pytest.raises(EdgefuseError, match="weights must be ≥ 0"):
        fuse_adapters(ads, "ties", [1.0, -1.0], cr="activation", grams=_grams(_inputs(2)))
    with pytest.raises(ValueError, match="acts on the fused result with Gram matrices"):
        resolve_conflicts(ads, strategy="activation")
    # the other strategies still take no Gram matrices
    with pytest.raises(EdgefuseError, match="takes no Gram matrices"):
        fuse_adapters(ads, "ties", cr="element", grams=_grams(_inputs(2)))
    assert math.isfinite(fuse_adapters(ads, "ties", cr="element")[1]["cr"]["share_changed"])
