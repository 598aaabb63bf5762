"""``edgefuse fuse`` / ``edgefuse conflicts`` end to end, including every bad-input path (one line, exit ≠ 0,
nothing written), PEFT loading of the fused adapter and merged full weights."""

import json

import pytest
import torch
from helpers.fusion import rel

from edgefuse.artifacts import ExternalAdapterManifest
from edgefuse.adapters import LoraAdapter, LoraModule, load_adapter, save_adapter, verify_hashes
from edgefuse.errors import EdgefuseError
from edgefuse.fusion import fuse_adapters, fuse_dirs
from edgefuse.io import sha256_file
from edgefuse.models import fingerprint, tiny_model


pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]


SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64)}


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_model()
    return fingerprint(model)


def _adapter(seed, rank=4, targets=("q_proj", "k_proj", "v_proj")):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(2):
        for t in targets:
            m, n = SHAPES[t]
            mods[f"model.layers.{layer}.self_attn.{t}"] = LoraModule(
                0.1 * torch.randn(rank, n, generator=g), 0.1 * torch.randn(m, rank, generator=g), 1.0
            )
    return LoraAdapter(mods, base_model="tiny-llama")


@pytest.fixture()
def dirs(tmp_path, tiny):
    out = []
    for k, (seed, rank) in enumerate([(1, 4), (2, 2), (3, 6)]):
        d = tmp_path / f"edge{k}"
        save_adapter(_adapter(seed, rank), d, ExternalAdapterManifest(base_fingerprint=tiny, domain=f"d{k}"))
        out.append(d)
    return out


def test_fuse_writes_peft_adapter_manifest_and_merged_weights(tmp_path, dirs, cli):
    out, merged = tmp_path / "fused", tmp_path / "merged"
    code, so, se = cli("fuse", "--method", "ties", "--cr", "element", "--weights", "1,1,1", "--rank", 4,
                       "--density", 0.5, "--seed", 3, "--adapters", *dirs, "--out", out, "--merged-out", merged,
                       "--model", "tiny-llama")
    assert code == 0, se
    assert "fused 3 adapters with ties + LoRA-CR[element]" in so
    verify_hashes(out)
    man = json.loads((out / "edgefuse.json").read_text())
    assert man["method"] == "ties" and man["parameters"]["density"] == 0.5 and man["parameters"]["seed"] == 3
    assert [i["sha256"]["adapter_model.safetensors"] for i in man["inputs"]] == [
        sha256_file(d / "adapter_model.safetensors") for d in dirs
    ]
    assert man["cr_stats"]["strategy"] == "element" and "module_scores" in man["conflicts"]
    fused = load_adapter(out)
    expect, _ = fuse_adapters([load_adapter(d) for d in dirs], "ties", [1, 1, 1], 4, 0.5, 3, cr="element")
    for n, m in expect.modules.items():
        assert rel(fused.modules[n].delta(), m.delta()) <= 1e-6
    # PEFT loads it and applies the same ΔW; merged weights = base + ΔW
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _ = tiny_model()
    pm = PeftModel.from_pretrained(base, str(out))
    layer = pm.base_model.model.model.layers[1].self_attn.k_proj
    name = "model.layers.1.self_attn.k_proj"
    assert rel(layer.get_delta_weight("default"), fused.modules[name].delta()) <= 1e-6
    mm = AutoModelForCausalLM.from_pretrained(str(merged))
    base2, _ = tiny_model()
    W = mm.model.layers[1].self_attn.k_proj.weight - base2.model.layers[1].self_attn.k_proj.weight
    assert rel(W.detach(), fused.modules[name].delta()) <= 1e-5


def test_conflicts_table_and_heatmap(tmp_path, dirs, monkeypatch, cli):
    png = tmp_path / "c.png"
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal
    code, so, se = cli("conflicts", "--adapters", *dirs, "--plot", png, "--json", tmp_path / "c.json")
    assert code == 0, se
    assert "q_proj" in so and "6 modules" in so
    assert png.read_bytes()[:4] == b"\x89PNG"
    stats = json.loads((tmp_path / "c.json").read_text())
    assert (
        len(stats["modules"]) == 6 and "sign_conflict" in stats["modules"]["model.layers.0.self_attn.q_proj"]
    )
    for m in stats["modules"].values():  # every cell is printed whole, also when stdout is not a terminal
        assert f"{m['score']:.3f}/{m['sign_conflict']:.2f}" in so


def test_list(cli):
    code, so, _ = cli("fuse", "--list")
    assert code == 0 and "core_space" in so and "direction" in so


