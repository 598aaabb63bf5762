"""edgefuse against PEFT's add_weighted_adapter on the same adapters (tiny Llama, adapters from disk)."""

import math

import pytest
import torch
from helpers.fusion import rel

from edgefuse.adapters import load_adapter
from edgefuse.fusion import fuse_adapters
from edgefuse.models import tiny_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402 - after importorskip
from peft.tuners.lora import LoraLayer  # noqa: E402


pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]


def _build(tmp_path, configs, seed=0, disjoint_slots=False):
    model, _ = tiny_model()
    names = [f"a{k}" for k in range(len(configs))]
    pm = get_peft_model(model, LoraConfig(**configs[0]), adapter_name=names[0])
    for n, c in zip(names[1:], configs[1:]):
        pm.add_adapter(n, LoraConfig(**c))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in pm.modules():
            if isinstance(mod, LoraLayer):
                for k, n in enumerate(names):
                    if n not in mod.lora_A:
                        continue
                    A, B = mod.lora_A[n].weight, mod.lora_B[n].weight
                    A.copy_(torch.randn(A.shape, generator=g) * 0.3)
                    B.copy_(torch.randn(B.shape, generator=g) * 0.3)
                    if disjoint_slots:  # adapter k only uses rank slot k: B_j A_k = 0 for j != k
                        keep = torch.zeros(A.shape[0], dtype=torch.bool)
                        keep[k] = True
                        A.mul_(keep[:, None])
                        B.mul_(keep[None, :])
    dirs = []
    for n in names:
        pm.save_pretrained(str(tmp_path), selected_adapters=[n])
        dirs.append(tmp_path / n if n != "default" else tmp_path)
    return pm, names, [load_adapter(d) for d in dirs]


def _peft_deltas(pm, name):
    out = {}
    for key, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and name in mod.lora_A:
            out[key] = mod.get_delta_weight(name)
    return out


def _compare(pm, ours, new_name, tol):
    ref = _peft_deltas(pm, new_name)
    assert set(ref) == set(ours.modules)
    worst = max(rel(ours.modules[k].delta(), ref[k]) for k in ref)
    assert worst <= tol, worst
    return worst


MIXED = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    dict(r=6, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
]


def test_cat_and_svd_match_peft_with_mixed_ranks_alphas_rslora_targets(tmp_path):
    pm, names, ads = _build(tmp_path, MIXED)
    w = [0.6, 1.3, -0.4]
    pm.add_weighted_adapter(names, w, "cat", combination_type="cat")
    _compare(pm, fuse_adapters(ads, "cat", w)[0], "cat", 1e-5)
    pm.add_weighted_adapter(names, w, "svd", combination_type="svd", svd_rank=5)
    _compare(pm, fuse_adapters(ads, "svd", w, rank=5)[0], "svd", 1e-4)


def _seed_after_injection(monkeypatch, seed):
    """PEFT initialises the new adapter (consuming the global RNG) before drawing DARE masks; reseed between."""
    import peft.tuners.lora.model as lm

    original = lm._freeze_adapter

    def freeze_then_seed(*args, **kwargs):
        original(*args, **kwargs)
        torch.manual_seed(seed)

    monkeypatch.setattr(lm, "_freeze_adapter", freeze_then_seed)


def test_ties_svd_and_dare_ties_svd_match_peft(tmp_path, monkeypatch):
    cfgs = [dict(r=r, lora_alpha=a, target_modules=["q_proj"]) for r, a in ((4, 8), (3, 3), (5, 10))]
    pm, names, ads = _build(tmp_path, cfgs)
    w = [
        0.8,
        0.8,
        0.8,
    ]  # PEFT elects the sign on unweighted tensors: equal weights make the definitions coincide
    # PEFT keeps int(density·n) entries, edgefuse ⌈density·n⌉ (elementwise.keep_count): the same count when
    # density·n is an integer, as 0.25·(64·64) is
    pm.add_weighted_adapter(names, w, "ties", combination_type="ties_svd", svd_rank=4, density=0.25)
    # default re-factorisation (exact, from the float64-refined Gram eigendecomposition) and LAPACK's SVD
    _compare(pm, fuse_adapters(ads, "ties", w, rank=4, density=0.25)[0], "ties", 1e-4)
    _compare(pm, fuse_adapters(ads, "ties", w, rank=4, density=0.25, svd_solver="exact")[0], "ties", 1e-4)
    pm.add_weighted_adapter(names, w, "mag", combination_type="magnitude_prune_svd", svd_rank=4, density=0.25)
    _compare(pm, fuse_adapters(ads, "magnitude_prune", w, rank=4, density=0.25)[0], "mag", 1e-4)
    # DARE: PEFT draws Bernoulli masks from the global RNG, module by module in model order, adapter by adapter.
    _seed_after_injection(monkeypatch, 11)
    pm.add_weighted_adapter(names, w, "dare", combination_type="dare_ties_svd", svd_rank=4, density=0.5)
    _compare(
        pm,
        fuse_adapters(ads, "dare_ties", w, rank=4, density=0.5, seed=11, rng="sequential")[0],
        "dare",
        1e-4,
    )
    _seed_after_injection(monkeypatch, 12)
    pm.add_weighted_adapter(
        names, [0.5, 1.0, 2.0], "darel", combination_type="dare_linear_svd", svd_rank=4, density=0.5
    )
    _compare(
        pm,
        fuse_adapters(ads, "dare_linear", [0.5, 1.0, 2.0], rank=4, density=0.5, seed=12, rng="sequential")[0],
        "darel",
        1e-4,
    )


def test_peft_linear_is_exact_only_without_cross_terms(tmp_path):
    """PEFT's linear sums √c-weighted factors: ΔW gains cross terms B_j A_k. We document when it is exact."""
    cfg = dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"])
    w = [0.2, 0.3, 0.5]
    pm, names, ads = _build(tmp_path / "d", [cfg] * 3, disjoint_slots=True)
    pm.add_weighted_adapter(names, w, "lin", combination_type="linear")
    _compare(
        pm, fuse_adapters(ads, "linear", w)[0], "lin", 1e-5
    )  # weights sum to 1: normalisation is a no-op
    pm2, names2, ads2 = _build(tmp_path / "g", [cfg] * 3, seed=1)
    pm2.add_weighted_adapter(names2, w, "lin", combination_type="linear")
    ours = fuse_adapters(ads2, "linear", w)[0]
    ref = _peft_deltas(pm2, "lin")
    assert min(rel(ref[k], ours.modules[k].delta()) for k in ref) > 0.1
    # and PEFT's result is exactly the factor-average with cross terms
    for k, d in ref.items():
        mods = [a.modules[k] for a in ads2]
        Bm = sum(math.sqrt(wi * m.scale) * m.B for wi, m in zip(w, mods))
        Am = sum(math.sqrt(wi * m.scale) * m.A for wi, m in zip(w, mods))
        assert rel(Bm @ Am, d) <= 1e-5
