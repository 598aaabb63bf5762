"""The measurements behind ``bench/gpu_check.sh``, one sub-command per step, each writing one JSON file.

Why a prepared script: a GPU machine is lent rarely and briefly, so what to measure there is decided and
syntax-checked beforehand. Steps (``--device cuda`` unless told otherwise):

- ``env``: torch, CUDA, cuDNN and library versions, the GPU, and whether it runs bfloat16 natively.
- ``score``: MMLU scoring throughput at ``--batch`` (letters and cloze, each dtype), after one warm-up batch,
  and how far bfloat16's scores and predictions are from float32's on the same items.
- ``train``: Taylor-prune the model in each dtype, then a few training steps on the pruned model: each
  step's time and the CUDA allocator's peak (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def env(args) -> dict:
    import importlib.metadata as md

    doc = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
           "versions": {d: md.version(d) for d in ("transformers", "peft", "safetensors")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        doc["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                      "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False)}
    return doc


def _scores(res: dict) -> list[list[float]]:
    return [it["scores"] for it in res["items"]]


def _agreement(ref: dict, low: dict) -> dict:
    """bfloat16 against float32 on the same items: largest score difference, predictions that differ."""
    diffs = [abs(a - b) for x, y in zip(_scores(ref), _scores(low)) for a, b in zip(x, y)]
    same = sum(x["pred"] == y["pred"] for x, y in zip(ref["items"], low["items"]))
    return {"max_abs_score_diff": round(max(diffs), 6), "mean_abs_score_diff": round(statistics.fmean(diffs), 6),
            "same_prediction": same, "n": len(ref["items"]),
            "accuracy_float32": ref["accuracy"]["overall"]["acc"], "accuracy_low": low["accuracy"]["overall"]["acc"]}


def score(args) -> dict:
    from edgefuse.data.mmlu import load_mmlu, select
    from edgefuse.evaluate.mmlu import evaluate_mmlu
    from edgefuse.models import load_model

    items = select(load_mmlu(), "test", limit=args.items)
    runs, doc = {}, {"model": args.model, "device": args.device, "batch": args.batch, "items": len(items)}
    for dtype in args.dtypes:
        model, tok = load_model(args.model, device=args.device, dtype=dtype)
        for fmt in ("letters", "cloze"):
            evaluate_mmlu(model, tok, items[: args.batch], batch_size=args.batch, fmt=fmt)  # warm-up
            sync(args.device)
            t0 = time.perf_counter()
            res = evaluate_mmlu(model, tok, items, batch_size=args.batch, fmt=fmt)
            sync(args.device)
            wall = time.perf_counter() - t0
            runs[(dtype, fmt)] = res
            doc[f"{fmt}/{dtype}"] = {"wall_s": round(wall, 3), "items_per_s": round(len(items) / wall, 1),
                                     "tokens_per_s": round(res["tokens"] / wall, 1),
                                     "accuracy": res["accuracy"]["overall"]["acc"]}
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    for fmt in ("letters", "cloze"):
        for dtype in args.dtypes[1:]:
            doc[f"{fmt}/{dtype}_vs_{args.dtypes[0]}"] = _agreement(runs[(args.dtypes[0], fmt)], runs[(dtype, fmt)])
    return doc


def _prune(args, dtype: str, out: Path) -> float:
    """Taylor width pruning at 0.25 in ``dtype``, saved to ``out``; returns its seconds."""
    from edgefuse.data.mmlu import load_mmlu, select
    from edgefuse.data.prompts import answer_text, mc_prompt
    from edgefuse.edge.plan import save_pruned
    from edgefuse.edge.prune import prune_model
    from edgefuse.models import load_model

    model, tok = load_model(args.model, device=args.device, dtype=dtype)
    calib = [mc_prompt(it) + answer_text(it.answer) for it in select(load_mmlu(), "public", ["stem"])[: args.calib]]
    t0 = time.perf_counter()
    save_pruned(prune_model(model, tok, method="taylor", ratio=0.25, calib_prompts=calib), tok, out)
    sync(args.device)
    return time.perf_counter() - t0


def train(args) -> dict:
    from edgefuse.data.mmlu import load_mmlu, select
    from edgefuse.edge.train import TrainConfig, train_edge
    from edgefuse.io import read_json

    items = select(load_mmlu(), "edge", ["stem"])
    cfg = TrainConfig(steps=args.steps, batch=args.batch, seq=args.seq, checkpoint_every=0)
    doc = {"model": args.model, "device": args.device, "train": cfg.model_dump(), "items": len(items)}
    for dtype in args.dtypes:
        pruned = Path(args.work) / f"pruned-{dtype}"
        prune_s = _prune(args, dtype, pruned)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        pkg = train_edge(pruned, "stem", items, cfg, Path(args.work) / f"package-{dtype}", device=args.device,
                         dtype=dtype, progress=lambda *a, **k: None)
        s = read_json(pkg / "edgefuse.json")["stats"]
        doc[dtype] = {"prune_s": round(prune_s, 2), "step_wall_s": s["step_wall_s"],
                      "step_s_after_first": round(statistics.median(s["step_wall_s"][1:] or s["step_wall_s"]), 4),
                      "tokens_per_s": s["tokens_per_s"], "loss_curve": s["loss_curve"],
                      "peak_training_bytes": s["peak_memory_bytes"], "peak_note": s["peak_memory_note"],
                      "max_memory_allocated_bytes": (torch.cuda.max_memory_allocated()
                                                     if args.device.startswith("cuda") else None)}
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("env", "score", "train"))
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="the first is the reference")
    ap.add_argument("--items", type=int, default=1000, help="score: MMLU test items")
    ap.add_argument("--batch", type=int, default=64, help="score: scoring batch; train: training batch")
    ap.add_argument("--steps", type=int, default=4, help="train: steps (the first one warms up)")
    ap.add_argument("--seq", type=int, default=256, help="train: sequence length")
    ap.add_argument("--calib", type=int, default=8, help="train: calibration prompts for pruning")
    ap.add_argument("--work", default="gpu_check_work", help="train: where the pruned models and packages go")
    args = ap.parse_args()
    write(Path(args.out), {"env": env, "score": score, "train": train}[args.step](args))


if __name__ == "__main__":
    main()
