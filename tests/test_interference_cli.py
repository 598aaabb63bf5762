"""``edgefuse grams``, ``conflicts --activations`` and ``fuse --method regmean --activations`` end to end on the tiny
Llama, and every bad input (one line naming the file and the problem, exit ≠ 0, nothing written)."""

import json

import pytest
import torch
from helpers.fusion import rel
from safetensors.torch import load_file, save_file

from edgefuse.adapters import LoraAdapter, LoraModule, load_adapter, save_adapter
from edgefuse.artifacts import ExternalAdapterManifest
from edgefuse.fusion import fuse_adapters
from edgefuse.interference.collect import adapted_linears
from edgefuse.interference.grams import GramSet
from edgefuse.interference.metrics import interference
from edgefuse.models import fingerprint

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]

DOMAINS = ("stem", "humanities")


@pytest.fixture(scope="module")
def grams_dir(tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("g") / "grams"
    code, so, se = cli("grams", "--model", "tiny-llama", "--domains", ",".join(DOMAINS), "--tokens", 40, "--out", out)
    assert code == 0, se
    assert "Gram matrices of 14 modules (8 distinct inputs)" in so
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny):
    model = tiny[0]
    fp = fingerprint(model)
    g = torch.Generator().manual_seed(9)
    root = tmp_path_factory.mktemp("a")
    out = []
    for k, d in enumerate(reversed(DOMAINS)):  # adapters in the other order than the directory: matched by domain
        mods = {n: LoraModule(0.1 * torch.randn(3, m.in_features, generator=g),
                              0.1 * torch.randn(m.out_features, 3, generator=g), 2.0)
                for n, m in adapted_linears(model).items()}
        save_adapter(LoraAdapter(mods), root / d, ExternalAdapterManifest(base_fingerprint=fp, domain=d))
        out.append(root / d)
    return out


def _one_line(code, se, *parts):
    assert code != 0
    lines = [x for x in se.strip().splitlines() if x]
    assert len(lines) == 1, se
    for p in parts:
        assert str(p) in lines[0], lines[0]


def test_grams_manifest(grams_dir):
    man = json.loads((grams_dir / "grams.json").read_text())
    assert man["kind"] == "edgefuse-activation-grams" and man["split"] == "public"
    assert list(man["domains"]) == list(DOMAINS) and all(d["tokens"] == 40 for d in man["domains"].values())
    assert man["modules"]["model.layers.0.self_attn.k_proj"] == man["modules"]["model.layers.0.self_attn.q_proj"]
    assert man["modules"]["model.layers.1.mlp.up_proj"] == man["modules"]["model.layers.1.mlp.gate_proj"]


def test_conflicts_shows_interference(tmp_path, grams_dir, adapter_dirs, cli):
    plot, js = tmp_path / "i.png", tmp_path / "c.json"
    code, so, se = cli("conflicts", "--adapters", *adapter_dirs, "--activations", grams_dir, "--plot", plot, "--json", js)
    assert code == 0, se
    assert "interference on activations" in so and "largest cross-domain ratio" in so
    assert plot.stat().st_size > 0 and (tmp_path / "i-deviation.png").stat().st_size > 0
    got = json.loads(js.read_text())["interference"]
    ads = [load_adapter(d) for d in adapter_dirs]
    want = interference(ads, GramSet(grams_dir).for_adapters(ads))
    assert got["domains"] == ["humanities", "stem"]
    flat = [x for row in want["summary"]["ratio"] for x in row]
    assert [x for row in got["summary"]["ratio"] for x in row] == pytest.approx(flat, rel=1e-9)


