"""Gram collection, interference on activations and RegMean against dense references on real activations: the
tiny Llama's module inputs captured by forward hooks in this test, ΔW formed densely, everything in float64."""

import math

import pytest
import torch
from helpers.activations import hooked_inputs
from helpers.fusion import rel

from edgefuse.adapters import LoraAdapter, LoraModule
from edgefuse.errors import EdgefuseError
from edgefuse.fusion import fuse_adapters
from edgefuse.interference.collect import GramSpec, adapted_linears, public_prompts, token_sequences, gram_matrices
from edgefuse.interference.metrics import interference

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]

DOMAINS = ("stem", "humanities")
TOKENS = 48  # below every d_in of the tiny model (64, 96): the Grams are singular, as on SmolLM2 with few tokens


@pytest.fixture(scope="module")
def captured(tiny, mmlu):
    """Per domain: the Grams as collected, and the module inputs H (tokens × d_in) hooked independently."""
    model, tok = tiny
    out = {}
    for d in DOMAINS:
        seqs = token_sequences(tok, public_prompts(mmlu, d), TOKENS)
        grams, aliases, total = gram_matrices(model, seqs)
        out[d] = {"grams": {n: grams[aliases[n]] for n in aliases}, "H": hooked_inputs(model, seqs),
                  "tokens": total, "seqs": seqs}
    return out


@pytest.fixture(scope="module")
def adapters(tiny):
    """Two seeded adapters over every projection of the tiny model; the second lacks one module."""
    g = torch.Generator().manual_seed(5)
    shapes = {n: (m.out_features, m.in_features) for n, m in adapted_linears(tiny[0]).items()}
    out = []
    for k, r in enumerate((4, 2)):
        mods = {n: LoraModule(0.1 * torch.randn(r, i, generator=g), 0.1 * torch.randn(o, r, generator=g), 1.5 - k)
                for n, (o, i) in shapes.items()}
        if k == 1:
            del mods["model.layers.1.mlp.up_proj"]
        out.append(LoraAdapter(mods))
    return out


def _dense(adapter, name, shape):
    return adapter.modules[name].delta(torch.float64) if name in adapter.modules else torch.zeros(shape, dtype=torch.float64)


def test_budget_and_subjects_interleaved(tiny, mmlu, captured):
    prompts = public_prompts(mmlu, "stem")
    assert prompts[0].split("\n")[0] != prompts[1].split("\n")[0]  # first two prompts: two different subjects
    for d in DOMAINS:
        assert captured[d]["tokens"] == TOKENS == sum(map(len, captured[d]["seqs"]))
    assert GramSpec().split == "public"


def test_grams_equal_hooked_inputs(captured):
    for d in DOMAINS:
        for n, H in captured[d]["H"].items():
            assert H.shape[0] == TOKENS
            assert rel(captured[d]["grams"][n], H.T @ H) < 1e-12, n


def test_interference_matches_dense(captured, adapters):
    grams = [captured[d]["grams"] for d in DOMAINS]
    weights = [0.3, 0.7]
    fused, _ = fuse_adapters(adapters, "ties", weights, density=0.5)
    for fz in (None, fused):
        stats = interference(adapters, grams, fz, weights)
        pooled = torch.zeros(2, 2, 2, dtype=torch.float64)
        pooled_dev = [0.0, 0.0]
        for name, e in stats["modules"].items():
            shape = next(a.modules[name].shape for a in adapters if name in a.modules)
            D = [_dense(a, name, shape) for a in adapters]
            F = sum(w * x for w, x in zip(weights, D)) if fz is None else fz.modules[name].delta(torch.float64)
            for i, d in enumerate(DOMAINS):
                H = captured[d]["H"][name]
                Y = [x @ H.T for x in D]
                P = torch.tensor([[float((Y[j] * Y[k]).sum()) for k in range(2)] for j in range(2)], dtype=torch.float64)
                pooled[i] += P
                own = float(Y[i].norm())
                for j in range(2):
                    want = float(Y[j].norm()) / own if own else None
                    got = e["ratio"][i][j]
                    assert (got is None and want is None) or got == pytest.approx(want, rel=1e-5), (name, i, j)
                    for k in range(2):
                        nj, nk = float(Y[j].norm()), float(Y[k].norm())
                        want_c = float((Y[j] * Y[k]).sum()) / (nj * nk) if nj * nk else None
                        got_c = e["cosine"][i][j][k]
                        assert (got_c is None and want_c is None) or got_c == pytest.approx(want_c, rel=1e-5, abs=1e-9)
                if own:
                    dev = (F - D[i]) @ H.T
                    pooled_dev[i] += float(dev.pow(2).sum())
                    assert e["deviation"][i] == pytest.approx(float(dev.norm()) / own, rel=1e-5), (name, i)
        s = stats["summary"]
        for i in range(2):
            assert s["deviation"][i] == pytest.approx(math.sqrt(pooled_dev[i] / float(pooled[i, i, i])), rel=1e-5)
            for j in range(2):
                assert s["ratio"][i][j] == pytest.approx(math.sqrt(float(pooled[i, j, j] / pooled[i, i, i])), rel=1e-5)
                want = float(pooled[i, 0, 1] / (pooled[i, 0, 0] * pooled[i, 1, 1]).sqrt())
                assert s["cosine"][i][0][1] == pytest.approx(want, rel=1e-5)
    missing = stats["modules"]["model.layers.1.mlp.up_proj"]
    assert missing["ratio"][0][1] == 0 and missing["ratio"][1] == [None, None]


