"""One `edgefuse run` at a time per run directory: a lock file holding the holder's pid and host.

Why: two studies in one run directory would train, fuse and rename the same stage directories under each
other, and each would read back what the other half-wrote. The lock file is created atomically
(O_CREAT | O_EXCL: of two processes exactly one creates it), holds ``{"pid", "host"}`` so the second run
can say who holds the directory, and is removed when the run ends, on errors too. A process killed
outright (SIGKILL, power loss) leaves its lock behind; the next run on the same host sees that the pid
no longer runs, takes the lock over and says so in the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from edgefuse.errors import EdgefuseError, WriteError
from edgefuse.io import writing

LOCK_FILE = "run.lock"



def _holder(lock: Path) -> dict | None:
    """The lock's ``{"pid", "host"}``; None when it is gone, {} while unreadable (being written, or not ours)."""
    try:
        doc = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and isinstance(doc.get("pid"), int) else {}


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process of this host (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _take_over(lock: Path, stale: dict) -> bool:
    """Remove the lock of a dead process, unless another run took it over first (then it is left to that run)."""
    moved = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.replace(lock, moved)  # atomic: of two runs taking over, each moves whatever lock is there now
    except FileNotFoundError:
        return False
    ours = _holder(moved) == stale
    if not ours:  # a fresh lock another run had just created: give it back
        with contextlib.suppress(OSError):
            os.link(moved, lock)
    moved.unlink(missing_ok=True)
    return ours


def _refuse(lock: Path, holder: dict) -> EdgefuseError:
    if not holder:
        return EdgefuseError("unreadable lock file in the run directory; delete it if no edgefuse run uses "
                             "this directory", path=lock)
    return EdgefuseError(f"another edgefuse run (pid {holder['pid']} on {holder.get('host')}) is using this run "
                         "directory; wait for it to end, or delete this file if that process is not an edgefuse run",
                         path=lock)


def acquire(run_dir: Path) -> tuple[Path, dict | None]:
    """Create ``run_dir/run.lock`` for this process; refuse with one line while a live run holds it.

    Returns the lock and the holder of a stale lock this process took over (None if there was none)."""
    lock = Path(run_dir) / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    stale = None
    for attempt in range(20):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder == {} and attempt < 10:  # just created, not yet written: look again
                time.sleep(0.05)
                continue
            if holder is None:
                continue
            if not holder or holder.get("host") != me["host"] or _running(holder["pid"]):
                raise _refuse(lock, holder) from None
            stale = holder if _take_over(lock, holder) else stale
            continue
        except OSError as e:  # a read-only or otherwise unwritable run directory
            raise WriteError(e.strerror or str(e), path=run_dir) from None
        try:
            with writing(lock, always=True), os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me) + "\n")
        except BaseException:
            lock.unlink(missing_ok=True)
            raise
        return lock, stale
    raise _refuse(lock, _holder(lock) or {})


def release(lock: Path) -> None:
    """Remove the lock if it is still this process's (never another run's that took over a deleted one)."""
    holder = _holder(lock)
    if holder and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[dict | None]:
    """Hold the run directory's lock for the block, which gets the holder of a stale lock taken over (or None).

    The directory is created if missing and removed again if the block left it empty (a refused run)."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    with writing(run_dir, always=True):
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock, stale = acquire(run_dir)
        try:
            yield stale
        finally:
            release(lock)
    finally:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def stale_note(stale: dict, run_dir: Path) -> str:
    """The log line for a lock taken over from a process that no longer runs."""
    return (f"run directory: took over the lock of pid {stale['pid']} on {stale.get('host')}, which no longer runs "
            f"({Path(run_dir) / LOCK_FILE})")
