"""MMLU-CD evaluation cost vs one forward pass over the full instance text, and SmolLM2's MMLU-CD accuracy.

Run: .venv/bin/python bench/mmlu_cd_cost.py [--cost-n 8] [--acc-n 100] [--repeats 3] [--batch-size 8]
     [--threads N] [--skip-cost | --skip-accuracy]

Cost (issue 5 target: chained / full forward <= 1.3): for k = 2 and 3, the same instances in the same
batches (sorted by prefix length, left padding) are
  chained   edgefuse's ChainedScorer: cached prefix pass + k-1 cached steps, LM head at k positions
  forward   one model(input_ids) pass over the full instance text (prefix + the k predicted answers)
  body      the same pass through the decoder body only (no LM head): the cheapest possible single pass
Times are medians of --repeats interleaved runs in one process, both wall time and this process's
CPU time (the CPU time is the steadier figure when other jobs share the cores). The first chained
run also fixes the predicted answers written into the full instance text.
Accuracy: evaluate_mmlu_cd on --acc-n instances per k (seed 0): strict, per position, the same items
asked alone, the paired penalty, chance.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from edgefuse.data.mmlu import load_mmlu
from edgefuse.data.mmlu_cd import build_instances, content_hash
from edgefuse.evaluate.mmlu_cd import ChainedScorer, evaluate_mmlu_cd, resolve
from edgefuse.evaluate.scoring import lm_parts, make_batch
from edgefuse.evaluate.stats import fmt_ci
from edgefuse.models import load_model


def cost(model, tok, ds, k: int, n: int, batch_size: int, repeats: int) -> None:
    doc = build_instances(ds, k=k, n=n, seed=0)
    instances = resolve(doc, ds)
    scorer = ChainedScorer(model, tok, batch_size=batch_size)
    prefixes, cues = scorer.encode(instances)
    t0, c0 = time.perf_counter(), time.process_time()
    preds = scorer.score(instances).argmax(-1).tolist()  # also fixes the answers of the full text
    first = (time.perf_counter() - t0, time.process_time() - c0)
    full = [p + [t for j, c in enumerate(cues) for t in [scorer.letter_ids[preds[i][j]], *c]]
            + [scorer.letter_ids[preds[i][-1]]] for i, p in enumerate(prefixes)]
    order = sorted(range(len(instances)), key=lambda i: (-len(prefixes[i]), i))
    groups = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    body, _, _ = lm_parts(model)
    batches = [make_batch([full[i] for i in g], scorer.pad_id, "left", "cpu") for g in groups]

    @torch.inference_mode()
    def run_forward():
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)

    @torch.inference_mode()
    def run_body():
        for b in batches:
            body(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)

    def run_chained():
        scorer.score(instances)

    wall = {"chained": [first[0]], "forward": [], "body": []}
    cpu = {"chained": [first[1]], "forward": [], "body": []}
    for r in range(repeats):
        for name, fn in (("chained", run_chained), ("forward", run_forward), ("body", run_body)):
            if name == "chained" and r == 0:
                continue  # the first chained run is the one above
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    mw = {name: statistics.median(v) for name, v in wall.items()}
    mc = {name: statistics.median(v) for name, v in cpu.items()}
    n_tok = sum(len(f) for f in full)
    print(f"k={k}: {n} instances, {n_tok} tokens of full instance text, batch {batch_size}, {repeats} repeats, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name in ("chained", "forward", "body"):
        print(f"  {name:<8} wall {mw[name]:>7.2f} s ({n_tok / mw[name]:>6.1f} tokens/s)  cpu {mc[name]:>7.2f} s   "
              "wall runs: " + " ".join(f"{t:.1f}" for t in wall[name]))
    for ref, label in (("forward", "full forward"), ("body", "body-only forward")):
        print(f"  ratio chained / {label:<18} wall {mw['chained'] / mw[ref]:.2f}x   cpu {mc['chained'] / mc[ref]:.2f}x"
              + ("   (target <= 1.3)" if ref == "forward" else ""))


def accuracy(model, tok, ds, k: int, n: int, batch_size: int, single_items=None) -> list:
    doc = build_instances(ds, k=k, n=n, seed=0)
    t = time.perf_counter()
    res = evaluate_mmlu_cd(model, tok, doc, ds, batch_size=batch_size, single_items=single_items)
    print(f"k={k}: {n} instances (seed 0, sha256 {content_hash(doc)[:12]}), {time.perf_counter() - t:.0f} s, "
          f"{res['tokens']} decoder tokens in {res['chained_wall_s']:.0f} s chained")
    print(f"  strict            {fmt_ci(res['strict'])}   chance {100 * res['chance']:.2f}")
    for j, r in enumerate(res["per_position"], 1):
        print(f"  answer {j}          {fmt_ci(r)}")
    print(f"  in instance (all) {fmt_ci(res['answer'])}")
    print(f"  asked alone       {fmt_ci(res['single'])}")
    print(f"  penalty           {fmt_ci(res['penalty'])}  (alone - in instance, paired)")
    print(f"  alone, all k right {fmt_ci(res['single_strict'])}; strict penalty {fmt_ci(res['penalty_strict'])}")
    return res["single_items"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cost-n", type=int, default=8)
    ap.add_argument("--acc-n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu")
    ds = load_mmlu()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"model {args.model}; load average {os.getloadavg()[0]:.1f}")
    for k in () if args.skip_cost else (2, 3):
        cost(model, tok, ds, k, args.cost_n, args.batch_size, args.repeats)
    if not args.skip_accuracy:
        # seed-0 streams draw each domain's items in one fixed order, so the k=2 items are a subset of
        # the k=3 ones: score the items alone once (k=3 first) and reuse those records for k=2
        single = accuracy(model, tok, ds, 3, args.acc_n, args.batch_size)
        accuracy(model, tok, ds, 2, args.acc_n, args.batch_size, single_items=single)


if __name__ == "__main__":
    main()
