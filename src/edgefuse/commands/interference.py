"""``edgefuse grams`` (collect Gram matrices of module inputs on public prompts) and the interference view of
``edgefuse conflicts --activations``: thin wrappers over `edgefuse.interference`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgefuse.adapters import load_adapter
from edgefuse.commands.options import device_option
from edgefuse.data.mmlu import load_mmlu
from edgefuse.data.taxonomy import domain_subjects
from edgefuse.errors import EdgefuseError
from edgefuse.interference.collect import GramSpec, collect, public_prompts
from edgefuse.interference.metrics import interference
from edgefuse.report.figures import conflict_grid, plot_heatmap
from edgefuse.ui import layer_grid

_SPEC = GramSpec()


def _domains(values: list[str]) -> list[str]:
    out = [d.strip() for v in values for d in v.split(",") if d.strip()]
    if not out:
        raise EdgefuseError("--domains is required (e.g. --domains stem,humanities)")
    if len(set(out)) != len(out):
        raise EdgefuseError(f"--domains names a domain twice: {', '.join(out)}")
    return out


def collect_to_dir(model_spec: str, domains: list[str], out: Path, tokens: int = _SPEC.tokens,
                   data: Optional[str] = None, split_seed: int = _SPEC.split_seed, force: bool = False,
                   device: Optional[str] = None, per_prompt: int = _SPEC.per_prompt):
    """Load the base model (float32), collect every domain's Gram matrices, write them (all or nothing)."""
    from edgefuse.interference.grams import save_grams  # local: torch-backed, kept off the CLI start-up path (+3 ms on `edgefuse --help`, measured)
    from edgefuse.models import fingerprint, load_model  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)

    if out.exists() and not force:
        raise EdgefuseError("output already exists (pass --force to overwrite)", path=out)
    if tokens < 1 or per_prompt < 1:
        raise EdgefuseError(f"--tokens and --per-prompt must be positive integers, got {tokens} and {per_prompt}")
    for d in domains:
        domain_subjects(d)
    dataset = load_mmlu(data)
    spec = GramSpec(tokens=tokens, per_prompt=per_prompt, split_seed=split_seed)

    for d in domains:  # every domain's prompts before the model loads
        public_prompts(dataset, d, spec)
    model, tok = load_model(model_spec, device=device, dtype="float32")
    grams, aliases, counts, prompts = collect(model, tok, dataset, domains, spec)
    fields = {"base_model": model_spec, "base_fingerprint": fingerprint(model), "split": spec.split,
              "split_seed": spec.split_seed, "per_prompt": spec.per_prompt}
    return save_grams(out, fields, grams, counts, prompts, aliases, force=force)


def register(app: typer.Typer) -> None:
    """Add ``grams``."""

    @app.command("grams")
    def grams(
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="the base model the adapters were trained for"),
        domains: list[str] = typer.Option([], "--domains", help="domains to collect: stem,humanities (repeatable)"),
        tokens: int = typer.Option(_SPEC.tokens, "--tokens", help="tokens of public prompts per domain"),
        per_prompt: int = typer.Option(_SPEC.per_prompt, "--per-prompt", help="tokens of each prompt at most"),
        out: Optional[Path] = typer.Option(None, "--out", help="output directory"),
        data: Optional[str] = typer.Option(None, "--data", help="MMLU source: .jsonl, CSV dir or hub id (default: embedded)."),
        split_seed: int = typer.Option(_SPEC.split_seed, "--split-seed", help="Seed of the per-subject split."),
        force: bool = typer.Option(False, "--force", help="overwrite --out"),
        device: Optional[str] = device_option(),
    ) -> None:
        """Gram matrices of every adapted module's inputs on each domain's public prompts (for conflicts
        --activations and fuse --method regmean)."""
        if out is None:
            raise EdgefuseError("--out is required")
        man = collect_to_dir(model, _domains(domains), out, tokens, data, split_seed, force, device, per_prompt)
        size = sum((out / d.file).stat().st_size for d in man.domains.values())
        typer.echo(f"Gram matrices of {len(man.modules)} modules ({len(set(man.modules.values()))} distinct inputs) "
                   f"for {', '.join(f'{k} ({d.tokens} tokens)' for k, d in man.domains.items())}, "
                   f"{size / 2**20:.1f} MiB -> {out}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_interference(stats: dict, domains: list[str], plot: Optional[Path]) -> None:
    """Per-domain summary (pooled over modules), the layer × module-type grid of the largest cross-domain
    ratio, and the heatmaps."""
    from rich.console import Console
    from rich.table import Table

    s = stats["summary"]
    K = len(domains)
    t = Table(title="interference on activations (pooled over modules): ‖ΔW_j H_i‖ / ‖ΔW_i H_i‖ per adapter j, "
                    "fused deviation ‖(ΔW_f − ΔW_i) H_i‖ / ‖ΔW_i H_i‖, lowest output cosine")
    t.add_column("domain i")
    for j in range(K):
        t.add_column(f"adapter {domains[j]}", justify="right")
    t.add_column("fused dev.", justify="right")
    t.add_column("min cos", justify="right")
    for i in range(K):
        cos = [s["cosine"][i][j][k] for j in range(K) for k in range(j + 1, K) if s["cosine"][i][j][k] is not None]
        t.add_row(domains[i], *(_fmt(x) for x in s["ratio"][i]), _fmt(s["deviation"][i]), _fmt(min(cos, default=None)))
    layers, types, cells = conflict_grid(stats, "interference")
    _, _, dev = conflict_grid(stats, "max_deviation")
    g = layer_grid("largest cross-domain ratio / largest fused deviation, per layer and module type", layers, types,
                   lambda layer, ty: f"{_fmt(cells.get((layer, ty)))}/{_fmt(dev.get((layer, ty)))}")
    console = Console(width=max(Console().width, 10 + 14 * max(len(types), K + 2)))
    console.print(t)
    console.print(g)
    typer.echo(f"{s['modules']} modules: largest cross-domain ratio {_fmt(s['max_interference'])}, "
               f"largest fused deviation {_fmt(s['max_deviation'])}")
    if plot:
        plot_heatmap(stats, plot, key="interference")
        dev_plot = plot.with_name(f"{plot.stem}-deviation{plot.suffix or '.png'}")
        plot_heatmap(stats, dev_plot, key="max_deviation")
        typer.echo(f"heatmaps -> {plot}, {dev_plot}")


def interference_stats(adapters, weights, activations: Path, fused: Optional[Path]) -> tuple[dict, list[str]]:
    """Load the Gram directory (and the fused adapter), match adapters to domains, compute the statistics."""
    from edgefuse.interference.grams import GramSet  # local: torch-backed, kept off the CLI start-up path (+3 ms on `edgefuse --help`, measured)

    gs = GramSet(activations)
    fps = {a.base_fingerprint for a in adapters if a.base_fingerprint}
    if fps and fps != {gs.manifest.base_fingerprint}:
        raise EdgefuseError("Gram matrices were collected on another base model than the adapters' "
                            f"({gs.manifest.base_model})", path=activations)
    grams = gs.for_adapters(adapters)
    stats = interference(adapters, grams, None if fused is None else load_adapter(fused), weights)
    stats["domains"] = [g.domain for g in grams]
    stats["activations"] = str(activations)
    return stats, stats["domains"]
