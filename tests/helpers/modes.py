"""Permission checks for files edgefuse writes: what each path's mode is against what the umask gives."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import NamedTuple


class Umask(NamedTuple):
    """A process umask and the modes a plain open()/mkdir() gets under it, written out (not computed from it)."""

    mask: int
    file: int
    dir: int


UMASKS = (Umask(0o022, 0o644, 0o755), Umask(0o077, 0o600, 0o700))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def wrong_modes(root: Path, um: Umask) -> dict[str, str]:
    """Every path under ``root`` (itself included) whose mode is not ``um``'s; {} when all are right."""
    root = Path(root)
    out = {}
    for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
        want = um.dir if p.is_dir() else um.file
        if mode(p) != want:
            out[str(p.relative_to(root.parent))] = f"{oct(mode(p))} (want {oct(want)})"
    return out
