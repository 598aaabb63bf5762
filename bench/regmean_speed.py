"""RegMean's fusion time against TIES on SmolLM2-135M shapes, for K = 4 and K = 17 adapters (issue 22).

Run: .venv/bin/python bench/regmean_speed.py [--repeats 3] [--no-write]

Inputs: K random rank-8 LoRA adapters (alpha 16, the conflict study's recipe) on q,k,v,o,gate,up,down of
SmolLM2-135M's shapes (30 layers, hidden 576, intermediate 1536: 210 modules), and per adapter one Gram matrix per
module input, G = HᵀH of 1,024 random tokens (the study's Gram budget). Four distinct Gram sets are drawn and
adapter k uses set k mod 4: RegMean's work does not depend on the values (one shrink and accumulation per adapter
and module, one Cholesky solve of d_in × d_in per module), and 17 distinct sets would hold 6.8 GB. Modules that
read the same input (q/k/v; gate/up) share one Gram tensor, as the study's Gram files do.
TIES at density 0.5, output rank Σr (its exact rank). Times are medians of the repeats, RegMean and TIES timed
alternately in this one process; the table gives RegMean / TIES per K.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_speed import loadavg, machine, write_section  # noqa: E402

SECTION = "## RegMean fusion time (issue 22)"
LAYERS, HIDDEN, INTER, RANK, TOKENS, GRAM_SETS = 30, 576, 1536, 8, 1024, 4
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (192, HIDDEN), "v_proj": (192, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
          "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp", "up_proj": "mlp",
         "down_proj": "down"}  # modules reading the same tensor share its Gram matrix


def module_names() -> list[str]:
    part = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return [f"model.layers.{i}.{part[t]}.{t}" for i in range(LAYERS) for t in SHAPES]


def adapters(k: int, g: torch.Generator):
    from edgefuse.adapters import LoraAdapter, LoraModule

    out = []
    for _ in range(k):
        mods = {}
        for name in module_names():
            o, i = SHAPES[name.rsplit(".", 1)[1]]
            mods[name] = LoraModule(torch.randn(RANK, i, generator=g) * 0.02, torch.randn(o, RANK, generator=g) * 0.01,
                                    2.0)
        out.append(LoraAdapter(mods))
    return out


def gram_sets(g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    sets = []
    for _ in range(GRAM_SETS):
        shared = {}
        for layer in range(LAYERS):
            for kind, d in (("attn", HIDDEN), ("o", HIDDEN), ("mlp", HIDDEN), ("down", INTER)):
                h = torch.randn(TOKENS, d, generator=g)
                shared[(layer, kind)] = h.T @ h
        sets.append({n: shared[(int(n.split(".")[2]), INPUT[n.rsplit(".", 1)[1]])] for n in module_names()})
    return sets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    from edgefuse.fusion import fuse_adapters

    started, load_start = time.strftime("%Y-%m-%d %H:%M %Z"), loadavg()
    g = torch.Generator().manual_seed(0)
    print(f"machine: {machine()}; load average at start {load_start}; drawing {GRAM_SETS} Gram sets ...", flush=True)
    grams = gram_sets(g)
    rows = {}
    for k in (4, 17):
        ads = adapters(k, g)
        gk = [grams[j % GRAM_SETS] for j in range(k)]
        times = {"ties": [], "regmean": []}
        for _ in range(args.repeats):  # alternately, so that drift of the machine hits both alike
            t = time.perf_counter()
            fuse_adapters(ads, "ties", density=0.5, seed=0)
            times["ties"].append(time.perf_counter() - t)
            t = time.perf_counter()
            fuse_adapters(ads, "regmean", grams=gk)
            times["regmean"].append(time.perf_counter() - t)
        rows[k] = {m: statistics.median(v) for m, v in times.items()}
        print(f"K={k:2d}: TIES {rows[k]['ties']:.2f} s, RegMean {rows[k]['regmean']:.2f} s, "
              f"ratio {rows[k]['regmean'] / rows[k]['ties']:.2f}", flush=True)
    lines = [SECTION, "",
             f"Command: `.venv/bin/python bench/regmean_speed.py --repeats {args.repeats}` — {started}; {machine()}; "
             f"load average {load_start} at start, {loadavg()} at end. SmolLM2-135M shapes (210 modules), K random "
             f"rank-{RANK} adapters, Gram matrices of {TOKENS} random tokens per module input (bench/regmean_speed.py "
             "docstring); TIES at density 0.5, output rank Σr; median of the repeats, timed alternately.", "",
             "| K | TIES s | RegMean s | RegMean / TIES |", "|---:|---:|---:|---:|"]
    lines += [f"| {k} | {r['ties']:.2f} | {r['regmean']:.2f} | **{r['regmean'] / r['ties']:.2f}×** |"
              for k, r in rows.items()]
    lines += ["", "RegMean solves one d_in × d_in system per module (Cholesky of Σ G̃) and multiplies the stacked "
              "A_iG̃_i by it; it never forms an m × n matrix (tests/test_regmean_memory.py). TIES works on each "
              "module's dense ΔW.", ""]
    if not args.no_write:
        write_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "\n".join(lines), SECTION)
        print("BENCHMARKS.md updated")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
