"""Fusion against the number of edges K: the conflict study's arms side by side (issue 22, item 4a).

Run: .venv/bin/python bench/conflict_vs_k.py RUN_DIR [RUN_DIR ...] --out DIR

Reads each run directory's results.json only (one arm per K = its number of edges; each arm is paired against
its own base model on its own items) and writes DIR/k_table.md and DIR/k_figure.png: per fused model, the paired
Δ against the base on MMLU accuracy, on the gold answer's log-likelihood and margin, and on MMLU-CD (per answer
and strict), and the fused deviation on activations (median over the edges' domains), against K.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from edgefuse.evaluate.gold import GOLD, MARGIN, gold_diff
from edgefuse.evaluate.stats import fmt_raw, paired_diff_ci
from edgefuse.io import atomic_write_png, atomic_write_text
from edgefuse.report.document import read_results
from edgefuse.report.tables import cd_diff, cd_ks, interference_models, mmlu_diff

METRICS = {  # key → (label, unit scale, table digits)
    "mmlu": ("Δ MMLU accuracy (points)", 100.0, 1),
    "gold": ("Δ gold log-likelihood per char (nats)", 1.0, 3),
    "margin": ("Δ gold margin (nats)", 1.0, 3),
    "cd_answer": ("Δ MMLU-CD k=2 per answer (points)", 100.0, 1),
    "cd_strict": ("Δ MMLU-CD k=2 strict (points)", 100.0, 1),
}


def arm(doc: dict) -> dict:
    """One arm: K, item counts, and per fused model its paired Δs against the base and its median deviation."""
    base, k_cd = doc["base"], (cd_ks(doc) or [None])[0]
    dev = {m["name"]: statistics.median(d["deviation"] for d in m["domains"] if d["deviation"] is not None)
           for m in interference_models(doc)}
    models = {}
    for f in doc["seeds"][0]["fused"]:
        ev = f["eval"]
        row = {"mmlu": mmlu_diff(ev, base), "gold": gold_diff(ev, base, GOLD), "margin": gold_diff(ev, base, MARGIN),
               "deviation": dev.get(f["name"])}
        if k_cd is not None:
            row["cd_strict"] = cd_diff(ev, base, k_cd)
            key = f"mmlu_cd_k{k_cd}"
            if "answer_outcomes" in ev.get(key, {}):
                row["cd_answer"] = paired_diff_ci([c for r in ev[key]["answer_outcomes"] for c in r],
                                                  [c for r in base[key]["answer_outcomes"] for c in r])
        models[f["name"]] = row
    return {"K": len(doc["config"]["edges"]), "name": doc["name"], "mmlu_n": doc["mmlu_n"], "cd_n": doc["cd_n"],
            "models": models}


def table(arms: list[dict]) -> str:
    names = list(dict.fromkeys(n for a in arms for n in a["models"]))
    lines = ["| model | K | " + " | ".join(label for label, _, _ in METRICS.values()) + " | deviation (median) |",
             "|---|---:|" + "---:|" * (len(METRICS) + 1)]
    for n in names:
        for a in arms:
            r = a["models"].get(n)
            if r is None:
                continue
            cells = []
            for key, (_, scale, digits) in METRICS.items():
                d = r.get(key)
                cells.append("–" if not d else fmt_raw({**d, "diff": d["diff"] * scale, "lo": d["lo"] * scale,
                                                        "hi": d["hi"] * scale}, digits))
            dev = r["deviation"]
            lines.append(f"| {n} | {a['K']} | " + " | ".join(cells) + f" | {'–' if dev is None else f'{dev:.3f}'} |")
    return "\n".join(lines)


def figure(arms: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - NullFormatter below

    names = list(dict.fromkeys(n for a in arms for n in a["models"]))
    keys = ["mmlu", "cd_answer", "gold", "deviation"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key in zip(axes, keys):
        for j, n in enumerate(names):
            pts = [(a["K"], a["models"][n]) for a in arms if n in a["models"]]
            ks = [k + 0.08 * (j - len(names) / 2) for k, _ in pts]  # side by side at each K
            style = "--" if "+" in n else "-"
            if key == "deviation":
                ax.plot(ks, [r["deviation"] for _, r in pts], style, marker="o", label=n)
                continue
            _, scale, _ = METRICS[key]
            ys = [r[key]["diff"] * scale if r.get(key) else float("nan") for _, r in pts]
            lo = [(r[key]["diff"] - r[key]["lo"]) * scale if r.get(key) else 0 for _, r in pts]
            hi = [(r[key]["hi"] - r[key]["diff"]) * scale if r.get(key) else 0 for _, r in pts]
            ax.errorbar(ks, ys, yerr=[lo, hi], fmt=style, marker="o", capsize=3, label=n)
        if key != "deviation":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks([a["K"] for a in arms], [str(a["K"]) for a in arms])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("K (edges fused)")
        ax.set_title(METRICS[key][0] if key in METRICS else "fused deviation on activations (median over domains)",
                     fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Fusion against the number of edges: paired Δ vs the base of each arm (95% CI)", fontsize=10)
    fig.tight_layout()
    atomic_write_png(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    arms = sorted((arm(read_results(r)) for r in args.runs), key=lambda a: a["K"])
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = "; ".join(f"K = {a['K']} ({a['name']}): {a['mmlu_n']} MMLU items, "
                      + ", ".join(f"{n} MMLU-CD k={k} instances" for k, n in a["cd_n"].items()) for a in arms)
    text = ("Paired Δ against each arm's own base model, 95% bootstrap intervals (`*`: excludes 0). " + sizes
            + ".\n\n" + table(arms) + "\n")
    atomic_write_text(args.out / "k_table.md", text)
    figure(arms, args.out / "k_figure.png")
    print(text)


if __name__ == "__main__":
    main()
