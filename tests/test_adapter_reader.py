"""The one adapter reader (issue 14): a broken adapter is refused the same way by `eval mmlu --adapter` (which
goes through `apply_adapter`, like `eval mmlu-cd` and the study runner) and by `fuse` — exit ≠ 0, one stderr line
naming the file and the problem, no traceback, no output — while a valid PEFT adapter still evaluates and fuses
with the factors PEFT itself applies."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from helpers.fusion import rel

from edgefuse.adapters import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, load_adapter
from edgefuse.models import tiny_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402 - after importorskip
from peft.tuners.lora import LoraLayer  # noqa: E402

# rank_pattern, alpha_pattern and rsLoRA together: the reader must follow PEFT's per-module rules for all three
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
              alpha_pattern={"down_proj": 3}, use_rslora=True)
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]


def _peft_adapter(directory: Path, seed: int):
    """A PEFT LoRA of the tiny model with random factors (PEFT starts B at zero), saved as PEFT saves it."""
    model, _ = tiny_model()
    pm = get_peft_model(model, LoraConfig(**CONFIG))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(directory))
    return pm


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """Two valid adapters and the PeftModel of the first (for PEFT's own ΔW)."""
    root = tmp_path_factory.mktemp("valid")
    pm = _peft_adapter(root / "a", 1)
    _peft_adapter(root / "b", 2)
    return root / "a", root / "b", pm


# ------------------------------------------------------------------------------------------------- corruptions
def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / CONFIG_FILE).read_text())
    cfg.update(changes)
    (d / CONFIG_FILE).write_text(json.dumps(cfg))


def _edit_tensors(d: Path, edit) -> None:
    tensors = load_file(str(d / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": "pt"})


def _set(key: str, value: float):
    def edit(t):
        t[key][0, 0] = value
    return edit


def _rename(old: str, new: str):
    def edit(t):
        for which in ("lora_A", "lora_B"):
            t[f"{new}.{which}.weight"] = t.pop(f"{old}.{which}.weight")
    return edit


def _narrow_input(t):
    t[f"{Q0}.lora_A.weight"] = t[f"{Q0}.lora_A.weight"][:, :48].contiguous()


def _truncate(d: Path) -> None:
    f = d / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:-16])


def _header_length(d: Path) -> None:
    """The 8-byte length field announces a 1 TiB header."""
    f = d / WEIGHTS_FILE
    f.write_bytes((2**40).to_bytes(8, "little") + f.read_bytes()[8:])


def _header_sizes(d: Path) -> None:
    """A well-formed header whose first tensor claims 10⁶ × 10⁶ floats (4 TB) in a file of a few kilobytes."""
    f = d / WEIGHTS_FILE
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    entry = header[f"{Q0}.lora_A.weight"]
    begin = entry["data_offsets"][0]
    entry.update(shape=[10**6, 10**6], data_offsets=[begin, begin + 4 * 10**12])
    text = json.dumps(header).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _manifest(files: dict):
    def edit(d: Path) -> None:
        (d / MANIFEST_FILE).write_text(json.dumps({"files": files}))
    return edit


def _symlink_out(d: Path) -> None:
    outside = d.parent / "outside.txt"
    outside.write_text("not part of the adapter")
    os.symlink(outside, d / "link")
    _manifest({"link": "0" * 64})(d)


