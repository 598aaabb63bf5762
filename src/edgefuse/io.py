"""Safe file I/O shared by every stage.

Why: a crash or bad input must never leave half-written artifacts, and only formats that cannot run
code (safetensors, JSON) are ever read. Writes go to a temporary sibling and are renamed into place; a
write the machine refuses (a full disk, a read-only directory) is one `WriteError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from edgefuse.errors import EdgefuseError, WriteError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line of a JSONL file; a malformed line raises one error
    naming ``path:line``, a file that is not UTF-8 one naming the file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EdgefuseError("not UTF-8 text", path=path) from None
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EdgefuseError(f"malformed JSON ({e.msg})", path=path, line=n) from None
        yield n, row


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace variance, so hashes of configs are stable."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_obj(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode())


def jsonable(obj: Any) -> Any:
    """What JSON can carry of ``obj``: statistics may hold tensors, numpy scalars or tuples (results.json, stage
    results); mappings get string keys, numbers become int/float, anything else its ``tolist()`` or ``str``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, numbers.Number):
        return float(obj) if not isinstance(obj, int) else int(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# errno values that mean the machine refused a write (disk or quota full, read-only or forbidden place)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM})


def write_failure(err: BaseException) -> str | None:
    """The OS's reason when ``err`` is a refused write, else None (also safetensors' Rust errors: "os error 28")."""
    if isinstance(err, OSError):
        return (err.strerror or str(err)) if err.errno in WRITE_ERRNOS else None
    m = re.search(r"os error (\d+)", str(err))
    return os.strerror(int(m[1])) if m and int(m[1]) in WRITE_ERRNOS else None


@contextlib.contextmanager
def writing(path: str | Path, always: bool = False) -> Iterator[None]:
    """Turn a refused write inside the block into one `WriteError` naming ``path`` (also one raised for a file
    inside it: a temporary name means nothing to the user).

    ``always``: every OSError of the block is a write failure (the block only creates or writes ``path``).
    """
    try:
        yield
    except WriteError as e:
        raise WriteError(e.reason, path=path) from None
    except EdgefuseError:
        raise
    except Exception as e:
        why = (e.strerror or str(e)) if always and isinstance(e, OSError) else write_failure(e)
        if why is None:
            raise
        raise WriteError(why, path=path) from None


_UMASK_LOCK = threading.Lock()
_STATUS = "/proc/self/status"  # Linux: holds "Umask:\t0022"


def current_umask() -> int:
    """The process's umask, read afresh (a user or a test may change it between writes).

    Why not only ``os.umask(x); os.umask(old)``: the umask is process-wide, so for that instant every other
    thread would create files under ``x``. Linux (4.7+) reports it in /proc/self/status, which changes nothing;
    elsewhere the swap sets the most private 077 (a file made meanwhile is private, never world-writable) under
    a lock, so two edgefuse writers never read each other's stand-in.
    """
    with contextlib.suppress(OSError, ValueError):
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def publish(path: str | Path, umask: int | None = None) -> None:
    """Give a finished temporary file or directory the mode a plain open()/mkdir() would have given it.

    Why: mkstemp/mkdtemp create 0600/0700, so renamed artifacts would stay private to this user even under
    umask 0022 (a GGUF for Ollama, a run directory for teammates). A file with an execute bit keeps it.
    """
    now = os.stat(path).st_mode
    base = 0o777 if stat.S_ISDIR(now) or now & 0o111 else 0o666
    os.chmod(path, base & ~(current_umask() if umask is None else umask))


def publish_tree(root: str | Path) -> None:
    """`publish` ``root`` and everything under it (symlinks left alone: chmod would follow them out).

    Why the whole tree: not every writer follows the umask; safetensors >= 0.8 writes through its own 0600
    temporary file (safetensors issue 782), also inside transformers' save_pretrained.
    """
    umask = current_umask()
    publish(root, umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                publish(p, umask)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block finishes.

    The temporary file stays private (0600) while written; the finished one gets the umask's mode (`publish`)."""
    path = Path(path)
    with writing(path, always=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with writing(path, always=True):
            yield tmp
            publish(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def atomic_write_png(fig: Any, path: str | Path, dpi: int) -> None:
    """A matplotlib figure as PNG, written like every other file (a temporary sibling, then renamed)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log file (a refused write is one `WriteError` naming the file)."""
    with writing(path, always=True), open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error.

    Everything in it gets the umask's modes when it is finished (`publish_tree`), whatever wrote it."""
    path = Path(path)
    with writing(path, always=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with writing(path):
            yield tmp
            publish_tree(tmp)
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


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block: two processes filling
    the same cache entry (two test workers, two studies) then build it once instead of racing to replace it.
    POSIX ``flock``; elsewhere the block runs unlocked and the atomic rename still keeps the entry whole."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(path)
    with writing(path, always=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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


SAFETENSORS_MAX_HEADER = 100 * 2**20  # bytes; the safetensors library's own limit on the JSON header
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                           "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def _corrupt(path: Path, detail: str) -> EdgefuseError:
    return EdgefuseError(f"corrupted or truncated safetensors ({detail})", path=path)


def _check_tensor_entry(name: str, info: Any, data_bytes: int, path: Path) -> None:
    """One header entry: a known dtype, a shape, and offsets that hold exactly that many bytes inside the file."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        numbers = (*shape, begin, end)
    except (KeyError, TypeError, ValueError):
        raise _corrupt(path, f"tensor {name!r} has a malformed header entry") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in numbers):
        raise _corrupt(path, f"tensor {name!r} has a malformed header entry")
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        raise _corrupt(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
    need = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
    if end - begin != need:
        raise _corrupt(path, f"tensor {name!r} of shape {list(shape)} needs {need} bytes, its offsets span {end - begin}")
    if end > data_bytes:
        raise _corrupt(path, f"tensor {name!r} ends at byte {end} of the data, the file holds {data_bytes}")


def safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file (name → dtype, shape, data_offsets), checked against the file size.

    Why: read before anything is allocated, so a truncated file or a header announcing terabytes is one clear
    error instead of a traceback or an allocation the size of the claim.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgefuseError("file not found", path=path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = f.read(8)
        if len(length) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(length, "little")
        if n > min(SAFETENSORS_MAX_HEADER, size - 8):
            raise _corrupt(path, f"header announces {n} bytes, the file holds {size - 8} after the length field")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in tensors.items():
        _check_tensor_entry(name, info, size - 8 - n, path)
    return tensors


def load_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """Load a safetensors file whose header was checked first, turning any corruption into a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    safetensors_header(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, (str(e).splitlines() or [type(e).__name__])[0]) from None
