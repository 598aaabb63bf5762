"""LoRA-CR: hand-computed statistics, untouched conflict-free adapters, constructed opposing adapters."""

import math

import pytest
import torch
from helpers.fusion import NAMES, deltas, make_adapters, rel, truncated

from edgefuse.adapters import LoraAdapter, LoraModule
from edgefuse.fusion import analyze_conflicts, elementwise, fuse_adapters, resolve_conflicts

N = "model.layers.0.self_attn.q_proj"


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


def _hand():
    # ΔW1 = [1,0]ᵀ[2,1] = [[2,1],[0,0]],  ΔW2 = [1,.5]ᵀ[-1,0] = [[-1,0],[-.5,0]]
    a1 = LoraAdapter({N: LoraModule(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0], [0.0]]))})
    a2 = LoraAdapter({N: LoraModule(torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0], [0.5]]))})
    return a1, a2


def test_statistics_match_hand_computation():
    stats = analyze_conflicts(list(_hand()))
    e = stats["modules"][N]
    # <ΔW1,ΔW2> = -2, ‖ΔW1‖ = √5, ‖ΔW2‖ = √1.25  →  cos = -2/2.5 = -0.8
    assert e["cosine"][0][1] == pytest.approx(-0.8, abs=1e-6)
    assert e["score"] == pytest.approx(0.8, abs=1e-6)
    # column spaces [1,0] vs [1,.5]/√1.25 → cos² = 0.8 ; row spaces [2,1]/√5 vs [-1,0] → cos² = 0.8
    assert e["col_overlap"][0][1] == pytest.approx(0.8, abs=1e-6)
    assert e["row_overlap"][0][1] == pytest.approx(0.8, abs=1e-6)
    # Σ|T| = 3 + 1 + .5 = 4.5 ; Σ|ΣT| = 1 + 1 + .5 = 2.5  →  cancelled share 4/9
    assert e["sign_conflict"] == pytest.approx(4 / 9, abs=1e-6)


def test_element_strategy_hand_example():
    a1, a2 = _hand()
    (r1, r2), st = resolve_conflicts([a1, a2], strategy="element", threshold=0.1, element_threshold=0.1)
    assert r1 is a1  # the dominant adapter is untouched
    # element (0,0): P = 2, N = 1 → conflict (1 ≥ 0.1·2); adapter 2's -1 is dropped; nothing else conflicts
    assert torch.allclose(r2.modules[N].delta(), torch.tensor([[0.0, 0.0], [-0.5, 0.0]]), atol=1e-6)
    m = st["modules"][N]
    assert m["flagged"] and m["changed_params"] == 1 and m["conflict_elements"] == 1
    assert st["params_total"] == 8 and st["share_changed"] == pytest.approx(1 / 8)
    fused, _ = fuse_adapters([a1, a2], "linear", cr="element")
    assert torch.allclose(fused.modules[N].delta(), torch.tensor([[1.0, 0.5], [-0.25, 0.0]]), atol=1e-6)


def test_direction_strategy_hand_example():
    a1, a2 = _hand()
    (r1, r2), st = resolve_conflicts([a1, a2], strategy="direction")
    assert r1 is a1
    # ΔW1 = √5·u vᵀ with u = [1,0], v = [2,1]/√5 ; c = uᵀΔW2 v = -2/√5 ; ΔW2' = ΔW2 - c·u vᵀ
    expect = torch.tensor([[-0.2, 0.4], [-0.5, 0.0]])
    assert torch.allclose(r2.modules[N].delta(), expect, atol=1e-6)
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]) / math.sqrt(5)
    assert abs(float(u @ r2.modules[N].delta() @ v)) < 1e-6  # no opposing component left
    assert st["modules"][N]["removed_directions"] == 1 and st["modules"][N]["changed_params"] == 4
    assert st["share_changed"] == pytest.approx(4 / 8)


@pytest.mark.parametrize("method", ["linear", "svd", "ties", "dare_ties", "lora_lego", "core_space"])
@pytest.mark.parametrize("strategy", ["element", "direction", "hybrid"])
def test_no_conflict_is_bit_identical(method, strategy):
    base = make_adapters(K=1, ranks=(4,))[0]
    g = torch.Generator().manual_seed(5)
    # same directions with positive scales and small positive noise on B: cosines are positive
    others = [
        LoraAdapter(
            {
                n: LoraModule(m.A, m.B * s + 0.01 * torch.randn(m.B.shape, generator=g), m.scale)
                for n, m in base.modules.items()
            }
        )
        for s in (0.5, 2.0)
    ]
    ads = [base] + others
    plain, _ = fuse_adapters(ads, method, seed=3)
    with_cr, stats = fuse_adapters(ads, method, seed=3, cr=strategy)
    assert stats["cr"]["modules_flagged"] == 0 and stats["cr"]["share_changed"] == 0
    for n in NAMES:
        assert torch.equal(plain.modules[n].A, with_cr.modules[n].A)
        assert torch.equal(plain.modules[n].B, with_cr.modules[n].B)


