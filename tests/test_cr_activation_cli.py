"""LoRA-CR ``activation`` on the tiny Llama: module scores against a dense computation on real activations (module
inputs captured by forward hooks in this test), and ``fuse --cr activation --activations`` end to end: what the
manifest records, flagged modules = RegMean, the rest = the base method, and one line without Gram matrices."""

import json

import pytest
import torch
from helpers.activations import hooked_inputs
from helpers.fusion import rel

from edgefuse.adapters import LoraAdapter, LoraModule, load_adapter, save_adapter
from edgefuse.artifacts import ExternalAdapterManifest
from edgefuse.fusion import fuse_adapters
from edgefuse.interference.collect import adapted_linears, gram_matrices
from edgefuse.interference.grams import GramSet
from edgefuse.models import fingerprint

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]

DOMAINS = ("stem", "humanities")


@pytest.fixture(scope="module")
def captured(tiny):
    """Per domain (random token sequences, a different seed each): the Grams as collected, and the module inputs H
    (tokens × d_in) hooked independently."""
    model, _ = tiny
    out = []
    for k in range(2):
        g = torch.Generator().manual_seed(20 + k)
        seqs = [torch.randint(0, model.config.vocab_size, (16,), generator=g).tolist() for _ in range(3)]
        with torch.no_grad():
            grams, aliases, _ = gram_matrices(model, seqs)
        out.append({"grams": {n: grams[aliases[n]] for n in aliases}, "H": hooked_inputs(model, seqs)})
    return out


def _random_adapters(model, seed, ranks=(4, 2), scales=(1.5, 0.5)):
    g = torch.Generator().manual_seed(seed)
    return [LoraAdapter({n: LoraModule(0.1 * torch.randn(r, m.in_features, generator=g),
                                       0.1 * torch.randn(m.out_features, r, generator=g), s)
                         for n, m in adapted_linears(model).items()})
            for r, s in zip(ranks, scales)]


def test_scores_match_dense_on_real_activations(tiny, captured):
    ads = _random_adapters(tiny[0], 5)
    w = [1.0, 0.5]
    grams = [c["grams"] for c in captured]
    plain, _ = fuse_adapters(ads, "ties", w, density=0.5)
    fused, st = fuse_adapters(ads, "ties", w, density=0.5, grams=grams, cr="activation", cr_threshold=0.0)
    modules = st["cr"]["modules"]
    assert len(modules) == 14 and st["cr"]["modules_flagged"] == 14
    for name, e in modules.items():
        D = [a.modules[name].delta(torch.float64) for a in ads]
        H = [c["H"][name] for c in captured]
        for F, score, dev in ((plain.modules[name].delta(torch.float64), e["score"], e["deviation"]),
                              (fused.modules[name].delta(torch.float64), e["score_after"], None)):
            want = [float(((F - D[i]) @ H[i].T).norm() / (D[i] @ H[i].T).norm()) for i in range(2)]
            assert score == pytest.approx(max(want), rel=1e-5), name
            if dev is not None:
                assert dev == pytest.approx(want, rel=1e-5), name


@pytest.fixture(scope="module")
def grams_dir(tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("g") / "grams"
    code, _, se = cli("grams", "--model", "tiny-llama", "--domains", ",".join(DOMAINS), "--tokens", 40, "--out", out)
    assert code == 0, se
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny):
    fp = fingerprint(tiny[0])
    root = tmp_path_factory.mktemp("a")
    out = []
    for d, a in zip(DOMAINS, _random_adapters(tiny[0], 9, ranks=(3, 3), scales=(2.0, 2.0))):
        save_adapter(a, root / d, ExternalAdapterManifest(base_fingerprint=fp, domain=d))
        out.append(root / d)
    return out


def test_fuse_cr_activation_records_its_edits(tmp_path, grams_dir, adapter_dirs, cli):
    out = tmp_path / "fused"
    code, so, se = cli("fuse", "--method", "ties", "--density", 0.5, "--cr", "activation", "--cr-share", 0.5,
                       "--adapters", *adapter_dirs, "--activations", grams_dir, "--out", out)
    assert code == 0, se
    assert "LoRA-CR[activation] (7/14 modules" in so
    man = json.loads((out / "edgefuse.json").read_text())
    assert man["cr"] == {"strategy": "activation", "threshold": 0.1, "share": 0.5}
    cr = man["cr_stats"]
    flagged = set(cr["flagged_modules"])
    assert len(flagged) == cr["modules_flagged"] == 7 and len(cr["module_scores"]) == 14
    scores = cr["module_scores"]
    assert min(scores[n] for n in flagged) >= max(s for n, s in scores.items() if n not in flagged)
    ads = [load_adapter(d) for d in adapter_dirs]
    sizes = {n: m.shape[0] * m.shape[1] for n, m in ads[0].modules.items()}
    assert cr["params_changed"] == sum(sizes[n] for n in flagged)
    assert cr["share_changed"] == pytest.approx(cr["params_changed"] / sum(sizes.values()))
    for n in flagged:
        e = cr["flagged_modules"][n]
        assert e["changed_params"] == sizes[n] and e["score"] == scores[n] and len(e["deviation"]) == 2
        assert e["score_after"] < e["score"]  # RegMean minimises the deviations' (shrunk, summed) squares

    per_token = [{n: g[n] / g.tokens for n in g} for g in GramSet(grams_dir).for_adapters(ads)]
    regmean, _ = fuse_adapters(ads, "regmean", grams=per_token)
    plain, _ = fuse_adapters(ads, "ties", density=0.5)
    got = load_adapter(out)
    for n, m in got.modules.items():
        want = (regmean if n in flagged else plain).modules[n]
        assert rel(m.delta(torch.float64), want.delta(torch.float64)) < 1e-5, n


def test_fuse_cr_activation_without_grams_is_one_line(tmp_path, adapter_dirs, cli):
    out = tmp_path / "fused"
    code, _, se = cli("fuse", "--method", "ties", "--cr", "activation", "--adapters", *adapter_dirs, "--out", out)
    assert code != 0
    lines = [x for x in se.strip().splitlines() if x]
    assert len(lines) == 1 and "LoRA-CR strategy activation needs Gram matrices" in lines[0], se
    assert not out.exists()
