"""The real ``edgefuse`` entry point, run in-process or as a subprocess.

In-process is the default: a subprocess pays a Python + torch start-up (seconds on the 2-core machine) per call.
It runs `edgefuse.cli.main` — not typer's ``CliRunner().invoke(app)`` — because ``main`` is what turns an
`EdgefuseError` into the one ``error: ...`` line on stderr and the exit code, which is what the tests check.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from typing import NamedTuple


class CliResult(NamedTuple):
    """What a command gave: unpacks as ``(code, out, err)`` and reads like `subprocess.CompletedProcess`."""

    returncode: int
    stdout: str
    stderr: str


def _exit_code(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def run_cli(*args, env: dict[str, str] | None = None) -> CliResult:
    """``edgefuse ARGS`` in this process; ``env`` adds variables for the call only."""
    from edgefuse.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, code = sys.argv, dict(os.environ), 0
    sys.argv = ["edgefuse", *map(str, args)]
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = _exit_code(e)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli_process(*args, env: dict[str, str] | None = None, timeout: float = 600) -> CliResult:
    """``python -m edgefuse.cli ARGS`` in a fresh process: for the one smoke test per command only."""
    r = subprocess.run([sys.executable, "-m", "edgefuse.cli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    return CliResult(r.returncode, r.stdout, r.stderr)