def test_constructed_opposing_adapters_detected_and_resolved():
    x, y = make_adapters(K=2, ranks=(4, 3), seed=2)
    names = list(NAMES)
    # adapter 2 = -0.5·adapter 1 on the first module (strong opposition) + its own update; second module clean
    opp = LoraModule(
        torch.cat([x.modules[names[0]].A, y.modules[names[0]].A]),
        torch.cat(
            [-0.5 * x.modules[names[0]].B * x.modules[names[0]].scale, 0.2 * y.modules[names[0]].B], dim=1
        ),
        1.0,
    )
    clean = LoraModule(
        torch.randn(3, 24, generator=torch.Generator().manual_seed(1)), torch.zeros(16, 3), 1.0
    )  # zero update: no conflict possible
    a1, a2 = x, LoraAdapter({names[0]: opp, names[1]: clean})
    st = analyze_conflicts([a1, a2])
    assert st["modules"][names[0]]["score"] > 0.5 and st["modules"][names[1]]["score"] == 0
    for strategy in ("element", "direction", "hybrid"):
        (r1, r2), cr = resolve_conflicts([a1, a2], strategy=strategy)
        assert cr["modules"][names[0]]["flagged"] and not cr["modules"][names[1]]["flagged"]
        assert r2.modules[names[1]] is clean
        after = analyze_conflicts([r1, r2])["modules"][names[0]]
        before = st["modules"][names[0]]
        assert after["score"] < before["score"] / 4, strategy
        assert after["sign_conflict"] < before["sign_conflict"], strategy
        assert 0 < cr["share_changed"] <= 1
    # element level: where both are non-zero and signs differ, only the dominant sign survives in the fused sum
    (r1, r2), _ = resolve_conflicts([a1, a2], strategy="element", element_threshold=0.0)
    T2 = r2.modules[names[0]].delta()
    d1, d2 = a1.modules[names[0]].delta(), opp.delta()
    dominant = torch.sign(d1.clamp(min=0) + d2.clamp(min=0) - (-d1).clamp(min=0) - (-d2).clamp(min=0))
    opposing = (d2 * dominant < 0) & (d1 * dominant > 0)
    # re-factorisation to the adapter's rank keeps most of the edit: opposing mass largely removed
    assert float((T2 * dominant)[opposing].clamp(max=0).abs().sum()) < 0.35 * float(d2[opposing].abs().sum())


@pytest.mark.parametrize("block", [None, 40])
def test_element_strategy_equals_dense_reference(block, monkeypatch):
    """Element-level LoRA-CR runs over row blocks; it must equal the dense definition (any block size)."""
    if block:
        monkeypatch.setattr(elementwise, "BLOCK", block)
    x, y, z = make_adapters(K=3, ranks=(4, 3, 5), seed=4)
    name = N
    opp = LoraModule(x.modules[name].A, -0.7 * x.modules[name].B, x.modules[name].scale)
    ads = [x, LoraAdapter({**y.modules, name: opp}), z]
    w, rho = [1.0, 0.8, 1.3], 0.2
    out, st = resolve_conflicts(ads, w, strategy="element", threshold=0.1, element_threshold=rho)
    T = torch.stack([wk * d for wk, d in zip(w, deltas(ads, name))])
    P, Nn = T.clamp(min=0).sum(0), (-T).clamp(min=0).sum(0)
    lo, hi = torch.minimum(P, Nn), torch.maximum(P, Nn)
    conflict = (lo > 0) & (lo >= rho * hi)
    dominant = torch.sign(P - Nn)
    e = st["modules"][name]
    assert e["flagged"] and e["conflict_elements"] == int(conflict.sum())
    assert e["sign_conflict"] == pytest.approx(float(1 - T.sum(0).abs().sum() / T.abs().sum()), abs=1e-6)
    changed = 0
    for k, a in enumerate(ads):
        drop = conflict & (T[k] * dominant < 0)
        if not drop.any():
            assert out[k].modules[name] is a.modules[name]
            continue
        changed += int(drop.sum())
        ref = truncated(T[k].masked_fill(drop, 0.0) / w[k], a.modules[name].rank)
        assert rel(out[k].modules[name].delta(), ref) <= 1e-5
    assert changed > 0 and e["changed_params"] == changed


def test_share_selects_the_most_conflicting_modules():
    """cr_share = q edits the ⌈q·M⌉ modules with the highest positive scores, whatever the threshold says."""
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    g = torch.Generator().manual_seed(0)
    base = {n: LoraModule(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)) for n in names}
    # adapter 2 opposes adapter 1 by a different amount per module: cosines -0.9, -0.6, -0.3 and +1 (no conflict)
    mix = dict(zip(names, (-0.9, -0.6, -0.3, 1.0)))
    other = {}
    for n, c in mix.items():
        m = base[n]
        noise = torch.randn(5, 6, generator=g)
        d = m.delta()
        noise -= (noise * d).sum() / (d * d).sum() * d  # orthogonal to ΔW1
        target = c * d / d.norm() + math.sqrt(max(0.0, 1 - c * c)) * noise / noise.norm()
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        other[n] = LoraModule(Vh, U * S)
    a1, a2 = LoraAdapter(base), LoraAdapter(other)
    scores = {n: e["score"] for n, e in analyze_conflicts([a1, a2])["modules"].items()}
    for n, c in mix.items():
        assert scores[n] == pytest.approx(max(0.0, -c), abs=1e-5)
    for share, expect in ((0.25, names[:1]), (0.5, names[:2]), (1.0, names[:3])):
        _, st = resolve_conflicts([a1, a2], strategy="element", threshold=0.99, share=share)
        assert sorted(n for n, e in st["modules"].items() if e["flagged"]) == expect, share
    # the threshold rule still holds without a share
    _, st = resolve_conflicts([a1, a2], strategy="element", threshold=0.5)
    assert sorted(n for n, e in st["modules"].items() if e["flagged"]) == names[:2]
    with pytest.raises(Exception, match="cr_share"):
        fuse_adapters([a1, a2], "linear", cr="element", cr_share=1.5)
