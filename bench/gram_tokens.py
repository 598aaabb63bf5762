"""How many tokens a domain's Gram matrices need before the interference figures settle (issue 22).

Run: .venv/bin/python bench/gram_tokens.py RUN_DIR [--edges physics history economics health]
     [--budgets 128 256 512 1024] [--reference 2048] [--out FILE.md]

RUN_DIR is a finished conflict study (configs/conflict-study.yaml) with recovered adapters for the named edges. For
those K edges, the base model (SmolLM2-135M) runs over two kinds of prompts per edge, 64 tokens of each prompt,
subjects interleaved as the study does (`edgefuse.interference.collect`):
- the edge's own **training** prompts (``edge`` split), up to ``--reference`` tokens: the reference, the closest the
  machine has to the domain's true input distribution (and what ``interference.source: edges`` would send);
- the **public** split (what the cloud uses by default), at each budget.
At each budget the K domains' running Gram sums give the interference figures of the K adapters and of their task
arithmetic sum (`edgefuse.interference.metrics.interference`): the pooled ratio matrix (K × K − K entries) and the
fused deviation per domain (K entries). The table gives each figure's relative error against the reference (median
and worst entry) and whether the domains' order by deviation is the reference's. Sampling error of the edge split
against itself shows how fast the estimate converges; the public rows add the public split's own difference.
Not a timing benchmark: it may run beside other work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from edgefuse.adapters import load_adapter
from edgefuse.data.mmlu import SplitSpec, load_mmlu, select
from edgefuse.interference.collect import gram_matrices, interleaved_prompts, token_sequences
from edgefuse.interference.metrics import interference
from edgefuse.models import load_model

PER_PROMPT = 64


def recovered(run_dir: Path, edge: str) -> Path:
    hits = sorted(run_dir.glob(f"stages/recover-{edge}-s0-*/adapter"))
    if not hits:
        sys.exit(f"{run_dir}: no recovered adapter of edge {edge!r} (stages/recover-{edge}-s0-*/adapter)")
    return hits[0]


def figures(adapters, grams) -> dict:
    s = interference(adapters, grams)["summary"]
    K = len(adapters)
    ratio = [s["ratio"][i][j] for i in range(K) for j in range(K) if i != j]
    return {"ratio": ratio, "deviation": list(s["deviation"])}


def snapshots(model, tok, prompts: dict[str, list[str]], budgets: list[int], adapters) -> dict[int, dict]:
    """The figures at each budget, from running Gram sums (one pass over each domain's sequences)."""
    edges = list(prompts)
    seqs = {e: token_sequences(tok, prompts[e], max(budgets), PER_PROMPT) for e in edges}
    running: dict[str, dict] = {e: {} for e in edges}
    done = {e: 0 for e in edges}  # sequences summed so far
    out = {}
    for b in sorted(budgets):
        tokens = {}
        for e in edges:
            upto, total = 0, 0
            while upto < len(seqs[e]) and total < b:
                total += len(seqs[e][upto])
                upto += 1
            new = seqs[e][done[e]:upto]
            if new:
                mats, aliases, _ = gram_matrices(model, new)
                for key, G in mats.items():
                    running[e][key] = running[e][key] + G if key in running[e] else G
                running[e]["__aliases__"] = aliases
            done[e] = upto
            tokens[e] = sum(len(s) for s in seqs[e][:upto])
        grams = [{name: running[e][key] for name, key in running[e]["__aliases__"].items()} for e in edges]
        out[b] = {"tokens": tokens, **figures(adapters, grams)}
        print(f"  budget {b}: tokens {tokens}", flush=True)
    return out


def rel_errors(got: list, ref: list) -> list[float]:
    return [abs(g - r) / abs(r) for g, r in zip(got, ref) if g is not None and r not in (None, 0)]


def order(xs: list) -> list[int]:
    return sorted(range(len(xs)), key=lambda i: xs[i])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--edges", nargs="+", default=["physics", "history", "economics", "health"])
    ap.add_argument("--budgets", nargs="+", type=int, default=[128, 256, 512, 1024])
    ap.add_argument("--reference", type=int, default=2048)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = json.loads((a.run_dir / "config.json").read_text())
    d = cfg["data"]
    split = SplitSpec(seed=d["split_seed"], public_per_subject=d["public_per_subject"], edge_fraction=d["edge_fraction"])
    ds = load_mmlu(None if d["source"] == "embedded" else d["source"])
    model, tok = load_model(cfg["model"])
    model.eval()
    adapters = [load_adapter(recovered(a.run_dir, e)) for e in a.edges]
    prompts = {kind: {e: interleaved_prompts(select(ds, kind, cfg["edges"][e], None, None, split.seed, split))
                      for e in a.edges} for kind in ("edge", "public")}
    print("edge split (reference at the largest budget):", flush=True)
    own = snapshots(model, tok, prompts["edge"], a.budgets + [a.reference], adapters)
    print("public split:", flush=True)
    public = snapshots(model, tok, prompts["public"], a.budgets, adapters)
    ref = own[a.reference]
    rows = ["| prompts | budget (tokens) | tokens per domain | ratio: median rel. error | ratio: worst | "
            "deviation: median rel. error | deviation: worst | deviation order as reference |",
            "|---|---:|---|---:|---:|---:|---:|---|"]
    for kind, snaps in (("edge (own)", own), ("public", public)):
        for b, f in sorted(snaps.items()):
            if snaps is own and b == a.reference:
                continue
            r, dv = rel_errors(f["ratio"], ref["ratio"]), rel_errors(f["deviation"], ref["deviation"])
            same = "yes" if order(f["deviation"]) == order(ref["deviation"]) else "no"
            rows.append(f"| {kind} | {b} | {', '.join(str(t) for t in f['tokens'].values())} | "
                        f"{statistics.median(r):.3f} | {max(r):.3f} | {statistics.median(dv):.3f} | {max(dv):.3f} | "
                        f"{same} |")
    head = (f"Edges {', '.join(a.edges)} of {a.run_dir.name} ({cfg['model']}); reference: each edge's own training "
            f"prompts, {', '.join(str(t) for t in ref['tokens'].values())} tokens; {PER_PROMPT} tokens per prompt. "
            f"Reference deviation (task arithmetic): {', '.join(f'{x:.2f}' for x in ref['deviation'])}.")
    text = head + "\n\n" + "\n".join(rows) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