def _regmean_dense(adapters, grams, name, weights, alpha, ridge=None):
    shape = next(a.modules[name].shape for a in adapters if name in a.modules)
    num = torch.zeros(shape, dtype=torch.float64)
    S = torch.zeros(shape[1], shape[1], dtype=torch.float64)
    for a, g, w in zip(adapters, grams, weights):
        G = g[name].double()
        Gt = alpha * G + (1 - alpha) * torch.diag(torch.diag(G))
        num += w * _dense(a, name, shape) @ Gt
        S += w * Gt
    if ridge is not None:
        S += ridge * S.diagonal().mean() * torch.eye(S.shape[0], dtype=S.dtype)
    return torch.linalg.solve(S, num.T).T  # num · S⁻¹, S symmetric


@pytest.mark.parametrize("alpha,weights", [(0.9, [1.0, 1.0]), (0.5, [0.3, 1.2])])
def test_regmean_matches_dense_closed_form(captured, adapters, alpha, weights):
    grams = [captured[d]["grams"] for d in DOMAINS]
    fused, stats = fuse_adapters(adapters, "regmean", weights, grams=grams, alpha=alpha)
    assert stats["params"]["alpha"] == alpha
    for name, m in fused.modules.items():
        assert m.rank == sum(a.modules[name].rank for a in adapters if name in a.modules)
        want = _regmean_dense(adapters, grams, name, weights, alpha)
        assert rel(m.delta(torch.float64), want) < 1e-5, name


def test_regmean_singular_sum_gets_the_ridge(captured, adapters):
    """α = 1 keeps the raw Grams; of 16 tokens per domain, Σ G (rank ≤ 32 < d_in) is singular: the ridge is added."""
    grams = [{n: H[:16].T @ H[:16] for n, H in captured[d]["H"].items()} for d in DOMAINS]
    fused, _ = fuse_adapters(adapters, "regmean", grams=grams, alpha=1.0, ridge=1e-3)
    for name, m in fused.modules.items():
        want = _regmean_dense(adapters, grams, name, [1.0, 1.0], 1.0, ridge=1e-3)
        assert rel(m.delta(torch.float64), want) < 1e-5, name


def test_regmean_rank_truncates_exactly(captured, adapters):
    grams = [captured[d]["grams"] for d in DOMAINS]
    fused, _ = fuse_adapters(adapters, "regmean", grams=grams, rank=3)
    name = "model.layers.0.self_attn.q_proj"
    U, S, Vh = torch.linalg.svd(_regmean_dense(adapters, grams, name, [1.0, 1.0], 0.9))
    assert rel(fused.modules[name].delta(torch.float64), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]) < 1e-5


def test_regmean_refuses_missing_grams(captured, adapters):
    with pytest.raises(EdgefuseError, match="regmean needs Gram matrices"):
        fuse_adapters(adapters, "regmean")
    partial = [dict(captured[d]["grams"]) for d in DOMAINS]
    del partial[1]["model.layers.0.mlp.down_proj"]
    with pytest.raises(EdgefuseError, match="no Gram matrix for module model.layers.0.mlp.down_proj"):
        fuse_adapters(adapters, "regmean", grams=partial)
    with pytest.raises(EdgefuseError, match="takes no Gram matrices"):
        fuse_adapters(adapters, "ties", grams=partial)
    with pytest.raises(EdgefuseError, match="must be ≥ 0"):
        fuse_adapters(adapters, "regmean", [1.0, -1.0], grams=[captured[d]["grams"] for d in DOMAINS])


def test_in_memory_grams_are_checked_once_per_tensor_and_a_bad_one_is_one_line(captured, adapters, monkeypatch):
    """Modules reading one input (q/k/v) share its Gram tensor: the full check (a float64 Cholesky) runs once per
    distinct tensor and call, not once per module and pass; a non-PSD matrix among shared ones still fails."""
    import edgefuse.interference.grams as grams_mod

    calls = []
    real = grams_mod.check_gram
    monkeypatch.setattr(grams_mod, "check_gram", lambda G, *a, **k: calls.append(id(G)) or real(G, *a, **k))
    shared = [dict(captured[d]["grams"]) for d in DOMAINS]
    q = "model.layers.0.self_attn.q_proj"
    for g in shared:
        for t in ("k_proj", "v_proj"):
            g[q.replace("q_proj", t)] = g[q]
    fuse_adapters(adapters, "regmean", grams=shared)
    distinct = sum(len({id(t) for t in g.values()}) for g in shared)
    assert len(calls) == distinct < sum(len(g) for g in shared)
    bad = [dict(g) for g in shared]
    bad[1][q] = -torch.eye(bad[1][q].shape[0])
    with pytest.raises(EdgefuseError, match="Gram matrix of module .* is not positive semi-definite") as e:
        fuse_adapters(adapters, "regmean", grams=bad)
    assert "Gram matrices of adapter 1" in str(e.value)
