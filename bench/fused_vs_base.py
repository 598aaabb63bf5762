"""Do fused edge adapters beat the base model? Paired comparison on 1,000 MMLU test items, and whether the
gain is knowledge or only a changed letter prior.

Run: .venv/bin/python bench/fused_vs_base.py WORK_DIR [--n 1000]

WORK_DIR is the ``work`` directory of the README's Python API example (``api-demo``): it holds
``stem/recovered``, ``humanities/recovered`` and ``fused`` (TIES + LoRA-CR element). The script adds a
task-arithmetic fusion of the same two adapters, then scores the base model, both fused models and each
edge adapter alone on the same seeded stratified sample of the test split (no item of the edges' training
split), and prints accuracy, the paired difference to the base (bootstrap over items), per-category
accuracy, and the distribution of predicted letters against the gold letters.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from edgefuse.data.mmlu import load_mmlu, select
from edgefuse.evaluate.mmlu import evaluate_mmlu
from edgefuse.evaluate.stats import paired_diff_ci
from edgefuse.fusion import fuse_dirs
from edgefuse.models import load_model
from edgefuse.peft_utils import apply_adapter


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    work = args.work
    recovered = [work / d / "recovered" for d in ("stem", "humanities")]
    if not (work / "fused-ta").exists():
        fuse_dirs(recovered, work / "fused-ta", method="task_arithmetic")
    model, tok = load_model("smollm2-135m")
    test = select(load_mmlu(), "test", limit=args.n)
    gold = Counter("ABCD"[it.answer] for it in test)
    print(f"{len(test)} items; gold letters {dict(sorted(gold.items()))}; best constant letter "
          f"{pct(max(gold.values()) / len(test))}%")
    base = evaluate_mmlu(model, tok, test)
    b = [int(i["correct"]) for i in base["items"]]
    print("| model | accuracy % [95% CI] | paired Δ vs base [95% CI] | STEM / humanities / social / other | "
          "predicted letters A/B/C/D |")
    print("|---|---:|---:|---:|---:|")

    def row(name: str, res: dict, diff: str) -> None:
        acc, cats = res["accuracy"]["overall"], res["accuracy"]["categories"]
        letters = Counter(i["pred"] for i in res["items"])
        print(f"| {name} | {pct(acc['acc'])} [{pct(acc['lo'])}, {pct(acc['hi'])}] | {diff} | "
              + " / ".join(pct(cats[c]["acc"]) for c in ("stem", "humanities", "social_sciences", "other"))
              + " | " + "/".join(str(letters.get(x, 0)) for x in "ABCD") + " |", flush=True)

    row("base", base, "–")
    for name, d in [("ties + LoRA-CR element", work / "fused"), ("task_arithmetic", work / "fused-ta"),
                    ("stem edge alone", recovered[0]), ("humanities edge alone", recovered[1])]:
        pm = apply_adapter(model, d)
        res = evaluate_mmlu(pm, tok, test)
        model = pm.unload()
        dd = paired_diff_ci([int(i["correct"]) for i in res["items"]], b, seed=0)
        row(name, res, f"{dd['diff'] * 100:+.1f} [{dd['lo'] * 100:+.1f}, {dd['hi'] * 100:+.1f}]")


if __name__ == "__main__":
    main()
