"""Model specs, the GGUF cache and fingerprints."""

from __future__ import annotations

import pytest
import torch

from edgefuse.errors import EdgefuseError
from edgefuse.models import fingerprint, load_model, tiny_model

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
