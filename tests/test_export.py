"""``edgefuse export``: merged models that other runtimes load, checked against PEFT's own forward.

The reference for every export is PEFT applying the adapter to the unmerged base (``PeftModel``), never the
merge code; exports are read back with plain transformers — the Hugging Face directory with
``from_pretrained(dir)``, the GGUF with transformers' GGUF loader (which undoes llama.cpp's Q/K permutation and
dequantizes). Bad input goes through the real CLI: one line, non-zero exit, no output and no temporary files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from helpers.families import make_config

from edgefuse.artifacts import ExternalAdapterManifest
from edgefuse.adapters import load_adapter, save_adapter
from edgefuse.errors import EdgefuseError
from edgefuse.export import rotate_pairs, write_gguf
from edgefuse.models import fingerprint, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.integration

PROMPTS = ["Question: what is two plus two? A. one B. two C. three D. four Answer: D",
           "The following are multiple choice questions (with answers) about law."]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Largest |logit difference| allowed against PEFT's forward. The tiny model's logits reach 0.69 (std 0.16) and the
# adapter moves them by up to 0.97. Measured: f32 7.3e-7 (the merged weights are stored exactly); f16 2.9e-3 (each
# weight rounded to 11 significant bits); q8_0 6.5e-2, mean 3.0e-3 (8 bits per weight, one scale per block of 32;
# ΔW of this random adapter widens the blocks' range — the base model alone measures 7.7e-3).
BOUNDS = {"f32": 1e-4, "f16": 5e-3, "q8_0": 1e-1}


def logits(model, tok):
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]  # padded positions are not compared


def peft_adapter(model, directory, targets=TARGETS, seed=0):
    """A PEFT LoRA with random A and B (non-zero ΔW) saved by PEFT itself; returns PEFT's forward logits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    pm.save_pretrained(str(directory))
    return pm


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A PEFT adapter for the tiny Llama, the same adapter as edgefuse writes it (base name + fingerprint), and
    the reference logits of base and base + adapter."""
    d = tmp_path_factory.mktemp("export")
    model, tok = tiny_model()
    base_logits = logits(model, tok)
    fp = fingerprint(model)
    pm = peft_adapter(model, d / "peft")
    ref = logits(pm, tok)
    save_adapter(load_adapter(d / "peft"), d / "ef", ExternalAdapterManifest(base_fingerprint=fp), base_model="tiny-llama")
    return {"dir": d, "tok": tok, "ref": ref, "base": base_logits}


def test_the_adapter_changes_the_model_more_than_any_bound(made):
    assert (made["ref"] - made["base"]).abs().max() > 5 * max(BOUNDS.values())


def test_hf_export_loads_with_plain_transformers_and_equals_base_plus_adapter(made, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = made["dir"] / "hf"
    r = cli("export", "--adapter", made["dir"] / "ef", "--out", out)  # --model: the adapter's recorded base
    assert r.returncode == 0, r.stderr
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (logits(model, tok) - made["ref"]).abs().max() <= BOUNDS["f32"]
    assert tok(PROMPTS).input_ids == made["tok"](PROMPTS).input_ids
    assert json.loads((out / "edgefuse_export.json").read_text())["base_model"] == "tiny-llama"


def test_a_plain_peft_adapter_exports_with_model_given(made, cli):
    from transformers import AutoModelForCausalLM

    out = made["dir"] / "hf-peft"
    r = cli("export", "--adapter", made["dir"] / "peft", "--model", "tiny-llama", "--out", out)
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert (logits(model, made["tok"]) - made["ref"]).abs().max() <= BOUNDS["f32"]


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_export_reads_back_with_transformers_within_the_stated_bound(made, quant, cli):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    out = made["dir"] / f"model-{quant}.gguf"
    r = cli("export", "--adapter", made["dir"] / "ef", "--format", "gguf", "--quant", quant, "--out", out)
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name)
    err = float((logits(model, made["tok"]) - made["ref"]).abs().max())
    assert err <= BOUNDS[quant], err
    base, _ = tiny_model()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings"):
        assert getattr(model.config, key) == pytest.approx(getattr(base.config, key)), key
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper() and types["blk.0.attn_norm.weight"] == "F32"


def test_loading_a_gguf_parses_the_file_once(made, cli, monkeypatch, tmp_path):
    """transformers parses a GGUF once per conversion step; edgefuse's load shares one reader (models.py), which
    saves a minute on Gemma 3's first load. Counted on the real loader, and the model still equals the export."""
    import gguf

    from edgefuse.models import load_model

    out = made["dir"] / "model-f32.gguf"
    if not out.exists():
        cli("export", "--adapter", made["dir"] / "ef", "--format", "gguf", "--quant", "f32", "--out", out)
    parsed = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(Path(path).name)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    monkeypatch.setenv("EDGEFUSE_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(str(out))
    assert parsed == [out.name]
    assert gguf.GGUFReader is CountingReader  # restored after the load
    assert (logits(model, made["tok"]) - made["ref"]).abs().max() <= BOUNDS["f32"]


def test_q8_0_differs_from_f32_only_by_q8_0_rounding(made, cli):
    """The q8_0 file is the f32 file with every matrix rounded by gguf's Q8_0 reference (layout, names, norms equal)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from transformers import AutoModelForCausalLM

    d = made["dir"]
    for quant in ("f32", "q8_0"):
        if not (d / f"model-{quant}.gguf").exists():
            cli("export", "--adapter", d / "ef", "--format", "gguf", "--quant", quant, "--out", d / f"model-{quant}.gguf")
    rounded = AutoModelForCausalLM.from_pretrained(str(d), gguf_file="model-f32.gguf")
    q8 = GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(dequantize(quantize(p.numpy().astype(np.float32), q8), q8)))
    back = AutoModelForCausalLM.from_pretrained(str(d), gguf_file="model-q8_0.gguf")
    assert (logits(back, made["tok"]) - logits(rounded, made["tok"])).abs().max() <= 1e-5


def test_gguf_tokenizer_metadata_reads_back_as_the_same_tokenizer(made, cli):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tok, path = made["tok"], made["dir"] / "tok.gguf"
    r = cli("export", "--adapter", made["dir"] / "ef", "--format", "gguf", "--quant", "f32", "--out", path)
    assert r.returncode == 0, r.stderr
    fields = GGUFReader(path).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert len(value("tokenizer.ggml.merges")) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id"),
            value("tokenizer.ggml.padding_token_id")) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert value("tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer adds no BOS
    back = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "Question: what is 2+2? <s> A. one\n B. twé  C. 12345 D. four Answer: D</s>"
    # transformers' GGUF loader always adds BOS for llama (it ignores add_bos_token): compare without it
    assert back(text, add_special_tokens=False).input_ids == tok(text).input_ids
    assert back.decode(tok(text).input_ids) == text


def test_tokenizer_metadata_is_copied_from_the_gguf_a_model_came_from(made, tmp_path, cli):
    from gguf import GGUFReader

    source = made["dir"] / "tok.gguf"
    if not source.exists():
        cli("export", "--adapter", made["dir"] / "ef", "--format", "gguf", "--quant", "f32", "--out", source)
    model, _ = tiny_model()
    write_gguf(model, tiny_tokenizer(), tmp_path / "copy.gguf", "f32", source_gguf=source)
    want, got = GGUFReader(source).fields, GGUFReader(tmp_path / "copy.gguf").fields
    keys = sorted(k for k in want if k.startswith("tokenizer."))
    assert keys == sorted(k for k in got if k.startswith("tokenizer.")) and "tokenizer.ggml.merges" in keys
    for key in keys:
        assert got[key].contents() == want[key].contents(), key


def test_rotate_pairs_is_llama_cpp_layout():
    """Within a head of size d, transformers rotates row i with row i + d/2; llama.cpp rotates rows 2i and 2i+1."""
    heads, d = 2, 6
    w = torch.arange(heads * d).reshape(heads * d, 1)
    got = rotate_pairs(w, heads).flatten().tolist()
    want = [h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)]
    assert got == want


def family_model(case: str, **overrides):
    """A tiny random model of a family (as in the family matrix), with config overrides."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = make_config(case, tok)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
    model.config.name_or_path = f"tiny-{case}"
    return model.eval(), tok


# Qwen3 with its real head_dim (transformers' GGUF loader does not read it and assumes 128); Mistral without a
# sliding window (llama.cpp writes and runs Mistral as a llama model, which has none)
@pytest.mark.parametrize("case, overrides", [("qwen2", {}), ("qwen3", {"head_dim": 128}),
                                             ("mistral", {"sliding_window": None})])
def test_gguf_families_read_back_exactly(tmp_path, case, overrides):
    from transformers import AutoModelForCausalLM

    model, tok = family_model(case, **overrides)
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert (logits(back, tok) - logits(model, tok)).abs().max() <= BOUNDS["f32"]


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """Base-model directories and adapters that export must refuse: another seed's Llama (fingerprint), and
    families or features GGUF export does not write."""
    d = tmp_path_factory.mktemp("others")
    other, tok = tiny_model(seed=1)
    other.save_pretrained(str(d / "seed1"))
    tok.save_pretrained(str(d / "seed1"))
    for case, overrides in [("phi3", {}), ("gemma2", {}), ("llama-bias", {}), ("mistral", {})]:
        model, tok = family_model(case, **overrides)
        model.save_pretrained(str(d / case))
        tok.save_pretrained(str(d / case))
        peft_adapter(model, d / f"{case}-adapter", targets=["o_proj"])
    return d


@pytest.mark.parametrize("args, msg", [
    (["--model", "{o}/seed1"], "adapter was made for base model"),
    (["--format", "onnx"], "unknown --format 'onnx'; valid: hf, gguf"),
    (["--format", "gguf", "--quant", "q4_k"], "unknown --quant 'q4_k'; valid: f32, f16, q8_0"),
    (["--quant", "f16"], "--quant applies to --format gguf only"),
    (["--adapter", "{o}/phi3-adapter", "--model", "{o}/phi3", "--format", "gguf"],
     "GGUF export does not support model_type 'phi3'; supported: llama, mistral, qwen2, qwen3"),
    (["--adapter", "{o}/gemma2-adapter", "--model", "{o}/gemma2", "--format", "gguf"],
     "does not support model_type 'gemma2'"),
    (["--adapter", "{o}/llama-bias-adapter", "--model", "{o}/llama-bias", "--format", "gguf"],
     "llama models with attention or MLP biases"),
    (["--adapter", "{o}/mistral-adapter", "--model", "{o}/mistral", "--format", "gguf"], "no sliding window"),
])
def test_bad_input_is_one_clear_line_and_no_output(made, others, tmp_path, args, msg, cli):
    for out in (tmp_path / "x", tmp_path / "x.gguf"):
        argv = ["export", "--adapter", made["dir"] / "ef", *[a.format(o=others) for a in args], "--out", out]
        r = cli(*argv)
        assert r.returncode != 0
        assert msg in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


def test_a_failure_while_writing_leaves_the_previous_output_untouched(made, tmp_path, monkeypatch):
    import edgefuse.export as ex

    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")

    def broken(t, quant):
        raise EdgefuseError("disk full")

    monkeypatch.setattr(ex, "_encode", broken)
    with pytest.raises(EdgefuseError, match="disk full"):
        ex.export(made["dir"] / "ef", out, fmt="gguf", quant="f16", force=True)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_an_existing_output_needs_force_and_a_gguf_is_a_file(made, tmp_path, cli):
    out = tmp_path / "hf"
    out.mkdir()
    r = cli("export", "--adapter", made["dir"] / "ef", "--out", out)
    assert r.returncode != 0 and "already exists (pass --force to overwrite)" in r.stderr
    r = cli("export", "--adapter", made["dir"] / "ef", "--format", "gguf", "--out", out, "--force")
    assert r.returncode != 0 and "--out of a GGUF export is a file" in r.stderr
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_q8_0_is_refused_clearly_where_gguf_cannot_quantize(made, tmp_path, monkeypatch, cli):
    import edgefuse.export as ex

    monkeypatch.setattr(ex, "_q8_0_available", lambda: False)
    r = cli("export", "--adapter", made["dir"] / "ef", "--format", "gguf", "--quant", "q8_0", "--out", tmp_path / "m")
    assert r.returncode != 0 and "--quant q8_0 needs gguf's Q8_0 quantizer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_tokenizer_gguf_cannot_describe_is_refused_before_any_output(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, tok = tiny_model()
    words = Tokenizer(models.WordLevel({t: i for t, i in tok.get_vocab().items()}, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(EdgefuseError, match="byte-level BPE tokenizers only; this one is WordLevel"):
        write_gguf(model, PreTrainedTokenizerFast(tokenizer_object=words), tmp_path / "m.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_gguf_export_round_trip(tmp_path, cli):
    """The embedded SmolLM2 with a small adapter: f32 GGUF equals PEFT's forward, its tokenizer is the embedded one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgefuse.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    fp = fingerprint(model)
    pm = peft_adapter(model, tmp_path / "peft", targets=["q_proj", "k_proj"])
    ref = logits(pm, tok)
    save_adapter(load_adapter(tmp_path / "peft"), tmp_path / "ef", ExternalAdapterManifest(base_fingerprint=fp), base_model="smollm2-135m")
    r = cli("export", "--adapter", tmp_path / "ef", "--format", "gguf", "--quant", "f32", "--out", tmp_path / "s.gguf")
    assert r.returncode == 0, r.stderr
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    # relative to the logits' size: SmolLM2's reach ~23, and 30 layers of float32 sums taken in another order
    # (merged weights vs PEFT's separate B·A) differ by ~1e-4 (measured 1.0e-4); the tiny model's stay < 1e-6
    got = logits(back, tok)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    assert back_tok(PROMPTS[0]).input_ids == tok(PROMPTS[0]).input_ids


def test_gguf_add_bos_token_is_what_edgefuse_scores_and_trains_with():
    """An exported GGUF says add_bos_token exactly when edgefuse puts a BOS first (`edgefuse.tokens`): a
    tokenizer that prepends its BOS gets it, one that adds nothing does not, and a BOS that is also the EOS
    (transformers' GGUF conversion of SmolLM2) does not count."""
    import copy

    from helpers.bos_tokenizer import with_default_bos

    from edgefuse.export import _adds_special
    from edgefuse.models import load_model

    _, tok = load_model("tiny-llama")
    assert _adds_special(tok)["bos"] is False
    bos_first = with_default_bos(tok)
    assert _adds_special(bos_first)["bos"] is True
    bos_is_eos = copy.deepcopy(bos_first)
    bos_is_eos.eos_token = bos_is_eos.bos_token
    assert bos_is_eos("a").input_ids[:1] == [bos_is_eos.bos_token_id]  # it still prepends the token
    assert _adds_special(bos_is_eos)["bos"] is False
