"""Shared fixtures, and the rule that every test names its layer.

Layers (markers, defined in pyproject.toml): ``unit``, ``integration``, ``e2e``, ``federated``; ``slow`` is added
to whatever loads an embedded model. A module names its layer once (``pytestmark``); a test that differs adds
its own (e.g. ``e2e`` on a test in a unit module that starts fresh processes), and ``-m "not e2e"`` leaves it
out. `make test-fast` runs unit + integration only.

Fixtures: the seeded tiny Llama (``tiny``), the embedded MMLU (``mmlu``), an isolated cache, the in-process CLI
(``cli``), one intra-op thread (``single_thread``), synthetic LoRA adapters (``make_adapters``), the tiny study
config (``tiny_study``), llama.cpp's reference segmenter (``llama_cpp_segment``) and the process umask
(``umask``, 022 then 077). Shared code lives in tests/helpers; test modules never import from one another.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers.modes import UMASKS

# `make test` runs one pytest worker per core (pytest-xdist); each then takes its share of the cores
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // WORKERS))

LAYERS = ("unit", "integration", "e2e", "federated")


def pytest_collection_modifyitems(config, items):
    """Refuse a test that names no layer, so `-m` selections (make test-fast) never miss a new test silently."""
    missing = [item.nodeid for item in items if not any(item.get_closest_marker(m) for m in LAYERS)]
    if missing:
        raise pytest.UsageError(f"tests without a layer marker ({', '.join(LAYERS)}): " + ", ".join(missing[:5])
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded tiny Llama; do not mutate it in tests."""
    from edgefuse.models import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def mmlu():
    from edgefuse.data.mmlu import load_mmlu

    return load_mmlu()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFUSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def cli():
    """``cli(*args, env=None)`` runs ``edgefuse ARGS`` in this process through the real entry point and returns
    ``(returncode, stdout, stderr)`` (a named tuple). Usable from module-scoped fixtures too."""
    from helpers.cli import run_cli

    return run_cli


@pytest.fixture(scope="session")
def cli_process():
    """The same in a fresh ``python -m edgefuse.cli`` process: only for the one smoke test per command."""
    from helpers.cli import run_cli_process

    return run_cli_process


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests: thread wake-ups cost more than they save there,
    above all on a loaded 2-core machine. Use as ``pytest.mark.usefixtures("single_thread")``."""
    from edgefuse.fusion.context import single_threaded_ops

    with single_threaded_ops():
        yield


@pytest.fixture(scope="session")
def make_adapters():
    """``make_adapters(K=3, ranks=(2, 4, 6), seed=0, names=NAMES, scales=...)``: seeded random LoRA adapters
    (`edgefuse.adapters.LoraAdapter`) of mixed ranks and scales over a few small modules."""
    from helpers.fusion import make_adapters

    return make_adapters


@pytest.fixture
def tiny_study():
    """A fresh copy of the tiny study config (tiny Llama, two edges, two methods with and without LoRA-CR)."""
    from helpers.study import TINY_STUDY

    return copy.deepcopy(TINY_STUDY)


@pytest.fixture(params=UMASKS, ids=lambda u: f"umask{u.mask:03o}")
def umask(request):
    """Run the test under umask 022 and again under 077; yields `helpers.modes.Umask` (the mask and the file and
    directory modes it gives). The old umask comes back afterwards (os.umask returns it)."""
    old = os.umask(request.param.mask)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture(scope="session")
def llama_cpp_segment():
    """``llama_cpp_segment(text, vocab, scores) -> ids``: llama.cpp's SentencePiece rule written plainly."""
    from helpers.llama_cpp import llama_cpp_segment

    return llama_cpp_segment
