"""Scorer throughput on the same batches: edgefuse vs a raw forward vs a naive one-pass-per-choice scorer.

Run: .venv/bin/python bench/eval_throughput.py [--n 48] [--batch-size 8] [--repeats 3]
Prints tokens/s of each (median of repeats) and the two ratios the issue sets targets for:
  edgefuse / raw forward        (target >= 0.9)
  edgefuse / naive per-choice   (target >= 3)
"""

from __future__ import annotations

import argparse
import platform

import torch

from edgefuse.data.mmlu import load_mmlu, select
from edgefuse.data.prompts import answer_text, mc_prompt
from edgefuse.evaluate.scoring import LetterScorer, make_batch
from edgefuse.models import load_model
from edgefuse.profiling import median_time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model, tok = load_model(args.model, device="cpu")
    items = select(load_mmlu(), "test", limit=args.n, seed=0)
    prompts = [mc_prompt(it) for it in items]
    scorer = LetterScorer(model, tok, batch_size=args.batch_size)
    seqs = scorer.encode(prompts)
    groups = scorer.batches(seqs)
    n_tokens = sum(len(s) for s in seqs)

    def run_edgefuse():
        scorer.score_tokens(seqs)

    @torch.inference_mode()
    def run_raw():
        for idx in groups:
            b = make_batch([seqs[i] for i in idx], scorer.pad_id, "right", "cpu")
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)

    # naive: one sequence per (question, choice), full-vocabulary logits, same batch size
    naive_seqs = [s + tok(answer_text(k), add_special_tokens=False).input_ids for s in seqs for k in range(4)]
    naive_groups = [list(range(i, min(i + args.batch_size, len(naive_seqs))))
                    for i in range(0, len(naive_seqs), args.batch_size)]

    @torch.inference_mode()
    def run_naive():
        for idx in naive_groups:
            b = make_batch([naive_seqs[i] for i in idx], scorer.pad_id, "right", "cpu")
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            lp = torch.log_softmax(logits.float(), -1)
            for r, i in enumerate(idx):
                L = len(naive_seqs[i])
                lp[r, L - 2, naive_seqs[i][L - 1]].item()

    run_edgefuse()  # warm-up
    t_ef = median_time(run_edgefuse, args.repeats)[0]
    t_raw = median_time(run_raw, args.repeats)[0]
    t_naive = median_time(run_naive, max(1, args.repeats // 2))[0]
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {args.model}; {args.n} MMLU test questions, {n_tokens} prompt tokens, batch {args.batch_size}")
    print(f"{'scorer':<28}{'s':>8}{'tokens/s':>12}")
    for name, t in [("edgefuse LetterScorer", t_ef), ("raw model(input_ids)", t_raw), ("naive one pass per choice", t_naive)]:
        print(f"{name:<28}{t:>8.2f}{n_tokens / t:>12.1f}")
    print(f"ratio edgefuse / raw forward: {t_raw / t_ef:.2f}x  (target >= 0.9)")
    print(f"ratio edgefuse / naive:       {t_naive / t_ef:.2f}x  (target >= 3)")


if __name__ == "__main__":
    main()
