"""Model specs, the GGUF cache, fingerprints, and the helpers every layer shares over a loaded model."""

from __future__ import annotations

import pytest
import torch

from edgefuse.artifacts import PrunedModelMeta
from edgefuse.errors import EdgefuseError
from edgefuse.edge.schema import MODEL_META
from edgefuse.models import fingerprint, lm_parts, load_model, make_batch, save_model_dir, tiny_model, unwrap

pytestmark = pytest.mark.unit


def test_tiny_model_is_deterministic_and_fingerprint_tracks_weights():
    a, _ = tiny_model(seed=0)
    b, _ = tiny_model(seed=0)
    c, _ = tiny_model(seed=1)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)
    d, _ = tiny_model(seed=0)
    with torch.no_grad():
        d.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert fingerprint(d) != fingerprint(a)


def test_local_directory_round_trip(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    m2, _ = load_model(str(tmp_path / "m"), device="cpu")
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(m2(x).logits, model(x).logits, atol=1e-6)
    assert fingerprint(m2) == fingerprint(model)


def test_pickle_checkpoints_are_refused(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(EdgefuseError, match="pytorch_model.bin: pickle file refused"):
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("spec, msg", [("no-such-model", "unknown model spec"), ("/nope/x.gguf", "GGUF file not found")])
def test_bad_specs(spec, msg):
    with pytest.raises(EdgefuseError, match=msg):
        load_model(spec)


def test_missing_embedded_package_says_make_setup(monkeypatch):
    import importlib.metadata as md

    from edgefuse import assets

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(assets.md, "distribution", missing)
    with pytest.raises(EdgefuseError, match="make setup"):
        assets.smollm2_gguf()


def test_a_directory_named_in_its_edgefuse_meta_file_loads_under_that_name(tmp_path, tiny):
    """The loader reads the meta file pruning writes (`edgefuse.edge.schema.MODEL_META`), by the same name."""
    model, tok = tiny
    meta = PrunedModelMeta(name="tiny-llama-width-0.5", plan_hash="0" * 64, base_fingerprint="1" * 32,
                           pruned_fingerprint="2" * 32)
    save_model_dir(model, tok, tmp_path / "m", extra_json={MODEL_META: meta.dump()})
    loaded, _ = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.config.name_or_path == "tiny-llama-width-0.5"


@pytest.mark.parametrize("side, ids, mask, last", [
    ("right", [[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]], [2, 1]),
    ("left", [[5, 6, 7], [0, 8, 9]], [[1, 1, 1], [0, 1, 1]], [2, 2]),
])
def test_make_batch_pads_and_counts_positions_over_real_tokens_only(side, ids, mask, last):
    """Hand-worked: the shorter row's real tokens sit at positions 0, 1 on either side of its padding."""
    b = make_batch([[5, 6, 7], [8, 9]], pad_id=0, padding_side=side, device="cpu")
    assert b.input_ids.tolist() == ids and b.attention_mask.tolist() == mask and b.last_index.tolist() == last
    real_positions = [[p for p, m in zip(pos, row) if m] for pos, row in zip(b.position_ids.tolist(), mask)]
    assert real_positions == [[0, 1, 2], [0, 1]]


def test_lm_parts_recompose_the_models_logits_through_a_peft_wrapper():
    """Body then head gives the full model's logits, also when PEFT wraps the model (`unwrap`)."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model()  # a fresh copy: PEFT injects LoRA layers in place
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert unwrap(wrapped) is model
    body, head, softcap = lm_parts(wrapped)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(head(body(input_ids=x).last_hidden_state), model(x).logits, atol=1e-6)
    assert softcap is None


def _no_weights(monkeypatch):
    """Any weight load fails: the architecture must come from configs alone."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("edgefuse.models.load_model", refuse)


def test_architecture_shapes_from_config_alone(tiny, tmp_path, monkeypatch):
    """The tiny model and a directory holding only a config.json give the loaded model's linear layers; a spec
    with no config at hand offline is one line."""
    from edgefuse.models import architecture_shapes, linear_shapes

    model, _ = tiny
    _no_weights(monkeypatch)
    assert architecture_shapes("tiny-llama") == linear_shapes(model)
    model.config.save_pretrained(tmp_path / "cfg-only")
    assert architecture_shapes(str(tmp_path / "cfg-only")) == linear_shapes(model)
    for spec in ("nope", "nobody/not-in-the-local-hub-cache", str(tmp_path)):
        with pytest.raises(EdgefuseError):
            architecture_shapes(spec)


def test_architecture_of_an_embedded_model_prefers_its_cached_conversion(isolated_cache, tiny, monkeypatch):
    """An embedded GGUF's architecture comes from the config.json of its cached conversion when there is one
    (here a stand-in config, to show that is what was read), never from its weights."""
    from edgefuse.assets import gguf_location
    from edgefuse.models import architecture_shapes, gguf_cache_dir, linear_shapes

    model, _ = tiny
    _no_weights(monkeypatch)
    model.config.save_pretrained(gguf_cache_dir(gguf_location("smollm2-135m")))
    assert architecture_shapes("smollm2-135m") == linear_shapes(model)


@pytest.mark.slow
def test_architecture_of_an_embedded_model_from_gguf_metadata(isolated_cache, monkeypatch):
    """No cached conversion: SmolLM2-135M's layers from the GGUF's metadata (30 layers, hidden 576, 3 KV heads of
    64, MLP 1536), no weights dequantized."""
    from edgefuse.models import architecture_shapes

    _no_weights(monkeypatch)
    shapes = architecture_shapes("smollm2-135m")
    assert shapes["model.layers.0.self_attn.k_proj"] == (192, 576)
    assert shapes["model.layers.29.mlp.down_proj"] == (576, 1536)
    assert not any(n.startswith("model.layers.30.") for n in shapes)
