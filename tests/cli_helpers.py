"""The real ``edgefuse`` entry point run in-process (a subprocess per call costs seconds of imports)."""

from __future__ import annotations

import sys

from edgefuse.cli import main


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``edgefuse ARGS``."""
    monkeypatch.setattr(sys, "argv", ["edgefuse", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    cap = capsys.readouterr()
    return code, cap.out, cap.err