def _bad(cli, out, *args):
    code, so, se = cli("fuse", *args, "--out", out)
    assert code != 0
    lines = [x for x in se.strip().splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not out.exists()
    return lines[0]


def test_bad_inputs_one_line_nothing_written(tmp_path, dirs, tiny, cli):
    out = tmp_path / "never"
    assert "valid: linear, cat, task_arithmetic" in _bad(cli, out, "--method", "nope", "--adapters", *dirs)
    for d in ("0", "1.5", "-0.1"):
        assert "density must be in (0, 1]" in _bad(cli, out, "--method", "ties", "--density", d, "--adapters", *dirs)
    other = tmp_path / "other"
    save_adapter(_adapter(9), other, ExternalAdapterManifest(base_fingerprint="f" * 32))
    assert "different base models" in _bad(cli, out, "--method", "linear", "--adapters", dirs[0], other)
    code, _, se = cli("fuse", "--method", "linear", "--force", "--adapters", dirs[0], other, "--out", out)
    assert code == 0 and out.exists()
    out2 = tmp_path / "never2"
    shapes = tmp_path / "shapes"
    save_adapter(
        LoraAdapter({"model.layers.0.self_attn.q_proj": LoraModule(torch.randn(2, 48), torch.randn(64, 2))}),
        shapes,
        ExternalAdapterManifest(base_fingerprint=tiny),
    )
    assert "different shapes" in _bad(cli, out2, "--method", "svd", "--adapters", dirs[0], shapes)
    nan = tmp_path / "nan"
    a = _adapter(4)
    a.modules["model.layers.0.self_attn.q_proj"].B[0, 0] = float("inf")
    save_adapter(a, nan, ExternalAdapterManifest(base_fingerprint=tiny))
    assert "NaN or Inf" in _bad(cli, out2, "--method", "svd", "--adapters", dirs[0], nan)
    ia3 = tmp_path / "ia3"
    save_adapter(_adapter(5), ia3, ExternalAdapterManifest(base_fingerprint=tiny))
    cfg = json.loads((ia3 / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (ia3 / "adapter_config.json").write_text(json.dumps(cfg))
    # an edited file of an edgefuse adapter breaks its manifest's hash; re-hashed, the config itself is refused
    assert "sha256 does not match" in _bad(cli, out2, "--method", "svd", "--adapters", dirs[0], ia3)
    man = json.loads((ia3 / "edgefuse.json").read_text())
    man["files"]["adapter_config.json"] = sha256_file(ia3 / "adapter_config.json")
    (ia3 / "edgefuse.json").write_text(json.dumps(man))
    assert "only LORA" in _bad(cli, out2, "--method", "svd", "--adapters", dirs[0], ia3)
    assert "2 weights given for 3 adapters" in _bad(cli, out2, "--method", "linear", "--weights", "1,2", "--adapters", *dirs)
    assert "already exists" in cli("fuse", "--method", "linear", "--adapters", *dirs, "--out", out)[2]


def test_cr_share_edits_the_most_conflicting_modules(tmp_path, dirs, cli):
    """--cr-share q: the manifest records q, and the edited modules are the ⌈q·M⌉ highest-scored ones."""
    out = tmp_path / "fused"
    code, so, se = cli("fuse", "--method", "linear", "--cr", "element", "--cr-share", 0.5,
                       "--adapters", *dirs, "--out", out)
    assert code == 0, se
    man = json.loads((out / "edgefuse.json").read_text())
    assert man["cr"]["share"] == 0.5
    scores = man["conflicts"]["module_scores"]
    top = sorted((n for n in scores if scores[n] > 0), key=lambda n: (-scores[n], n))[: -(-len(scores) // 2)]
    assert sorted(man["cr_stats"]["flagged_modules"]) == sorted(top) and top
    code, _, se = cli("fuse", "--method", "linear", "--cr", "element", "--cr-share", 1.5,
                      "--adapters", *dirs, "--out", tmp_path / "bad")
    assert code != 0 and "cr_share must be in (0, 1]" in se and len(se.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_fuse_without_model_checks_targets_against_the_recorded_base(tmp_path, dirs, tiny, cli):
    """No --model: each adapter's modules are checked against the architecture of the base model it records (from
    that model's config, no weights). A module the model lacks, or of another shape, is one line naming the
    adapter, the module and the model, and nothing is written; good adapters still fuse."""
    out = tmp_path / "never"
    bogus = "model.layers.0.self_attn.bogus_proj"
    bad = tmp_path / "bad"
    a = _adapter(7)
    a.modules[bogus] = LoraModule(0.1 * torch.randn(4, 64), 0.1 * torch.randn(64, 4), 1.0)
    save_adapter(a, bad, ExternalAdapterManifest(base_fingerprint=tiny))
    line = _bad(cli, out, "--method", "ties", "--adapters", dirs[0], bad)
    assert str(bad) in line and bogus in line and "tiny-llama" in line
    with pytest.raises(EdgefuseError, match="bogus_proj is not a linear layer of tiny-llama"):
        fuse_dirs([dirs[0], bad], out, "linear")
    assert not out.exists()
    wide = tmp_path / "wide"  # a real module name, the wrong shape for the recorded base
    w = _adapter(8)
    w.modules["model.layers.1.self_attn.k_proj"] = LoraModule(torch.randn(4, 48), torch.randn(32, 4), 1.0)
    save_adapter(w, wide, ExternalAdapterManifest(base_fingerprint=tiny))
    assert "k_proj is 32×48, tiny-llama has 32×64" in _bad(cli, out, "--method", "linear", "--adapters", wide)
    code, _, se = cli("fuse", "--method", "ties", "--adapters", *dirs, "--out", out)
    assert code == 0 and "not checked" not in se and out.exists()


def test_fuse_without_model_warns_when_the_recorded_base_is_not_available(tmp_path, tiny, caplog):
    """An adapter from elsewhere whose base model is not at hand offline: fused unchecked, with one warning."""
    elsewhere = tmp_path / "elsewhere"
    a = _adapter(9)
    a.modules["model.layers.0.self_attn.bogus_proj"] = LoraModule(torch.randn(4, 64), torch.randn(64, 4), 1.0)
    save_adapter(LoraAdapter(a.modules), elsewhere, ExternalAdapterManifest(base_fingerprint=tiny),
                 base_model="nobody/not-in-the-local-hub-cache")
    with caplog.at_level("WARNING", logger="edgefuse.fusion"):
        fuse_dirs([elsewhere], tmp_path / "fused", "linear")
    assert (tmp_path / "fused").exists()
    (rec,) = [r for r in caplog.records if r.name == "edgefuse.fusion"]
    assert "not checked" in rec.getMessage() and str(elsewhere) in rec.getMessage()
    assert "no config for model 'nobody/not-in-the-local-hub-cache' offline" in rec.getMessage()
