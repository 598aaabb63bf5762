"""``edgefuse compose ...``: dynamic composition of adapters (`edgefuse.compose`); ``compose lorahub`` learns
LoraHub weights on a few public-split MMLU examples and writes the fused adapter; ``compose embed`` attaches
an adapter's retrieval embedding (run on the edge, on its own examples)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edgefuse.commands.options import device_option
from edgefuse.compose.embedding import embed_adapter_dir
from edgefuse.compose.schema import DEFAULT_EMBEDDING_EXAMPLES, LORAHUB_BUDGET, LORAHUB_EXAMPLES, LORAHUB_METHOD
from edgefuse.errors import EdgefuseError


def _domains(values: Optional[list[str]]) -> list[str]:
    return [d.strip() for v in values or [] for d in v.split(",") if d.strip()]


def register(app: typer.Typer) -> None:
    """Add the ``compose`` group and its ``lorahub`` command."""
    compose = typer.Typer(help="Dynamic composition of adapters (LoraHub weights, retrieval embeddings).",
                          no_args_is_help=True)
    app.add_typer(compose, name="compose")

    @compose.command("lorahub")
    def lorahub(
        dirs: Optional[list[Path]] = typer.Argument(None, help="adapter directories (after --adapters)",
                                                    show_default=False),
        adapters_flag: bool = typer.Option(False, "--adapters", help="the adapter directories follow"),
        domains: Optional[list[str]] = typer.Option(None, "--domains",
                                                    help="MMLU domains of the examples: stem,humanities or repeat"),
        examples: int = typer.Option(LORAHUB_EXAMPLES, "--examples", help="public-split examples the weights are learned on"),
        budget: int = typer.Option(LORAHUB_BUDGET, "--budget", help="optimiser evaluations after the start's (>= 0)"),
        method: str = typer.Option(LORAHUB_METHOD, "--method", "-m", help="fusion method the weights feed"),
        objective: str = typer.Option("letters", "--objective", help="letters | cloze"),
        start: str = typer.Option("uniform", "--start", help="uniform (1/K each) | zeros (the paper's)"),
        model: Optional[str] = typer.Option(None, "--model", help="base model (default: the adapters' own)"),
        mmlu: Optional[str] = typer.Option(None, "--mmlu", help="MMLU source (default: the embedded copy)"),
        seed: int = typer.Option(0, "--seed"),
        force: bool = typer.Option(False, "--force", help="overwrite --out; skip the adapters' model checks"),
        out: Optional[Path] = typer.Option(None, "--out", help="output adapter directory"),
        device: Optional[str] = device_option(),
    ) -> None:
        """Learn one weight per adapter (LoraHub, nevergrad NGOpt) and write the fused adapter."""
        from edgefuse.compose.lorahub import lorahub_dirs  # local: torch-backed, kept off the CLI start-up path (+4 ms on `edgefuse --help`, measured)

        if out is None:
            raise EdgefuseError("--out is required")
        if start not in ("uniform", "zeros"):
            raise EdgefuseError(f"--start must be uniform or zeros, got {start!r}")
        res = lorahub_dirs(dirs or [], out, _domains(domains), examples=examples, budget=budget, method=method,
                           objective=objective, model=model, mmlu=mmlu, start=start, seed=seed, force=force,
                           device=device)
        typer.echo(
            f"LoraHub weights {json.dumps([round(w, 4) for w in res['weights']])}: objective "
            f"{res['start_objective']:.4f} -> {res['objective']:.4f} in {res['evaluations']} evaluations -> {out}"
        )

    @compose.command("embed")
    def embed(
        adapter: Path = typer.Option(..., "--adapter", help="adapter directory (edge package or recovered adapter)"),
        examples: int = typer.Option(DEFAULT_EMBEDDING_EXAMPLES, "--examples", help="examples averaged"),
        texts: Optional[Path] = typer.Option(None, "--texts", help="examples file: .jsonl (question+choices or text) "
                                                                   "or one per line; default: the MMLU edge split"),
        domain: Optional[str] = typer.Option(None, "--domain", help="MMLU domain of the examples (default: the manifest's)"),
        data: Optional[str] = typer.Option(None, "--data", help="MMLU source (default: the embedded copy)"),
        split: str = typer.Option("edge", "--split", help="MMLU split the examples come from"),
        split_seed: int = typer.Option(0, "--split-seed", help="Seed of the per-subject MMLU split."),
        seed: int = typer.Option(0, "--seed", help="Seed of the example sample."),
    ) -> None:
        """Attach the adapter's retrieval embedding (mean MiniLM embedding of its examples) to its edgefuse.json."""
        rec = embed_adapter_dir(adapter, texts_file=texts, domain=domain, data=data, split=split,
                                split_seed=split_seed, seed=seed, examples=examples)
        typer.echo(f"embedding of {rec['n_examples']} examples ({rec['source']}, {rec['dim']} dimensions) -> "
                   f"{adapter}/edgefuse.json")
