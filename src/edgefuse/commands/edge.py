"""``edgefuse prune`` / ``train`` / ``recover``: the edge side of the pipeline (thin over edgefuse.edge).

Options state no defaults or bounds of their own: they read them from `edgefuse.edge.schema`
(`PruningConfig`, `TrainConfig`), which the study config uses too.
"""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import BaseModel

from edgefuse.commands.options import device_option, dtype_option
from edgefuse.data.mmlu import SplitSpec, load_mmlu, select
from edgefuse.data.prompts import answer_text, mc_prompt
from edgefuse.edge.schema import METHODS, STRUCTURES, PruningConfig, TrainConfig, default, lower_bound
from edgefuse.errors import EdgefuseError
from edgefuse.io import read_json
from edgefuse.report.tables import LOSS_TAIL_STEPS, tail_loss
from edgefuse.ui import console


def schema_option(model: type[BaseModel], field: str, *flags: str, **kwargs):
    """A typer option whose default (and ``min``, from ``ge``) is the schema field's."""
    return typer.Option(default(model, field), *flags, min=lower_bound(model, field), **kwargs)


def prune_cmd(
    out: Path = typer.Option(..., "--out", help="Directory for the pruned model and plan.json."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, gemma3-270m, tiny-llama, HF dir, .gguf or hub id."),
    method: str = schema_option(PruningConfig, "method", "--method", help=" | ".join(METHODS)),
    structure: str = schema_option(PruningConfig, "structure", "--structure", help=" | ".join(STRUCTURES)),
    ratio: float | None = typer.Option(None, "--ratio", help="Fraction to prune, in (0, 1)."),
    memory_budget: float | None = typer.Option(None, "--memory-budget", help="GiB for LoRA training; picks the ratio."),
    calib: int = schema_option(PruningConfig, "calib", "--calib",
                               help="Calibration prompts from the public split (wanda, taylor, depth)."),
    batch: int = schema_option(TrainConfig, "batch", "--batch", help="Training batch the memory budget must fit."),
    seq: int = schema_option(TrainConfig, "seq", "--seq", help="Training sequence length the memory budget must fit."),
    rank: int = schema_option(TrainConfig, "rank", "--rank", help="LoRA rank the memory budget must fit."),
    seed: int = typer.Option(0, "--seed"),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the per-subject MMLU split."),
    device: str | None = device_option(),
    dtype: str | None = dtype_option("Dtype of the calibration passes and the pruned weights"),
):
    """Prune a model for an edge: structured width/depth, or unstructured / 2:4 masks."""
    from edgefuse.edge.plan import describe, save_pruned  # local: torch-backed, kept off the CLI start-up path (+12 ms on `edgefuse --help`, measured)
    from edgefuse.edge.prune import prune_model  # local: torch-backed, kept off the CLI start-up path (+21 ms on `edgefuse --help`, measured)
    from edgefuse.models import count_parameters, load_model  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)
    from edgefuse.precision import resolve  # local: torch-backed, kept off the CLI start-up path (+2 ms on `edgefuse --help`, measured)

    if (ratio is None) == (memory_budget is None):
        raise EdgefuseError("give exactly one of --ratio and --memory-budget")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise EdgefuseError(f"--ratio must lie in (0, 1), got {ratio}")
    precision = resolve(device, dtype)
    m, tok = load_model(model, **precision.as_dict())
    prompts = None
    if calib:
        items = select(load_mmlu(), "public", limit=calib, seed=seed, split_spec=SplitSpec(seed=split_seed))
        prompts = [mc_prompt(it) + answer_text(it.answer) for it in items]
    cfg = TrainConfig(batch=batch, seq=seq, rank=rank)
    before = count_parameters(m)
    res = prune_model(m, tok, method=method, structure=structure, ratio=ratio, memory_budget_gib=memory_budget,
                      calib_prompts=prompts, train_cfg=cfg, seed=seed)
    if res.estimate:
        e = res.estimate
        console.print(f"memory budget {memory_budget} GiB → ratio {res.plan['ratio']:g}; estimated training peak "
                      f"{e['total_gib']:.3f} GiB (weights {e['weights_bytes'] / 2**30:.3f}, LoRA+Adam "
                      f"{e['lora_bytes'] / 2**30:.4f}, activations {e['activations_bytes'] / 2**30:.3f}, batch {batch}, "
                      f"seq {seq}); `edgefuse train` records the measured peak next to it")
    save_pruned(res, tok, out)
    console.print(describe(res.plan, before, count_parameters(res.model)))
    console.print(f"pruned model and plan.json written to {out}")


