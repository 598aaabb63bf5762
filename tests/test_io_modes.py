"""File modes of what io.py's atomic writers finish: what the umask gives a plain open()/mkdir() (files 0644 and
directories 0755 under umask 022, 0600 and 0700 under 077), not mkstemp's 0600 or mkdtemp's 0700."""

from __future__ import annotations

import os

import pytest
from helpers.modes import mode, wrong_modes

from edgefuse import io
from edgefuse.io import (atomic_dir, atomic_file, atomic_write_json, atomic_write_png, atomic_write_text,
                         current_umask)

pytestmark = pytest.mark.unit


def test_current_umask_reads_the_process_umask(umask):
    assert current_umask() == umask.mask
    assert os.umask(umask.mask) == umask.mask  # reading it changed nothing


def test_without_proc_the_umask_is_read_by_swapping_it_back(umask, monkeypatch, tmp_path):
    monkeypatch.setattr(io, "_STATUS", str(tmp_path / "no-such-file"))
    assert current_umask() == umask.mask
    assert os.umask(umask.mask) == umask.mask


def test_atomic_file_is_private_while_written_and_umask_mode_when_finished(umask, tmp_path):
    path = tmp_path / "out.bin"
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"x")
        assert mode(tmp) == 0o600
    assert mode(path) == umask.file


def test_atomic_file_replacing_a_file_gives_the_umask_mode(umask, tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    os.chmod(path, 0o400)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == umask.file


@pytest.mark.parametrize("write", [
    lambda p: atomic_write_text(p, "report"),
    lambda p: atomic_write_json(p, {"a": 1}),
], ids=["text", "json"])
def test_atomic_writers_give_the_umask_mode(umask, tmp_path, write):
    path = tmp_path / "new" / "config.json"
    write(path)
    assert mode(path) == umask.file
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temporary left


def test_atomic_write_png_gives_the_umask_mode(umask, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    try:
        atomic_write_png(fig, tmp_path / "fig.png", dpi=20)
    finally:
        plt.close(fig)
    assert mode(tmp_path / "fig.png") == umask.file


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_atomic_dir_and_everything_in_it_get_the_umask_modes(umask, tmp_path, existing):
    out = tmp_path / "adapter"
    if existing:
        out.mkdir(mode=0o700)
    with atomic_dir(out) as tmp:
        assert mode(tmp) == 0o700  # private while it is being filled
        (tmp / "plain.txt").write_text("open()")
        (tmp / "sub").mkdir()
        atomic_write_json(tmp / "sub" / "nested.json", {})
    assert mode(out) == umask.dir
    assert wrong_modes(out, umask) == {}
    assert sorted(p.name for p in out.rglob("*")) == ["nested.json", "plain.txt", "sub"]


def test_atomic_dir_widens_what_writers_made_private(umask, tmp_path):
    """safetensors >= 0.8 renames its own 0600 temporary file into place (safetensors issue 782)."""
    import torch
    from safetensors.torch import save_file

    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o600)
    with atomic_dir(tmp_path / "model") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        os.close(os.open(tmp / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600))
        os.mkdir(tmp / "hidden", 0o700)
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "run.sh", 0o700)
        (tmp / "link").symlink_to(outside)
    out = tmp_path / "model"
    assert {p: mode(out / p) for p in ("model.safetensors", "private.bin", "hidden", "run.sh")} == {
        "model.safetensors": umask.file, "private.bin": umask.file, "hidden": umask.dir, "run.sh": umask.dir}
    assert mode(outside) == 0o600  # the symlink was not followed


def test_a_failed_atomic_file_leaves_nothing(umask, tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "x") as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
