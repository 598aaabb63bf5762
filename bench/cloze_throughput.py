"""Cloze scoring cost side by side: letter scoring, edgefuse's cached cloze scorer, a naive cloze scorer.

Run: .venv/bin/python bench/cloze_throughput.py [--n 200] [--batch-size 8] [--repeats 3]
All three score the same N stratified MMLU test items in one process (median wall time of the
repeats, tokenization included, as `evaluate_mmlu` runs them):
  letters  LetterScorer on the lettered prompt (one forward per item, head at one position)
  cloze    ClozeScorer on the cloze prompt (context once, the 4 answer texts packed after it)
  naive    one right-padded forward per item over its 4 full context+continuation sequences, full
           logits, no cache (what lm-eval-harness does by default)
Prints the ratios the issue sets targets for:
  cloze / letters time   (target <= 1.6)
  naive / cloze time     (target >= 3)
and how far the cloze scores and predictions (acc, acc_norm) agree with the naive scorer's.
"""

from __future__ import annotations

import argparse
import platform

import torch

from edgefuse.data.mmlu import load_mmlu, select
from edgefuse.data.prompts import cloze_continuation, cloze_prompt, mc_prompt
from edgefuse.evaluate.cloze import ClozeScorer, choice_lengths, choose, encode_choices
from edgefuse.evaluate.scoring import LetterScorer, make_batch
from edgefuse.models import load_model
from edgefuse.profiling import median_time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model, tok = load_model(args.model, device="cpu")
    items = select(load_mmlu(), "test", limit=args.n, seed=0)
    letter_prompts = [mc_prompt(it) for it in items]
    contexts = [cloze_prompt(it) for it in items]
    conts = [[cloze_continuation(it, c) for c in range(4)] for it in items]
    letters = LetterScorer(model, tok, batch_size=args.batch_size)
    cloze = ClozeScorer(model, tok, batch_size=args.batch_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    @torch.inference_mode()
    def run_naive():
        out = torch.empty((len(items), 4))
        for i, (context, cs) in enumerate(zip(contexts, conts)):
            ctx, tails = encode_choices(tok, context, cs)
            seqs = [(ctx + t)[:-1] for t in tails]  # the last token is predicted, never fed
            b = make_batch(seqs, pad, "right", "cpu")
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           position_ids=b.position_ids).logits
            lp = torch.log_softmax(logits.float(), -1)
            for c, t in enumerate(tails):
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(t))
                out[i, c] = lp[c, pos, torch.tensor(t)].sum()
        return out

    letters.score(letter_prompts[: args.batch_size])  # warm-up
    t_letters, _ = median_time(lambda: letters.score(letter_prompts), args.repeats)
    t_cloze, got = median_time(lambda: cloze.score(contexts, conts), args.repeats)
    t_naive, ref = median_time(run_naive, args.repeats)

    lengths = torch.tensor([choice_lengths(cs) for cs in conts], dtype=torch.float32)
    agree = {m: float((choose(got, lengths, m) == choose(ref, lengths, m)).float().mean()) for m in ("acc", "acc_norm")}
    n_ctx = sum(len(tok(c, add_special_tokens=False).input_ids) for c in contexts)
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {args.model}; {len(items)} stratified MMLU test items, {n_ctx} cloze context tokens, "
          f"batch {args.batch_size}, median of {args.repeats}")
    print(f"{'scorer':<36}{'s':>8}{'items/s':>10}")
    for name, t in [("letters (LetterScorer)", t_letters), ("cloze (ClozeScorer, packed)", t_cloze),
                    ("naive cloze, one pass per item", t_naive)]:
        print(f"{name:<36}{t:>8.2f}{len(items) / t:>10.1f}")
    print(f"ratio cloze / letters time: {t_cloze / t_letters:.2f}x  (target <= 1.6)")
    print(f"ratio naive / cloze time:   {t_naive / t_cloze:.2f}x  (target >= 3)")
    print(f"cloze vs naive: max |d loglik| {float((got - ref).abs().max()):.2e}; same prediction "
          f"acc {100 * agree['acc']:.1f}%, acc_norm {100 * agree['acc_norm']:.1f}%")


if __name__ == "__main__":
    main()
