"""``edgefuse mmlu-cd build`` (compose the cross-domain benchmark) and ``edgefuse eval mmlu-cd``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgefuse.commands.evaluate import (
    eval_app,
    load_retrieval,
    load_with_adapter,
    mixture_title,
    pool_argument,
    pool_flag_option,
    retrieval_line,
    retrieval_request,
    temperature_option,
    top_k_option,
    weighting_option,
)
from edgefuse.commands.options import device_option, dtype_option
from edgefuse.compose.retrieval import RetrievalSettings
from edgefuse.data.mmlu import SplitSpec, load_mmlu
from edgefuse.data.mmlu_cd import build_instances, load_benchmark, write_benchmark
from edgefuse.evaluate.stats import fmt_ci
from edgefuse.io import atomic_write_json, sha256_file
from edgefuse.ui import console, progress_bar

cd_app = typer.Typer(help="MMLU-CD: cross-domain instances of k questions from k distinct domains.",
                     no_args_is_help=True)


def _split_names(values: Optional[list[str]]) -> Optional[list[str]]:
    """Accept both ``--domains a --domains b`` and ``--domains a,b``."""
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@cd_app.command("build")
def build(
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write."),
    k: int = typer.Option(2, "--k", help="Questions (= distinct domains) per instance, 2..number of domains."),
    n: int = typer.Option(500, "--n", help="Number of instances."),
    seed: int = typer.Option(0, "--seed", help="Seed of combination order, answer order and item draws."),
    domains: Optional[list[str]] = typer.Option(
        None, "--domains", help="Disjoint domains (categories, subcategories or subjects; repeat or comma-separate). "
                                "Default: the 4 MMLU categories."),
    split: str = typer.Option("test", "--split", help="Split the items come from: test | edge | public | all."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the per-subject MMLU split."),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="Never use an item in two instances."),
    data: Optional[str] = typer.Option(None, "--data", help="MMLU source: .jsonl, CSV dir or hub id (default: embedded)."),
):
    """Compose a balanced, seeded MMLU-CD benchmark and print its content hash."""
    ds = load_mmlu(data)
    doc = build_instances(ds, k=k, n=n, seed=seed, domains=_split_names(domains), split=split, no_reuse=no_reuse,
                          split_spec=SplitSpec(seed=split_seed))
    digest = write_benchmark(doc, out)
    h = doc["header"]
    console.print(f"{h['n']} instances, k={h['k']}, domains {', '.join(h['domains'])}, split {split} "
                  f"(split seed {split_seed}), seed {seed} → {out}")
    for combo, count in h["combinations"].items():
        console.print(f"  {combo}: {count}")
    typer.echo(f"sha256 {digest}")


@eval_app.command("mmlu-cd")
def eval_mmlu_cd(
    bench: Path = typer.Option(..., "--bench", help="MMLU-CD JSONL made by `edgefuse mmlu-cd build`."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, gemma3-270m, tiny-llama, HF dir, .gguf or hub id."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory to apply."),
    data: Optional[str] = typer.Option(None, "--data", help="MMLU source the benchmark was built from (default: embedded)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results JSON here."),
    fmt: str = typer.Option("letters", "--format", help="letters (answer letter) | cloze (answer text)."),
    metric: str = typer.Option("acc", "--metric", help="Which choice counts and is chained: acc | acc_norm (cloze only)."),
    device: Optional[str] = device_option(),
    dtype: Optional[str] = dtype_option("Dtype the model scores in"),
    pool_flag: bool = pool_flag_option(),
    pool_dirs: Optional[list[Path]] = pool_argument(),
    top_k: Optional[int] = top_k_option(),
    weighting: Optional[str] = weighting_option(),
    temperature: Optional[float] = temperature_option(),
    routing: Optional[str] = typer.Option(None, "--routing", help="instance (one mixture per instance) | segment "
                                                                  "(one per Question j block; default "
                                                                  f"{RetrievalSettings.routing})"),
):
    """Strict / per-position / single-item accuracy, cross-domain penalty and domain matrix (95% CIs); with
    --pool, of a retrieval mixture routed per instance or per question segment."""
    from edgefuse.evaluate.cloze import check_format  # local: torch-backed, kept off the CLI start-up path (+11 ms on `edgefuse --help`, measured)
    from edgefuse.evaluate.mmlu_cd import evaluate_mmlu_cd, resolve  # local: torch-backed, kept off the CLI start-up path (+21 ms on `edgefuse --help`, measured)
    from edgefuse.models import fingerprint  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)
    from edgefuse.precision import resolve as resolve_precision  # local: torch-backed, kept off the CLI start-up path (+2 ms on `edgefuse --help`, measured)

    check_format(fmt, metric)  # bad input fails before the benchmark or the model is loaded
    precision = resolve_precision(device, dtype)
    retrieval = retrieval_request(pool_flag, pool_dirs, adapter, top_k=top_k, weighting=weighting,
                                  temperature=temperature, routing=routing)
    doc = load_benchmark(bench)
    ds = load_mmlu(data)
    resolve(doc, ds)  # fail on unknown ids before loading the model
    m, tok = load_with_adapter(model, adapter, precision)
    meta = {"model": model, "model_fingerprint": fingerprint(m), **precision.as_dict(), "bench": str(bench),
            "adapter": str(adapter) if adapter else None,
            "adapter_sha256": sha256_file(adapter / "adapter_model.safetensors") if adapter else None,
            **({"pool": [str(d) for d in retrieval[0]]} if retrieval else {})}
    if retrieval:
        from edgefuse.evaluate.retrieval import evaluate_mmlu_cd_retrieval  # local: torch-backed, kept off the CLI start-up path (+27 ms on `edgefuse --help`, measured)

        pool, encoder = load_retrieval(retrieval[0], m)
        with progress_bar("MMLU-CD", len(doc["instances"])) as advance:
            res = evaluate_mmlu_cd_retrieval(m, tok, doc, ds, pool, retrieval[1], encoder=encoder,
                                             batch_size=batch_size, progress=advance, meta=meta, fmt=fmt,
                                             metric=metric)
    else:
        with progress_bar("MMLU-CD", len(doc["instances"])) as advance:
            res = evaluate_mmlu_cd(m, tok, doc, ds, batch_size=batch_size, progress=advance, meta=meta,
                                   fmt=fmt, metric=metric)
    scoring = f", cloze, {metric}" if fmt == "cloze" else ""
    routed = f", {res['retrieval']['settings']['routing']} routing" if retrieval else ""
    title = f"MMLU-CD k={res['k']} ({model}{' + ' + str(adapter) if adapter else ''}{mixture_title(res)}{routed}{scoring})"
    for table in results_tables(res, title):
        console.print(table)
    if retrieval:
        console.print(retrieval_line(res))
    console.print(f"{res['n']} instances, {res['wall_s']:.1f} s, benchmark sha256 {res['benchmark_sha256'][:16]}…")
    if out:
        atomic_write_json(out, res)
        console.print(f"results written to {out}")


def results_tables(res: dict, title: str) -> list:
    """The summary table (metric, n, value with CI) and the domain × domain strict-accuracy matrix."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("n", justify="right")
    t.add_column("% [95% CI]", justify="right")
    t.add_row("[bold]strict (all answers right)", str(res["strict"]["n"]), fmt_ci(res["strict"]))
    for j, r in enumerate(res["per_position"], 1):
        t.add_row(f"answer {j}", str(r["n"]), fmt_ci(r))
    t.add_row("all answers, in instance", str(res["answer"]["n"]), fmt_ci(res["answer"]))
    if res.get("single"):
        t.add_row("same items asked alone", str(res["single"]["n"]), fmt_ci(res["single"]))
        t.add_row("penalty (alone − in instance)", str(res["penalty"]["n"]), fmt_ci(res["penalty"]))
        t.add_row("alone: all k right", str(res["single_strict"]["n"]), fmt_ci(res["single_strict"]))
        t.add_row("strict penalty (alone − in instance)", str(res["penalty_strict"]["n"]), fmt_ci(res["penalty_strict"]))
    t.add_row("chance (0.25^k)", "", f"{100 * res['chance']:.2f}")
    names = list(res["domain_matrix"])
    mt = Table(title="strict accuracy % (n) of instances containing both domains")
    mt.add_column("")
    for b in names:
        mt.add_column(b, justify="right")
    for a in names:
        cells = []
        for b in names:
            c = res["domain_matrix"][a][b]
            cells.append("–" if c["n"] == 0 else f"{100 * c['acc']:.1f} ({c['n']})")
        mt.add_row(a, *cells)
    return [t, mt]


def register(app: typer.Typer) -> None:
    """Add ``mmlu-cd build``; ``eval mmlu-cd`` is registered on the shared eval group at import."""
    app.add_typer(cd_app, name="mmlu-cd")
