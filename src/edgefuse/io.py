"""Safe file I/O shared by every stage.

Why: a crash or bad input must never leave half-written artifacts, and only formats that cannot run
code (safetensors, JSON) are ever read. Writes go to a temporary sibling and are renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgefuse.errors import EdgefuseError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace variance, so hashes of configs are stable."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_obj(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode())


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise EdgefuseError("already exists (pass --force to overwrite)", path=path)
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EdgefuseError("file not found", path=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EdgefuseError(f"malformed JSON ({e.msg})", path=path, line=e.lineno) from None
    except UnicodeDecodeError:
        raise EdgefuseError("not UTF-8 text", path=path) from None


def refuse_pickles(directory: str | Path) -> None:
    """Refuse any directory that carries pickle files: loading them can execute arbitrary code."""
    directory = Path(directory)
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.suffix in PICKLE_SUFFIXES:
            raise EdgefuseError(
                "pickle file refused (edgefuse reads only safetensors and JSON; convert it with safetensors)",
                path=p,
            )


def load_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """Load a safetensors file, turning corruption into a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise EdgefuseError("file not found", path=path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise EdgefuseError(f"corrupted or unreadable safetensors ({str(e).splitlines()[0]})", path=path) from None