def train_cmd(
    pruned: Path = typer.Option(..., "--pruned", help="Pruned model directory (from edgefuse prune)."),
    domain: str = typer.Option(..., "--domain", help="Category, subcategory or subject whose edge split is used."),
    out: Path = typer.Option(..., "--out", help="Edge adapter package directory."),
    steps: int = schema_option(TrainConfig, "steps", "--steps"),
    rank: int = schema_option(TrainConfig, "rank", "--rank"),
    alpha: float = schema_option(TrainConfig, "alpha", "--alpha"),
    lr: float = schema_option(TrainConfig, "lr", "--lr"),
    batch: int = schema_option(TrainConfig, "batch", "--batch"),
    seq: int = schema_option(TrainConfig, "seq", "--seq"),
    grad_accum: int = schema_option(TrainConfig, "grad_accum", "--grad-accum"),
    targets: list[str] | None = typer.Option(None, "--targets", help="Projections to adapt, in any family's names (q_proj on Phi-3 adapts qkv_proj; default: all)."),
    seed: int = schema_option(TrainConfig, "seed", "--seed"),
    checkpoint_every: int = schema_option(TrainConfig, "checkpoint_every", "--checkpoint-every"),
    grad_checkpointing: bool = schema_option(TrainConfig, "grad_checkpointing", "--grad-checkpointing",
                                             help="Recompute activations in backward."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use a stratified subsample of the edge split."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the per-subject MMLU split."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint beside --out."),
    objective: str | None = typer.Option(None, "--objective", help="letters | cloze | both: the answer letter, the "
                                         "answer text after the cloze prompt, or both (default: TrainConfig's)."),
    device: str | None = device_option(),
    dtype: str | None = dtype_option("Dtype of the frozen pruned weights (LoRA stays float32; autocast)"),
):
    """Train a LoRA on the pruned model with the domain's private edge split; write the upload package."""
    from pydantic import ValidationError

    from edgefuse.edge.train import train_edge  # local: torch-backed, kept off the CLI start-up path (+19 ms on `edgefuse --help`, measured)
    from edgefuse.precision import resolve  # local: torch-backed, kept off the CLI start-up path (+2 ms on `edgefuse --help`, measured)

    precision = resolve(device, dtype)
    try:
        cfg = TrainConfig(steps=steps, rank=rank, alpha=alpha, lr=lr, batch=batch, seq=seq, grad_accum=grad_accum,
                          seed=seed, checkpoint_every=checkpoint_every, grad_checkpointing=grad_checkpointing,
                          **({"targets": targets} if targets else {}), **({"objective": objective} if objective else {}))
    except ValidationError as e:
        err = e.errors()[0]
        raise EdgefuseError(f"invalid training option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    items = select(load_mmlu(), "edge", domains=[domain], limit=limit, seed=seed, split_spec=SplitSpec(seed=split_seed))
    pkg = train_edge(pruned, domain, items, cfg, out, resume=resume, **precision.as_dict())
    s = read_json(pkg / "edgefuse.json")["stats"]
    console.print(f"{s['steps']} steps, {s['tokens']} tokens, loss (mean of the first / last {LOSS_TAIL_STEPS} steps) "
                  f"{tail_loss(s['loss_curve'][:LOSS_TAIL_STEPS]):.3f} → {tail_loss(s['loss_curve']):.3f}, "
                  f"{s['tokens_per_s']} tokens/s, edge tensor peak {s['tensor_peak_bytes'] / 2**30:.3f} GiB"
                  + (f" (estimate {s['memory_estimate_bytes'] / 2**30:.3f} GiB)" if s.get("memory_estimate_bytes") else "")
                  + f", process memory rise {s['peak_memory_bytes'] / 2**30:.3f} GiB")
    console.print(f"edge package written to {pkg}")


def recover_cmd(
    package: Path = typer.Option(..., "--package", help="Edge adapter package directory."),
    plan: Path = typer.Option(..., "--plan", help="plan.json the package was trained on."),
    out: Path = typer.Option(..., "--out", help="Recovered full-model adapter directory."),
):
    """Scatter an edge adapter back to the full model's shapes (PEFT format)."""
    from edgefuse.edge.recover import recover  # local: torch-backed, kept off the CLI start-up path (+16 ms on `edgefuse --help`, measured)

    d = recover(package, plan, out)
    console.print(f"recovered adapter written to {d}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the app."""
    app.command("prune")(prune_cmd)
    app.command("train")(train_cmd)
    app.command("recover")(recover_cmd)
