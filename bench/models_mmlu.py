"""Two models on the same MMLU items, letters and cloze: accuracy, paired Δ, cost per item, letter bias (issue 24).

Run (alone; each evaluation is the CLI's, so the same items by seed and limit):
    for m in smollm2-135m qwen2.5-coder-0.5b; do for f in letters cloze; do
      .venv/bin/edgefuse eval mmlu --model $m --limit 1000 --seed 0 --format $f --out OUT/$m-$f.json; done; done
    .venv/bin/python bench/models_mmlu.py OUT --models smollm2-135m qwen2.5-coder-0.5b

Prints a Markdown table: per model and format the accuracy (acc in letters form, acc_norm in cloze form, bootstrap
95% interval), the paired Δ against the first model on the same items, the scoring seconds per item (the CLI's
own timing, model load excluded) and its ratio to the first model's, and in letters form how often each letter is
predicted against how often it is right (a letter prior shows as one letter predicted far more often than it is
the answer), and the accuracy once each letter's mean score is removed (`prior_corrected`).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from edgefuse.evaluate.stats import bootstrap_ci, fmt_ci, paired_diff_ci

HEADLINE = {"letters": "correct", "cloze": "correct_norm"}


def load(out: Path, model: str, fmt: str) -> dict:
    path = out / f"{model}-{fmt}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run the evaluations in this script's docstring first)")
    return json.loads(path.read_text())


def prior_corrected(items: list[dict]) -> list[int]:
    """Correct (0/1) per item once each letter's mean log-likelihood is subtracted — the model's letter prior, in the
    spirit of contextual calibration (Zhao et al., "Calibrate Before Use", ICML 2021, arXiv 2102.09690). The means
    come from the other half of the items (even/odd positions), so no item calibrates itself. A diagnostic: if
    accuracy rises well above chance, the letter prior hides knowledge the model has."""
    halves = [items[0::2], items[1::2]]
    means = [[sum(it["scores"][j] for it in h) / len(h) for j in range(4)] for h in halves]
    out = []
    for k, half in enumerate(halves):
        mu = means[1 - k]
        for it in half:
            adj = [x - m for x, m in zip(it["scores"], mu)]
            out.append(int("ABCD"[adj.index(max(adj))] == it["answer"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    a = ap.parse_args()
    rows = ["| model | format | n | accuracy % | Δ vs " + a.models[0] + " (pp) | s per item | × " + a.models[0]
            + " | tokens/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    bias = []
    for fmt in ("letters", "cloze"):
        ref = load(a.out, a.models[0], fmt)
        ref_by = {it["id"]: it for it in ref["items"]}
        for m in a.models:
            d = load(a.out, m, fmt)
            by = {it["id"]: it for it in d["items"]}
            if set(by) != set(ref_by):
                raise SystemExit(f"{m} {fmt}: not the same items as {a.models[0]}")
            ids = sorted(by)
            key = HEADLINE[fmt] if HEADLINE[fmt] in d["items"][0] else "correct"
            x = [int(by[i][key]) for i in ids]
            acc = bootstrap_ci(x)
            diff = "–" if m == a.models[0] else fmt_ci(paired_diff_ci(x, [int(ref_by[i][key]) for i in ids]))
            per = d["wall_s"] / d["n"]
            rows.append(f"| {m} | {fmt} ({'acc' if key == 'correct' else 'acc_norm'}) | {d['n']} | {fmt_ci(acc)} | "
                        f"{diff} | {per:.3f} | {per / (ref['wall_s'] / ref['n']):.2f} | {d['tokens_per_s']:.0f} |")
            if fmt == "letters":
                pred = collections.Counter(it["pred"] for it in d["items"])
                gold = collections.Counter(it["answer"] for it in d["items"])
                fixed = prior_corrected([by[i] for i in ids])
                bias.append(f"{m}: predicted " + ", ".join(f"{k} {pred[k]}" for k in "ABCD")
                            + "; answers " + ", ".join(f"{k} {gold[k]}" for k in "ABCD")
                            + f"; with each letter's mean score removed (2-fold): {fmt_ci(bootstrap_ci(fixed))}")
    print("\n".join(rows))
    print()
    print("Letters predicted against letters right (letters form):")
    for line in bias:
        print("- " + line)


if __name__ == "__main__":
    main()