# (id, corruption, file the line must name, problem it must state, needs the model to be detected)
CASES = [
    ("pickle", lambda d: (d / "adapter_model.bin").write_bytes(b"x"), "adapter_model.bin", "pickle file refused",
     False),
    ("nan", lambda d: _edit_tensors(d, _set(f"{Q0}.lora_A.weight", float("nan"))), WEIGHTS_FILE,
     "module model.layers.0.self_attn.q_proj contains NaN or Inf", False),
    ("inf", lambda d: _edit_tensors(d, _set(f"{Q0}.lora_B.weight", float("inf"))), WEIGHTS_FILE,
     "module model.layers.0.self_attn.q_proj contains NaN or Inf", False),
    ("ia3", lambda d: _edit_config(d, peft_type="IA3"), CONFIG_FILE, "peft_type 'IA3' is not supported (only LORA)",
     False),
    ("dora", lambda d: _edit_config(d, use_dora=True), CONFIG_FILE, "DoRA adapters are not supported", False),
    ("truncated", _truncate, WEIGHTS_FILE, "corrupted or truncated safetensors (tensor", False),
    ("header-length", _header_length, WEIGHTS_FILE,
     "corrupted or truncated safetensors (header announces 1099511627776 bytes", False),
    ("header-sizes", _header_sizes, WEIGHTS_FILE, f"'{Q0}.lora_A.weight' ends at byte ", False),
    ("rank-vs-r", lambda d: _edit_config(d, r=8), WEIGHTS_FILE,
     "has rank 4, adapter_config.json gives r = 8 (its alpha/r scale would be wrong)", False),
    ("rank-pattern", lambda d: _edit_config(d, rank_pattern={}), WEIGHTS_FILE,
     "module model.layers.0.self_attn.v_proj has rank 2, adapter_config.json gives r = 4", False),
    ("absurd-r", lambda d: _edit_config(d, r=10**6), CONFIG_FILE,
     "r = 1000000 is absurd (the reader accepts LoRA ranks up to", False),
    ("manifest-dotdot", _manifest({"../evil": "0" * 64}), MANIFEST_FILE,
     "manifest lists file '../evil', a path outside the package directory", False),
    ("manifest-absolute", _manifest({"/etc/hostname": "0" * 64}), MANIFEST_FILE,
     "manifest lists file '/etc/hostname', a path outside the package directory", False),
    ("manifest-symlink", _symlink_out, MANIFEST_FILE, "manifest lists file 'link', a symlink to", False),
    ("unknown-module", lambda d: _edit_tensors(d, _rename(Q0, Q0.replace("layers.0", "layers.7"))), WEIGHTS_FILE,
     "module model.layers.7.self_attn.q_proj is not a linear layer of tiny-llama", True),
    ("shape-vs-base", lambda d: _edit_tensors(d, _narrow_input), WEIGHTS_FILE,
     "module model.layers.0.self_attn.q_proj is 64×48, tiny-llama has 64×64", True),
]


def _one_clear_line(code: int, err: str, names: Path, problem: str) -> None:
    lines = [x for x in err.strip().splitlines() if x]
    assert code != 0
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"error: {names}: "), lines[0]
    assert problem in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_adapter_is_one_clear_line_on_eval_and_fuse(case, valid, tmp_path, cli):
    _, corrupt, fname, problem, needs_model = case
    good = valid[0]
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    corrupt(bad)
    out = tmp_path / "results.json"
    code, _, err = cli("eval", "mmlu", "--model", "tiny-llama", "--adapter", bad,
                       "--limit", 2, "--out", out)
    _one_clear_line(code, err, bad / fname, problem)
    assert not out.exists()
    fused = tmp_path / "fused"
    model = ["--model", "tiny-llama"] if needs_model else []
    code, _, err = cli("fuse", "--method", "linear", *model, "--adapters", good, bad,
                       "--out", fused)
    _one_clear_line(code, err, bad / fname, problem)
    assert not fused.exists()


def test_fuse_without_a_model_cannot_see_targets_the_base_lacks(valid, tmp_path, cli):
    """Without --model nothing knows the base's module names: that is what --model adds."""
    bad = tmp_path / "bad"
    shutil.copytree(valid[0], bad)
    _edit_tensors(bad, _rename(Q0, Q0.replace("layers.0", "layers.7")))
    code, _, err = cli("fuse", "--method", "linear", "--adapters", valid[0], bad,
                       "--out", tmp_path / "fused")
    assert code == 0, err


def test_valid_peft_adapter_evaluates_fuses_and_matches_peft(valid, tmp_path, cli):
    a, b, pm = valid
    out = tmp_path / "results.json"
    code, _, err = cli("eval", "mmlu", "--model", "tiny-llama", "--adapter", a,
                       "--limit", 2, "--out", out)
    assert code == 0, err
    assert json.loads(out.read_text())["n"] == 2
    fused = tmp_path / "fused"
    code, _, err = cli("fuse", "--method", "linear", "--model", "tiny-llama",
                       "--adapters", a, b, "--out", fused)
    assert code == 0, err
    assert (fused / WEIGHTS_FILE).is_file()
    base, _ = tiny_model()
    ours = load_adapter(a, base)
    peft_deltas = {name: mod.get_delta_weight("default") for name, mod in pm.base_model.model.named_modules()
                   if isinstance(mod, LoraLayer)}
    assert sorted(peft_deltas) == sorted(ours.modules) and len(ours.modules) == 6
    for name, delta in peft_deltas.items():
        assert rel(ours.modules[name].delta(), delta.detach()) <= 1e-6, name
    # the patterns really differ per module: rank 2 on v_proj, alpha 3 on down_proj, rsLoRA scale alpha/sqrt(r)
    v, down = ours.modules["model.layers.0.self_attn.v_proj"], ours.modules["model.layers.0.mlp.down_proj"]
    assert v.rank == 2 and abs(v.scale - 8 / 2**0.5) < 1e-9 and abs(down.scale - 3 / 2) < 1e-9
