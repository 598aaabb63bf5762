"""Artifacts users hand on get the modes the umask gives a plain open()/mkdir(): a fused adapter, an exported
GGUF (read by Ollama, which runs as its own user) and Hugging Face directory, a run's report and figures.
Each command runs under umask 022 (files 0644, directories 0755) and 077 (0600, 0700), every path checked."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from helpers.modes import mode, wrong_modes

from edgefuse.adapters import LoraAdapter, LoraModule, save_adapter
from edgefuse.artifacts import ExternalAdapterManifest
from edgefuse.models import fingerprint, tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]

REPORT_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_study_head"
TINY_SHAPES = {"q_proj": (64, 64), "v_proj": (32, 64)}  # (out, in) of the tiny Llama's projections


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """A LoRA adapter for the tiny Llama as edgefuse saves it (base name and fingerprint recorded)."""
    g = torch.Generator().manual_seed(0)
    mods = {f"model.layers.{i}.self_attn.{t}": LoraModule(0.1 * torch.randn(2, n, generator=g),
                                                          0.1 * torch.randn(m, 2, generator=g), 1.0)
            for i in range(2) for t, (m, n) in TINY_SHAPES.items()}
    d = tmp_path_factory.mktemp("modes") / "adapter"
    save_adapter(LoraAdapter(mods, base_model="tiny-llama"), d,
                 ExternalAdapterManifest(base_fingerprint=fingerprint(tiny_model()[0])), base_model="tiny-llama")
    return d


def test_fused_adapter_directory_and_files(umask, tmp_path, make_adapters, cli):
    dirs = []
    for k, a in enumerate(make_adapters(K=2)):
        dirs.append(save_adapter(a, tmp_path / f"edge{k}"))
    out = tmp_path / "fused"
    r = cli("fuse", "--method", "linear", "--adapters", *dirs, "--out", out)
    assert r.returncode == 0, r.stderr
    assert {"adapter_model.safetensors", "adapter_config.json", "edgefuse.json"} <= {p.name for p in out.iterdir()}
    assert mode(out) == umask.dir
    assert wrong_modes(out, umask) == {}


def test_export_hf_directory_and_files(umask, tmp_path, tiny_adapter, cli):
    """save_pretrained of transformers, safetensors and tokenizers inside atomic_dir: all follow the umask."""
    out = tmp_path / "hf"
    r = cli("export", "--adapter", tiny_adapter, "--out", out)
    assert r.returncode == 0, r.stderr
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert mode(out) == umask.dir
    assert wrong_modes(out, umask) == {}


def test_export_gguf_file(umask, tmp_path, tiny_adapter, cli):
    out = tmp_path / "model.gguf"
    r = cli("export", "--adapter", tiny_adapter, "--format", "gguf", "--quant", "f32", "--out", out)
    assert r.returncode == 0, r.stderr
    assert mode(out) == umask.file
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_report_figures_and_tables(umask, tmp_path, cli):
    """`edgefuse report` writes report.md, results.csv and the PNGs (a run's config.json takes the same
    atomic_write_json as test_io_modes checks)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_bytes(gzip.decompress((REPORT_FIXTURE / "results.json.gz").read_bytes()))
    r = cli("report", run)
    assert r.returncode in (0, None), r.stderr
    written = sorted(p.name for p in run.iterdir() if p.name != "results.json")
    assert "report.md" in written and "results.csv" in written and "per_domain.png" in written
    assert {n: oct(mode(run / n)) for n in written} == {n: oct(umask.file) for n in written}


def test_received_federated_package(umask, tmp_path, make_adapters):
    """The cloud writes an edge's upload with safetensors directly (no atomic_dir): still the umask's modes."""
    pytest.importorskip("flwr")
    from edgefuse.federated.records import content_to_files, package_to_content

    sent = save_adapter(make_adapters(K=1)[0], tmp_path / "sent")
    got = tmp_path / "got"
    content_to_files(package_to_content(sent), got)
    assert wrong_modes(got, umask) == {}
