"""Mixed-adapter batches side by side: tokens/s of one forward pass over the same batch, four ways.

Run: .venv/bin/python bench/mixture_throughput.py [--model smollm2-135m] [--batch 8] [--tokens 128]
     [--ranks 8 8 16 16] [--repeats 7] [--device cpu|cuda] [--threads N]
Four random PEFT LoRAs of the given ranks (all seven projections) are made on the model; every
variant runs the same batch of --batch MMLU prompts cut to exactly --tokens tokens (no padding),
with the LM head at the last position only (``logits_to_keep=1``), as the scorers use it:
  (a) merged     adapter 0 merged into the weights (PEFT merge_and_unload): the cost floor
  (b) mix k=2    edgefuse LoraMixture, row i mixes adapters i and i+1 (mod 4), weights 0.6 / 0.4
  (c) mix k=1    edgefuse LoraMixture, row i uses adapter i mod 4 alone
  (d) PEFT k=1   the 4 adapters loaded in one PeftModel, ``adapter_names=`` per row (one sub-batch
                 per adapter; it cannot mix)
The variants run round-robin, one call each per repeat, after one warm-up call each; the median
of the repeats is reported. set_weights runs inside the timed call of (b) and (c), as it would for
each new batch (the batch's stacked factors are cached after the warm-up, as for any repeated union).
Prints the ratios the issue sets targets for: (b)/(a) tokens/s >= 0.8 and (c)/(d) >= 1, and how
far (c) and (d) agree.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edgefuse.adapters import load_adapter
from edgefuse.compose import LoraMixture, weight_matrix
from edgefuse.data.mmlu import load_mmlu, select
from edgefuse.data.prompts import mc_prompt
from edgefuse.edge.families import ROLES, family_for, resolve_targets
from edgefuse.models import load_model


def make_adapters(model, ranks, root: Path, seed: int = 0) -> list[Path]:
    """Random PEFT LoRAs (B ≠ 0) saved as PEFT directories, each made on its own copy of the model."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(family_for(model.config), ROLES)
    dirs = []
    for k, r in enumerate(ranks):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
            pm = get_peft_model(copy.deepcopy(model), cfg)
        pm.save_pretrained(str(root / f"a{k}"))
        dirs.append(root / f"a{k}")
        del pm
    return dirs


def prompt_ids(tok, n: int, tokens: int) -> torch.Tensor:
    """(n, tokens) ids: each row is consecutive MMLU test prompts, cut to exactly ``tokens`` tokens."""
    items = iter(select(load_mmlu(), "test", limit=40 * n, seed=0))
    rows = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < tokens:
            ids += tok(mc_prompt(next(items)) + "\n\n", add_special_tokens=False).input_ids
        rows.append(ids[:tokens])
    return torch.tensor(rows)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def round_robin(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, one call of each per round (after a warm-up call)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine(device: str) -> str:
    where = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    return (f"{where}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def main() -> None:
    from peft import PeftModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--ranks", type=int, nargs=4, default=[8, 8, 16, 16])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, device="cpu")
    ids = prompt_ids(tok, args.batch, args.tokens).to(args.device)
    mask = torch.ones_like(ids)
    rows = range(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(model, args.ranks, Path(tmp))
        adapters = [load_adapter(d) for d in dirs]
        merged = PeftModel.from_pretrained(copy.deepcopy(model), str(dirs[0])).merge_and_unload().to(args.device)
        multi = PeftModel.from_pretrained(copy.deepcopy(model), str(dirs[0]), adapter_name="a0")
        for k, d in enumerate(dirs[1:], 1):
            multi.load_adapter(str(d), adapter_name=f"a{k}")
    multi.to(args.device).eval()
    model.to(args.device)
    names = [f"a{i % 4}" for i in rows]
    w_k2 = weight_matrix([{i % 4: 0.6, (i + 1) % 4: 0.4} for i in rows], 4)
    w_k1 = weight_matrix([{i % 4: 1.0} for i in rows], 4)

    def forward(m, **kw):
        return m(input_ids=ids, attention_mask=mask, logits_to_keep=1, **kw).logits

    with torch.inference_mode(), LoraMixture(model, adapters) as mix:
        def mixed(w):
            mix.set_weights(w)
            return forward(model)

        fns = {"(a) one adapter merged": lambda: forward(merged),
               "(b) mixture k=2 of 4 (edgefuse)": lambda: mixed(w_k2),
               "(c) k=1, 4 adapters (edgefuse)": lambda: mixed(w_k1),
               "(d) k=1, 4 adapters (PEFT adapter_names)": lambda: forward(multi, adapter_names=names)}
        secs = round_robin(fns, args.repeats, args.device)
        agree = float((mixed(w_k1).float() - forward(multi, adapter_names=names).float()).abs().max())

    n_tok = ids.numel()
    speed = {name: n_tok / s for name, s in secs.items()}
    a, b, c, d = speed.values()
    print(f"machine: {machine(args.device)}")
    print(f"model {args.model} on {args.device}; batch {args.batch} x {args.tokens} tokens; adapter ranks "
          f"{args.ranks} on {', '.join(adapters[0].target_modules)}; median of {args.repeats}")
    print(f"{'variant':<44}{'ms':>10}{'tokens/s':>12}")
    for name, s in secs.items():
        print(f"{name:<44}{1000 * s:>10.1f}{speed[name]:>12.0f}")
    print(f"ratio (b)/(a) tokens/s: {b / a:.2f}x  (target >= 0.8)")
    print(f"ratio (c)/(d) tokens/s: {c / d:.2f}x  (target >= 1)")
    print(f"(c) vs (d) last-position logits: max |d| {agree:.2e}")


if __name__ == "__main__":
    main()
