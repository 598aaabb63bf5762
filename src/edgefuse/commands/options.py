"""Options shared by every command that loads a model: ``--device`` and ``--dtype``.

Both default to None so that `edgefuse.precision.resolve` alone decides the defaults (cuda when torch sees a
GPU, else cpu; float32) for the CLI, the study config and the library alike.
"""

from __future__ import annotations

import typer


def device_option():
    return typer.Option(None, "--device", help="cpu | cuda | cuda:N | mps (default: cuda when available, else cpu).")


def dtype_option(what: str = "Dtype of the base weights"):
    return typer.Option(None, "--dtype", help=f"{what}: float32 (default) | bfloat16 | float16.")
