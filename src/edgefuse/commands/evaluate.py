"""``edgefuse eval mmlu``: accuracy of a model (optionally with an adapter, or with a retrieval mixture over a
pool of adapters) on MMLU; ``edgefuse eval choices``: on any multiple-choice file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgefuse.adapters import ModelShapes
from edgefuse.assets import minilm_dir
from edgefuse.commands.options import device_option, dtype_option
from edgefuse.compose.embedding import load_encoder
from edgefuse.compose.retrieval import RetrievalSettings, load_pool, pool_manifests
from edgefuse.data.mmlu import SplitSpec, load_mmlu, make_splits, select
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.stats import fmt_ci
from edgefuse.io import atomic_write_json, sha256_file
from edgefuse.peft_utils import apply_adapter
from edgefuse.ui import accuracy_table, console, progress_bar

eval_app = typer.Typer(help="Evaluate a model on MMLU, MMLU-CD or any multiple-choice file.", no_args_is_help=True)


def load_with_adapter(model_spec: str, adapter: Optional[Path], precision=None):
    """Model + tokenizer on ``precision``'s device and dtype, with a PEFT adapter applied when given (checked:
    safetensors only; its LoRA weights stay float32 on a lower-precision base, as PEFT loads them)."""
    from edgefuse.models import load_model  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)

    model, tok = load_model(model_spec, **(precision.as_dict() if precision else {}))
    if adapter is not None:
        model = apply_adapter(model, adapter)
    return model, tok


def pool_argument():
    return typer.Argument(None, help="adapter directories of the retrieval pool (after --pool)", show_default=False)


def pool_flag_option():
    return typer.Option(False, "--pool", help="score a retrieval mixture over the adapter directories that follow "
                                              "(each needs an embedding: `edgefuse compose embed`)")


def top_k_option():
    return typer.Option(None, "--top-k", help=f"adapters mixed per request (k = 1: plain selection; default {RetrievalSettings.top_k})")


def weighting_option():
    return typer.Option(None, "--weighting", help=f"uniform (1/k) | softmax (over similarity; default {RetrievalSettings.weighting})")


def temperature_option():
    return typer.Option(None, "--temperature", help=f"softmax temperature (default {RetrievalSettings.temperature})")


def retrieval_request(pool_flag: bool, pool_dirs: Optional[list[Path]], adapter: Optional[Path], **given):
    """(pool directories, `RetrievalSettings`) when ``--pool`` is given, else None; every check that needs no
    model (settings, k against the pool, each adapter's embedding, the embedded MiniLM) runs here, first."""
    if not pool_flag:
        if pool_dirs:
            raise EdgefuseError(f"unexpected argument {pool_dirs[0]} (adapter directories of a pool follow --pool)")
        named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if named:
            raise EdgefuseError(f"{', '.join(named)} only apply to a retrieval mixture (--pool DIR DIR ...)")
        return None
    if adapter is not None:
        raise EdgefuseError("--adapter and --pool exclude each other (one adapter, or a retrieval mixture over a pool)")
    dirs = list(pool_dirs or [])
    settings = RetrievalSettings.given(**given).check(len(dirs) if dirs else None)
    pool_manifests(dirs)
    minilm_dir()
    return dirs, settings


def load_retrieval(dirs: list[Path], model, device: Optional[str] = None):
    """The pool read against the loaded model's shapes, and the embedded MiniLM encoder."""
    return load_pool(dirs, ModelShapes.of(model)), load_encoder("cpu")


@eval_app.command("mmlu")
def eval_mmlu(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, gemma3-270m, tiny-llama, HF dir, .gguf or hub id."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory to apply."),
    data: Optional[str] = typer.Option(None, "--data", help="MMLU source: .jsonl, CSV dir or hub id (default: embedded)."),
    split: str = typer.Option("test", "--split", help="edge | public | test | all"),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the per-subject split."),
    domains: Optional[list[str]] = typer.Option(None, "--domains", help="Category/subcategory/subject names."),
    subjects: Optional[list[str]] = typer.Option(None, "--subjects", help="Subject names."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Seeded stratified subsample of N items."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsample and bootstrap."),
    shots: int = typer.Option(0, "--shots", min=0, max=5, help="Few-shot examples from the public split."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    strict: bool = typer.Option(False, "--strict", help="Fail on malformed MMLU rows."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results JSON here."),
    subjects_table: bool = typer.Option(False, "--per-subject", help="Also print per-subject rows."),
    fmt: str = typer.Option("letters", "--format", help="letters (answer letter) | cloze (answer text; acc and acc_norm)."),
    device: Optional[str] = device_option(),
    dtype: Optional[str] = dtype_option("Dtype the model scores in"),
    pool_flag: bool = pool_flag_option(),
    pool_dirs: Optional[list[Path]] = pool_argument(),
    top_k: Optional[int] = top_k_option(),
    weighting: Optional[str] = weighting_option(),
    temperature: Optional[float] = temperature_option(),
):
    """MMLU accuracy with 95% bootstrap intervals (overall, per category, per subject), letter- or cloze-scored;
    with --pool, of a retrieval mixture (each question mixes its top-k adapters)."""
    from edgefuse.evaluate.cloze import check_format  # local: torch-backed, kept off the CLI start-up path (+11 ms on `edgefuse --help`, measured)
    from edgefuse.evaluate.mmlu import evaluate_mmlu  # local: torch-backed, kept off the CLI start-up path (+13 ms on `edgefuse --help`, measured)
    from edgefuse.models import fingerprint  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)
    from edgefuse.precision import resolve  # local: torch-backed, kept off the CLI start-up path (+2 ms on `edgefuse --help`, measured)

    check_format(fmt)  # bad input fails before any data or model is loaded
    precision = resolve(device, dtype)
    if fmt == "cloze" and shots:
        raise EdgefuseError("cloze scoring is zero-shot only; use --shots 0 or --format letters")
    retrieval = retrieval_request(pool_flag, pool_dirs, adapter, top_k=top_k, weighting=weighting,
                                  temperature=temperature)
    ds = load_mmlu(data, strict=strict)
    spec = SplitSpec(seed=split_seed)
    items = select(ds, split, domains, subjects, limit, seed, spec)
    if not items:
        raise EdgefuseError("the selection holds no items")
    public = []
    if shots:
        ids = set(make_splits(ds, spec)["public"])
        public = [it for it in ds.items if it.id in ids]
    m, tok = load_with_adapter(model, adapter, precision)
    meta = {"model": model, "model_fingerprint": fingerprint(m), **precision.as_dict(), "split": split,
            **({"pool": [str(d) for d in retrieval[0]]} if retrieval else {}),
            "split_seed": split_seed,
            "adapter": str(adapter) if adapter else None,
            "adapter_sha256": sha256_file(adapter / "adapter_model.safetensors") if adapter else None,
            "selection": {"domains": domains, "subjects": subjects, "limit": limit, "seed": seed}}
    if retrieval:
        from edgefuse.evaluate.retrieval import evaluate_mmlu_retrieval  # local: torch-backed, kept off the CLI start-up path (+27 ms on `edgefuse --help`, measured)

        pool, encoder = load_retrieval(retrieval[0], m)
        with progress_bar("MMLU", len(items)) as advance:
            res = evaluate_mmlu_retrieval(m, tok, items, pool, retrieval[1], encoder=encoder, shots=shots,
                                          public=public, batch_size=batch_size, progress=advance, meta=meta, fmt=fmt)
    else:
        with progress_bar("MMLU", len(items)) as advance:
            res = evaluate_mmlu(m, tok, items, shots=shots, public=public, batch_size=batch_size, progress=advance,
                                meta=meta, fmt=fmt)
    title = f"MMLU ({model}{' + ' + str(adapter) if adapter else ''}{mixture_title(res)}, {shots}-shot, {split}"
    if fmt == "cloze":
        console.print(accuracy_table(f"{title}, cloze, acc)", res["accuracy"], subjects=subjects_table))
        console.print(accuracy_table(f"{title}, cloze, acc_norm)", res["accuracy_norm"], subjects=subjects_table))
    else:
        console.print(accuracy_table(f"{title})", res["accuracy"], subjects=subjects_table))
    console.print(f"{res['n']} items, {res['wall_s']:.1f} s, {res['tokens_per_s']} tokens/s")
    if retrieval:
        console.print(retrieval_line(res))
    if out:
        atomic_write_json(out, res)
        console.print(f"results written to {out}")


@eval_app.command("choices")
def eval_choices(
    path: Path = typer.Argument(..., help="A multiple-choice JSONL file (one question per line) or a BIG-bench "
                                          "task.json.", show_default=False),
    fields: Optional[str] = typer.Option(None, "--fields", help="JSONL field mapping, e.g. "
                                         "'question=q,choices=a|b|c,answer=label,domain=topic' (default: the fields "
                                         "question, choices, answer, domain)."),
    domain: Optional[str] = typer.Option(None, "--domain", help="The file's one domain, when its rows name none."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="A seeded sample of N questions."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the sample."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, gemma3-270m, tiny-llama, HF dir, .gguf or hub id."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory to apply."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results JSON here."),
    device: Optional[str] = device_option(),
    dtype: Optional[str] = dtype_option("Dtype the model scores in"),
):
    """Accuracy on any multiple-choice file, in cloze form (each choice's text after the question; any number of
    choices): acc and acc_norm with 95% bootstrap intervals, overall and per domain. The same scoring as a study's
    ``kind: choices`` task (`edgefuse.tasks.choices`)."""
    import time

    from pydantic import ValidationError

    from edgefuse.models import fingerprint  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)
    from edgefuse.precision import resolve  # local: torch-backed, kept off the CLI start-up path (+2 ms on `edgefuse --help`, measured)
    from edgefuse.tasks.choices import ChoicesBench, load_items, results_document, score_items  # local: torch-backed, kept off the CLI start-up path (+33 ms on `edgefuse --help`, measured)

    given = {"fields": fields, "domain": domain, "limit": limit, "seed": seed}
    try:  # the defaults are the task's (one source)
        settings = ChoicesBench(kind="choices", path=str(path), **{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise EdgefuseError(e.errors()[0]["msg"]) from None
    precision = resolve(device, dtype)
    items = load_items(settings)  # a bad file fails here, naming file:line, before the model loads
    m, tok = load_with_adapter(model, adapter, precision)
    t0 = time.perf_counter()
    with progress_bar("questions", len(items)) as advance:
        scores = score_items(m, tok, items, batch_size, advance)
    meta = {"model": model, "model_fingerprint": fingerprint(m), **precision.as_dict(), "path": str(path),
            "file_sha256": sha256_file(path), "adapter": str(adapter) if adapter else None,
            "settings": settings.model_dump()}
    res = results_document(items, scores, meta, time.perf_counter() - t0)
    acc = res["accuracy"]
    console.print(f"{path.name} ({model}{' + ' + str(adapter) if adapter else ''}, cloze): {res['n']} questions, "
                  f"acc {fmt_ci(acc['acc'])} %, acc_norm {fmt_ci(acc['acc_norm'])} %")
    for d, v in acc["domains"].items():
        console.print(f"  {d}: n={v['acc']['n']}, acc {fmt_ci(v['acc'])} %, acc_norm {fmt_ci(v['acc_norm'])} %")
    if out:
        atomic_write_json(out, res)
        console.print(f"results written to {out}")


def mixture_title(res: dict) -> str:
    """`` + retrieval mixture of N (k=2, uniform)`` for a retrieval result, else empty."""
    r = res.get("retrieval")
    if not r:
        return ""
    st = r["settings"]
    how = st["weighting"] + (f" T={st['temperature']}" if st["weighting"] == "softmax" else "")
    return f" + retrieval mixture of {len(r['pool'])} (k={st['top_k']}, {how})"


def retrieval_line(res: dict) -> str:
    """Retrieval accuracy: the share of questions whose own-domain adapter ranks first."""
    a = res["retrieval"]["accuracy"]
    skipped = f", {a['skipped']} questions of domains outside the pool left out" if a["skipped"] else ""
    return f"retrieval accuracy (own-domain adapter ranked first): {fmt_ci(a)} % of {a['n']} questions{skipped}"


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
