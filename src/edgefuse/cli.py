"""The ``edgefuse`` command line: thin — parses options, calls the library, prints tables.

Each stage lives in its own module under ``edgefuse.commands`` with a ``register(app)`` function, so
stages can grow independently. Any `EdgefuseError` becomes one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer

from edgefuse.commands import COMMAND_MODULES
from edgefuse.errors import EdgefuseError

app = typer.Typer(
    name="edgefuse",
    help="Cloud-edge LoRA collaboration: prune, train on edges, recover, fuse (+LoRA-CR), evaluate (MMLU, MMLU-CD).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _module in COMMAND_MODULES:
    _module.register(app)


def main() -> None:
    try:
        app()
    except EdgefuseError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
