"""Prune → train (STEM edge split) → recover on the real SmolLM2, then MMLU STEM test accuracy of the
base model versus base + recovered adapter on the same items, with 95% intervals and the paired
difference. A short run (the issue asks for one; the cores are shared).

    .venv/bin/python bench/edge_stem_accuracy.py --ratio 0.25 --steps 50 --batch 8 --n-test 200

On a loaded machine: ``--base-only`` evaluates the base in a parallel process first, and ``--resume``
finishes from the training checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--structure", default="width")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgefuse-stem-bench"))
    ap.add_argument("--base-only", action="store_true", help="Only evaluate the base model (base.json in --work).")
    ap.add_argument("--resume", action="store_true",
                    help="Reuse --work/pruned and finish training from its checkpoint (steps may be lowered to the "
                         "checkpoint's step: the schedule is step-indexed, so that is the exact shorter run).")
    args = ap.parse_args()

    import torch

    from edgefuse.data.mmlu import load_mmlu, select
    from edgefuse.data.prompts import answer_text, mc_prompt
    from edgefuse.edge.plan import save_pruned
    from edgefuse.edge.prune import prune_model
    from edgefuse.edge.recover import recover
    from edgefuse.edge.train import TrainConfig, train_edge
    from edgefuse.evaluate.mmlu import evaluate_mmlu
    from edgefuse.evaluate.stats import fmt_ci, paired_diff_ci
    from edgefuse.models import load_model
    from edgefuse.peft_utils import apply_adapter

    t0 = time.perf_counter()
    ds = load_mmlu()
    base, tok = load_model("smollm2-135m")
    test = select(ds, "test", domains=["stem"], limit=args.n_test, seed=args.seed)
    base_file = args.work / "base.json"
    if args.base_only:
        args.work.mkdir(parents=True, exist_ok=True)
        base_file.write_text(json.dumps(evaluate_mmlu(base, tok, test, batch_size=8)))
        return
    pruned = args.work / "pruned"
    if not args.resume:
        calib = [mc_prompt(it) + answer_text(it.answer) for it in select(ds, "public", limit=32, seed=args.seed)]
        res = prune_model(base, tok, method=args.method, structure=args.structure, ratio=args.ratio,
                          calib_prompts=calib, seed=args.seed)
        save_pruned(res, tok, pruned)
        del res
    edge_items = select(ds, "edge", domains=["stem"])
    cfg = TrainConfig(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed)
    pkg = train_edge(pruned, "stem", edge_items, cfg, args.work / "package", resume=args.resume)
    rec = recover(pkg, pruned / "plan.json", args.work / "recovered")
    r_base = json.loads(base_file.read_text()) if base_file.is_file() else None
    if r_base is None or [x["id"] for x in r_base["items"]] != [it.id for it in test]:
        r_base = evaluate_mmlu(base, tok, test, batch_size=8)
    adapted = apply_adapter(base, rec)
    r_ad = evaluate_mmlu(adapted, tok, test, batch_size=8)
    a = [int(x["correct"]) for x in r_ad["items"]]
    b = [int(x["correct"]) for x in r_base["items"]]
    d = paired_diff_ci(a, b, seed=args.seed)
    stats = json.loads((pkg / "edgefuse.json").read_text())["stats"]
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "n_edge_items": len(edge_items), "n_test": len(test),
           "base": r_base["accuracy"]["overall"], "adapter": r_ad["accuracy"]["overall"], "paired_diff": d,
           "train": {k: stats[k] for k in ("steps", "tokens", "wall_s", "tokens_per_s", "peak_memory_bytes",
                                           "loss_curve")},
           "pred_letters_base": {L: sum(x["pred"] == L for x in r_base["items"]) for L in "ABCD"},
           "pred_letters_adapter": {L: sum(x["pred"] == L for x in r_ad["items"]) for L in "ABCD"},
           "total_wall_s": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads()}
    (args.work / "result.json").write_text(json.dumps(out, indent=2))
    lc = stats["loss_curve"]
    print(f"SmolLM2-135M, {args.structure}/{args.method} ratio {args.ratio:g}; {args.steps} steps × {args.batch} "
          f"prompts (lr {args.lr}, r=8, all 7 projections) on {len(edge_items)} STEM edge items; "
          f"loss {sum(lc[:5]) / 5:.3f} (first 5) → {sum(lc[-5:]) / 5:.3f} (last 5); training {stats['wall_s']:.0f} s, "
          f"{stats['tokens_per_s']} tokens/s, peak {stats['peak_memory_bytes'] / 2**30:.2f} GiB")
    print(f"MMLU STEM test, n={len(test)} (seeded stratified subsample), 0-shot, 95% bootstrap intervals:")
    print(f"| model | accuracy % |\n|---|---|\n| base | {fmt_ci(out['base'])} |\n"
          f"| base + recovered adapter | {fmt_ci(out['adapter'])} |\n| paired difference (pp) | {fmt_ci(d)} |")
    print(f"predicted letters base {out['pred_letters_base']}, adapter {out['pred_letters_adapter']}")
    print(f"total {out['total_wall_s']} s")


if __name__ == "__main__":
    main()
