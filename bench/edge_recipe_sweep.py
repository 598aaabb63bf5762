"""Which edge recipe gains the most on its own domain? A small measured sweep on the real SmolLM2.

The edge model is pruned once (``--method``/``--ratio``, calibration on the domain's public items), then
each recipe ``objective:steps:lr:rank`` trains an adapter on the domain's edge split, which is recovered
and scored on the same ``--n-test`` own-domain test items as the base model, in cloze form (acc and
acc_norm) with paired bootstrap intervals. The configs/cpu-study.yaml edge recipe comes from this table
(BENCHMARKS.md, "Edge recipe sweep"). Each recipe's training and scoring times are printed as well:
they are the rates `edgefuse.runner.estimate` starts from. Beside accuracy, the paired Δ of the gold answer's
log-likelihood per character and of its margin over the best wrong answer (`edgefuse.evaluate.gold`), which resolve
smaller effects on the same items.

    .venv/bin/python bench/edge_recipe_sweep.py --domain social_sciences --n-test 300 \
        --recipes cloze:80:3e-4:8 cloze:160:1e-3:8 both:80:1e-3:8 letters:80:1e-3:8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_recipe(text: str) -> dict:
    objective, steps, lr, rank = text.split(":")
    return {"objective": objective, "steps": int(steps), "lr": float(lr), "rank": int(rank)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="social_sciences")
    ap.add_argument("--method", default="taylor")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="+", default=["cloze:80:3e-4:8", "cloze:80:1e-3:8", "both:80:1e-3:8"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgefuse-recipe-sweep"))
    args = ap.parse_args()

    import torch

    from edgefuse.data.mmlu import load_mmlu, select
    from edgefuse.data.prompts import answer_text, mc_prompt
    from edgefuse.edge.plan import save_pruned
    from edgefuse.edge.prune import prune_model
    from edgefuse.edge.recover import recover
    from edgefuse.edge.train import TrainConfig, train_edge
    from edgefuse.evaluate.gold import GOLD, MARGIN, gold_scores
    from edgefuse.evaluate.mmlu import evaluate_mmlu
    from edgefuse.evaluate.stats import fmt_ci, fmt_raw, paired_diff_ci
    from edgefuse.models import load_model
    from edgefuse.peft_utils import apply_adapter

    args.work.mkdir(parents=True, exist_ok=True)
    ds = load_mmlu()
    base, tok = load_model("smollm2-135m")
    test = select(ds, "test", domains=[args.domain], limit=args.n_test, seed=args.seed)
    edge_items = select(ds, "edge", domains=[args.domain])
    pruned = args.work / f"pruned-{args.method}-{args.ratio:g}"
    if not (pruned / "plan.json").is_file():
        calib = [mc_prompt(it) + answer_text(it.answer)
                 for it in select(ds, "public", domains=[args.domain])[: args.calib]]
        res = prune_model(base, tok, method=args.method, structure="width", ratio=args.ratio, calib_prompts=calib,
                          seed=args.seed)
        save_pruned(res, tok, pruned)
        del res

    def score(model, name: str) -> tuple[dict, float]:
        """Cloze results of ``model`` on the test items, kept in the work directory (a rerun reuses them)."""
        path = args.work / f"eval-{name}-{args.n_test}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            return r, r["wall_s"]
        t0 = time.perf_counter()
        r = evaluate_mmlu(model, tok, test, batch_size=args.batch, fmt="cloze")
        path.write_text(json.dumps(r))
        return r, time.perf_counter() - t0

    r_base, base_s = score(base, "base")
    by_id = {it.id: it for it in test}
    g_base = gold_scores(r_base["items"], by_id, "cloze")  # per item [gold log-lik per char, margin]
    rows = []
    for text in args.recipes:
        rc = parse_recipe(text)
        tag = text.replace(":", "_")
        cfg = TrainConfig(steps=rc["steps"], lr=rc["lr"], rank=rc["rank"], alpha=2 * rc["rank"],
                          objective=rc["objective"], batch=8, seed=args.seed, checkpoint_every=0)
        pkg = args.work / f"pkg-{args.method}-{args.ratio:g}-{tag}"
        if not (pkg / "edgefuse.json").is_file():
            train_edge(pruned, args.domain, edge_items, cfg, pkg, progress=lambda *a, **k: None)
        stats = json.loads((pkg / "edgefuse.json").read_text())["stats"]
        rec = recover(pkg, pruned / "plan.json", args.work / f"rec-{tag}") if not (args.work / f"rec-{tag}").exists() \
            else args.work / f"rec-{tag}"
        model = apply_adapter(base, rec)
        r_ad, eval_s = score(model, f"{args.method}-{args.ratio:g}-{tag}")
        base = model.unload()
        row = {"recipe": text, **rc, "train_s": stats["wall_s"], "prompt_passes": stats["prompts"]
               * (2 if rc["objective"] == "both" else 1), "eval_s": round(eval_s, 1),
               "loss_first": sum(stats["loss_curve"][:5]) / 5, "loss_last": sum(stats["loss_curve"][-5:]) / 5}
        for m, key in (("acc", "correct"), ("acc_norm", "correct_norm")):
            a = [int(x[key]) for x in r_ad["items"]]
            b = [int(x[key]) for x in r_base["items"]]
            row[m] = r_ad["accuracy" + ("_norm" if m == "acc_norm" else "")]["overall"]
            row[f"{m}_diff"] = paired_diff_ci(a, b, seed=args.seed)
        g = gold_scores(r_ad["items"], by_id, "cloze")
        for which, m in ((GOLD, "gold"), (MARGIN, "margin")):
            row[f"{m}_diff"] = paired_diff_ci([g[i][which] for i in sorted(g_base)],
                                              [g_base[i][which] for i in sorted(g_base)], seed=args.seed)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("recipe", "train_s", "eval_s")}), flush=True)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "n_test": len(test), "n_edge_items": len(edge_items),
           "base": {"acc": r_base["accuracy"]["overall"], "acc_norm": r_base["accuracy_norm"]["overall"]},
           "base_eval_s": round(base_s, 1), "rows": rows, "torch_threads": torch.get_num_threads()}
    (args.work / "sweep.json").write_text(json.dumps(out, indent=2))
    print(f"SmolLM2-135M, {args.domain} edge, width/{args.method} ratio {args.ratio:g}; cloze scoring of n={len(test)} "
          f"{args.domain} test items (base acc {fmt_ci(out['base']['acc'])}, acc_norm {fmt_ci(out['base']['acc_norm'])}; "
          f"{base_s:.0f} s)")
    print("| recipe (objective:steps:lr:rank) | loss first→last 5 | train s (s/prompt) | acc Δ vs base | "
          "acc_norm Δ vs base | gold Δ (nats/char) | margin Δ |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['loss_first']:.3f} → {r['loss_last']:.3f} | {r['train_s']:.0f} "
              f"({r['train_s'] / r['prompt_passes']:.3f}) | {fmt_ci(r['acc_diff'])} | {fmt_ci(r['acc_norm_diff'])} | "
              f"{fmt_raw(r['gold_diff'])} | {fmt_raw(r['margin_diff'])} |")


if __name__ == "__main__":
    main()
