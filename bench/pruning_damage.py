"""How much does each pruning criterion damage SmolLM2? KL(full ‖ pruned) per token on public prompts.

Why: an edge adapter can only carry knowledge back to the full model if the pruned model it trained
on still behaves like the full one (LoRAM's premise). This measures that distance directly for
every importance criterion at one width ratio, side by side in one run, on 32 prompts of the
``public`` split (prompt + answer letter, ≤ 160 tokens); Wanda and Taylor calibrate on 16 other
public prompts.

    .venv/bin/python bench/pruning_damage.py [--ratio 0.25] [--methods magnitude wanda taylor random]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from edgefuse.data.mmlu import load_mmlu, select
from edgefuse.data.prompts import answer_text, mc_prompt
from edgefuse.edge.prune import prune_model
from edgefuse.evaluate.scoring import make_batch
from edgefuse.models import count_parameters, load_model


def log_probs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return torch.log_softmax(out.logits[batch.attention_mask.bool()].float(), -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "taylor", "random"])
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    full, tok = load_model("smollm2-135m")
    public = select(load_mmlu(), "public")
    text = [mc_prompt(it) + answer_text(it.answer) for it in public]
    calib, evals = text[:16], text[100:132]
    batch = make_batch([e[-160:] for e in tok(evals, add_special_tokens=False).input_ids],
                       tok.pad_token_id or 0, "right", "cpu")
    ref = log_probs(full, batch)
    print(f"SmolLM2-135M, width pruning at ratio {args.ratio}, {int(batch.attention_mask.sum())} tokens of 32 public "
          f"prompts; load average at start {load0:.2f}")
    print("| criterion | params kept | KL(full ‖ pruned) nats/token | top-1 agreement with full | prune s |")
    print("|---|---:|---:|---:|---:|")
    for method in args.methods:
        t = time.perf_counter()
        res = prune_model(full, tok, method=method, structure="width", ratio=args.ratio, calib_prompts=calib)
        wall = time.perf_counter() - t
        lp = log_probs(res.model, batch)
        kl = torch.nn.functional.kl_div(lp, ref, log_target=True, reduction="batchmean").item()
        agree = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"| {method} | {count_parameters(res.model) / count_parameters(full):.0%} | {kl:.3f} | {agree:.1%} | "
              f"{wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
