"""What collecting Gram matrices costs next to one MMLU evaluation, in one process (issue 22).

Run alone: .venv/bin/python bench/gram_cost.py [--domains physics history economics health] [--tokens 1024]
           [--mmlu 600] [--repeats 2]

Both on SmolLM2-135M, loaded once: the study's ``grams`` stage work for each domain (the base model over the
domain's public-split prompts, 64 tokens each, ``--tokens`` in all, HᵀH summed in float64 for every module input:
`edgefuse.interference.collect`) and one cloze MMLU evaluation of ``--mmlu`` stratified test items, the size of
configs/conflict-study.yaml's (`edgefuse.evaluate.mmlu.evaluate_mmlu`, batch 8). Medians of ``--repeats``, the two
timed alternately; the ratio is Gram seconds per domain over evaluation seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edgefuse.data.mmlu import load_mmlu, select
from edgefuse.evaluate.mmlu import evaluate_mmlu
from edgefuse.interference.collect import gram_matrices, public_prompts, token_sequences
from edgefuse.interference.spec import GramSpec
from edgefuse.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", nargs="+", default=["physics", "history", "economics", "health"])
    ap.add_argument("--tokens", type=int, default=GramSpec.tokens)
    ap.add_argument("--mmlu", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    ds = load_mmlu()
    model, tok = load_model("smollm2-135m")
    model.eval()
    spec = GramSpec(tokens=a.tokens)
    seqs = {d: token_sequences(tok, public_prompts(ds, d, spec), spec.tokens, spec.per_prompt) for d in a.domains}
    items = select(ds, "test", limit=a.mmlu, seed=0)
    gram_s, eval_s = [], []
    for _ in range(a.repeats):
        per = []
        for d in a.domains:
            t0 = time.perf_counter()
            gram_matrices(model, seqs[d])
            per.append(time.perf_counter() - t0)
        gram_s.append(statistics.mean(per))
        t0 = time.perf_counter()
        evaluate_mmlu(model, tok, items, batch_size=8, fmt="cloze")
        eval_s.append(time.perf_counter() - t0)
        print(f"  grams {gram_s[-1]:.1f} s per domain, eval {eval_s[-1]:.1f} s", flush=True)
    g, e = statistics.median(gram_s), statistics.median(eval_s)
    tokens = {d: sum(map(len, s)) for d, s in seqs.items()}
    print(f"SmolLM2-135M, {torch.get_num_threads()} torch threads, CPU. Gram matrices: {g:.1f} s per domain "
          f"(mean over {', '.join(f'{d} {t}' for d, t in tokens.items())} tokens); one cloze MMLU evaluation of "
          f"{len(items)} items: {e:.1f} s; ratio {g / e:.3f} (one domain's Grams = {100 * g / e:.0f}% of one "
          f"evaluation; {len(a.domains)} domains {len(a.domains) * g / e:.2f}×). Medians of {a.repeats}.")


if __name__ == "__main__":
    main()
