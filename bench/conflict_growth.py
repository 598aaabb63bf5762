"""Do edge adapters conflict more as they train longer? LoRA-CR conflict scores at growing step counts.

Two (or more) edges are pruned and trained on the real SmolLM2 with the same recipe; each run is
continued from its own checkpoint to the next step count (the schedule is step-indexed, so the
package at 40 steps is exactly the 20-step run trained 20 steps more). At every step count the
recovered adapters go through `edgefuse.fusion.analyze_conflicts`, and the distribution of module
scores (the strongest opposition between two adapters, max(0, −cos)) and sign conflicts is printed:
how many modules LoRA-CR's default threshold (0.1) would touch, and which quantiles a `share` would.

    .venv/bin/python bench/conflict_growth.py --domains stem humanities --steps 20 40 80 160
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def quantiles(xs: list[float], qs=(0.5, 0.9, 0.99, 1.0)) -> dict[str, float]:
    s = sorted(xs)
    return {f"q{int(100 * q)}": s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] for q in qs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", nargs="+", default=["stem", "humanities"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 40, 80, 160])
    ap.add_argument("--objective", default="cloze")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgefuse-conflict-growth"))
    args = ap.parse_args()

    from edgefuse.adapters import load_adapter
    from edgefuse.data.mmlu import load_mmlu, select
    from edgefuse.data.prompts import answer_text, mc_prompt
    from edgefuse.edge.plan import save_pruned
    from edgefuse.edge.prune import prune_model
    from edgefuse.edge.recover import recover
    from edgefuse.edge.train import TrainConfig, train_edge
    from edgefuse.fusion import analyze_conflicts
    from edgefuse.models import load_model

    ds = load_mmlu()
    base, tok = load_model("smollm2-135m")
    rows = []
    pruned = {}
    for d in args.domains:
        pruned[d] = args.work / f"pruned-{d}"
        if not (pruned[d] / "plan.json").is_file():
            calib = [mc_prompt(it) + answer_text(it.answer) for it in select(ds, "public", domains=[d])[:8]]
            save_pruned(prune_model(base, tok, method="taylor", structure="width", ratio=args.ratio,
                                    calib_prompts=calib, seed=args.seed), tok, pruned[d])
    for steps in sorted(args.steps):
        adapters = []
        for d in args.domains:
            cfg = TrainConfig(steps=steps, lr=args.lr, objective=args.objective, seed=args.seed, checkpoint_every=0)
            pkg, ckpt = args.work / f"pkg-{d}-{steps}", args.work / f"ckpt-{d}"
            if not (pkg / "edgefuse.json").is_file():
                train_edge(pruned[d], d, select(ds, "edge", domains=[d]), cfg, pkg, progress=lambda *a, **k: None,
                           resume=(ckpt / "state.json").is_file(), checkpoint_dir=ckpt)
            rec = args.work / f"rec-{d}-{steps}"
            if not rec.exists():
                recover(pkg, pruned[d] / "plan.json", rec)
            adapters.append(load_adapter(rec))
        stats = analyze_conflicts(adapters)
        scores = [m["score"] for m in stats["modules"].values()]
        signs = [m["sign_conflict"] for m in stats["modules"].values()]
        rows.append({"steps": steps, "modules": len(scores), "above_0.1": sum(s > 0.1 for s in scores),
                     "positive": sum(s > 0 for s in scores), "score": quantiles(scores),
                     "mean_score": sum(scores) / len(scores), "sign_conflict": quantiles(signs),
                     "mean_sign_conflict": sum(signs) / len(signs)})
        print(json.dumps(rows[-1]), flush=True)
    (args.work / "conflict_growth.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                "rows": rows}, indent=2))
    print(f"SmolLM2-135M, edges {', '.join(args.domains)} (width/taylor {args.ratio:g}, objective {args.objective}, "
          f"lr {args.lr:g}); module conflict scores max(0, −cos) between the recovered adapters:")
    print("| steps | modules > 0.1 (default threshold) | modules > 0 | score median / q90 / q99 / max | "
          "mean sign conflict |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        q = r["score"]
        print(f"| {r['steps']} | {r['above_0.1']}/{r['modules']} | {r['positive']} | "
              f"{q['q50']:.3f} / {q['q90']:.3f} / {q['q99']:.3f} / {q['q100']:.3f} | {r['mean_sign_conflict']:.3f} |")


if __name__ == "__main__":
    main()