def test_fuse_regmean(tmp_path, grams_dir, adapter_dirs, cli):
    out = tmp_path / "fused"
    code, so, se = cli("fuse", "--method", "regmean", "--param", "alpha=0.8", "--adapters", *adapter_dirs,
                       "--activations", grams_dir, "--out", out)
    assert code == 0, se
    man = json.loads((out / "edgefuse.json").read_text())
    assert man["method"] == "regmean" and man["parameters"]["activations"]["path"] == str(grams_dir)
    ads = [load_adapter(d) for d in adapter_dirs]
    per_token = [{n: g[n] / g.tokens for n in g} for g in GramSet(grams_dir).for_adapters(ads)]
    want, _ = fuse_adapters(ads, "regmean", grams=per_token, alpha=0.8)
    got = load_adapter(out)
    for n, m in want.modules.items():
        assert rel(got.modules[n].delta(torch.float64), m.delta(torch.float64)) < 1e-5, n


def _corrupt(src, dst, how):
    """A copy of the Gram directory with one matrix of the humanities file broken ``how``."""
    import shutil

    shutil.copytree(src, dst)
    f = dst / "humanities.safetensors"
    t = load_file(str(f))
    key = "model.layers.0.self_attn.q_proj"
    G = t[key]
    if how == "shape":
        t[key] = G[:-1, :-1].contiguous()
    elif how == "nan":
        G[3, 3] = float("nan")
    elif how == "asymmetric":
        G[0, 1] += 1.0
    elif how == "not PSD":
        t[key] = G - 2 * float(torch.linalg.eigvalsh(G.double()).max()) * torch.eye(G.shape[0])
    save_file(t, str(f))
    return f


@pytest.mark.parametrize("how,message", [("shape", "has shape [63, 63], expected 64 × 64"),
                                         ("nan", "contains NaN or Inf"), ("asymmetric", "is not symmetric"),
                                         ("not PSD", "is not positive semi-definite")])
def test_bad_gram_matrix(tmp_path, grams_dir, adapter_dirs, cli, how, message):
    bad = _corrupt(grams_dir, tmp_path / "bad", how)
    out, js = tmp_path / "fused", tmp_path / "c.json"
    code, _, se = cli("fuse", "--method", "regmean", "--adapters", *adapter_dirs, "--activations", bad.parent,
                      "--out", out)
    _one_line(code, se, bad, message)
    assert not out.exists()
    code, _, se = cli("conflicts", "--adapters", *adapter_dirs, "--activations", bad.parent, "--json", js)
    _one_line(code, se, bad, message)
    assert not js.exists()


def test_domain_without_public_prompts(tmp_path, cli):
    rows = [{"question": f"q{k}", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": "A", "topic": "astronomy"} for k in range(3)]  # 3 items: no public share
    rows += [{**r, "topic": "philosophy", "question": f"p{k}"} for k, r in enumerate(rows * 4)]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "g"
    code, _, se = cli("grams", "--model", "tiny-llama", "--domains", "humanities,physics", "--data", data,
                      "--out", out)
    _one_line(code, se, "domain 'physics' has no public-split prompts")
    assert not out.exists()


def test_regmean_refuses_modules_without_grams(tmp_path, grams_dir, adapter_dirs, tiny, cli):
    ads = [load_adapter(d) for d in adapter_dirs]
    q = ads[0].modules["model.layers.1.self_attn.q_proj"]
    extra = LoraModule(q.A.clone(), q.B.clone(), q.scale)
    odd = tmp_path / "humanities"
    save_adapter(LoraAdapter({**ads[0].modules, "model.layers.7.self_attn.q_proj": extra}), odd,
                 ExternalAdapterManifest(base_fingerprint=fingerprint(tiny[0]), domain="humanities"))
    out = tmp_path / "fused"
    code, _, se = cli("fuse", "--method", "regmean", "--adapters", odd, adapter_dirs[1], "--activations", grams_dir,
                      "--out", out)
    _one_line(code, se, "no Gram matrix for module model.layers.7.self_attn.q_proj")
    assert not out.exists()
    code, _, se = cli("fuse", "--method", "regmean", "--adapters", *adapter_dirs, "--out", out)
    _one_line(code, se, "regmean needs Gram matrices")
    assert not out.exists()
