"""The report's continuous scores (issue 22, item 5): the gold answer's log-likelihood and margin against the base
model and against the same method without LoRA-CR, each domain's retention of its edge's gain under fusion, and
whether interference measured on activations predicts what a fusion loses per domain.

Why beside accuracy: accuracy moves only when an item's argmax flips; the gold score (`edgefuse.evaluate.gold`)
moves on every item, so its paired intervals resolve effects that accuracy leaves inside ±2–3 points.
"""

from __future__ import annotations

import numpy as np

from edgefuse.evaluate.gold import GOLD, MARGIN, gold_diff, gold_of
from edgefuse.evaluate.stats import bootstrap_ci, fmt_raw, paired_diff_ci, ratio_ci
from edgefuse.report.tables import domain_item_ids, interference_models

def gold_table(doc: dict, rows: list[dict]) -> str:
    """Per model (``rows`` of the headline): mean gold score and margin with their intervals, and the paired Δ of
    each against the base model; empty when no evaluation kept gold scores."""
    base = doc["base"]
    if not gold_of(base):
        return ""
    lines = ["| model | gold log-lik. [95% CI] | Δ vs base (paired) | margin [95% CI] | Δ vs base (paired) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        g = gold_of(r["ev"])
        if not g:
            continue
        ids = sorted(g)
        is_base = r["model"] == "base"
        lines.append(f"| {r['model']} | {fmt_raw(bootstrap_ci([g[i][GOLD] for i in ids]))} | "
                     f"{'–' if is_base else fmt_raw(gold_diff(r['ev'], base, GOLD))} | "
                     f"{fmt_raw(bootstrap_ci([g[i][MARGIN] for i in ids]))} | "
                     f"{'–' if is_base else fmt_raw(gold_diff(r['ev'], base, MARGIN))} |")
    return "\n".join(lines)


def gold_note(doc: dict) -> str:
    fmt = doc["config"]["benchmarks"].get("format", "letters")
    per = "per character of the answer text (the quantity acc_norm compares)" if fmt == "cloze" else \
        "of the answer letter"
    return (f"Gold log-lik.: the mean log-likelihood of the correct answer, {per}, in nats; margin: gold minus the best "
            "wrong choice's, positive exactly when the item is answered right. Both move on every item, so their "
            "paired intervals resolve effects that accuracy cannot.")


def _correct_diffs(ev: dict, ref: dict, ids: list[str]) -> list[float]:
    a, b = ev["mmlu"]["correct"], ref["mmlu"]["correct"]
    return [a[i] - b[i] for i in ids]


def retention(doc: dict) -> list[dict]:
    """Per fused model and edge domain: the fused model's gain over the base on the domain's items as a share of
    the edge's own gain there (edge adapter alone), on the gold score and on accuracy, each with a bootstrap
    interval over the domain's items. Empty without edge-alone evaluations with gold scores."""
    seed = doc["seeds"][0] if doc["seeds"] else None
    edges = {e["edge"]: e["eval"] for e in (seed or {}).get("edges", []) if gold_of(e.get("eval"))}
    base = doc["base"]
    if not edges or not gold_of(base):
        return []
    ids = domain_item_ids(doc, doc["config"]["edges"])
    gb = gold_of(base)
    own = {}  # per edge with items: its items, its gold gain per item, its interval (the same for every fused model)
    for edge, edge_ev in edges.items():
        di = ids.get(edge) or []
        if di:
            ge = gold_of(edge_ev)
            own[edge] = (di, [ge[i][GOLD] - gb[i][GOLD] for i in di],
                         paired_diff_ci([ge[i][GOLD] for i in di], [gb[i][GOLD] for i in di]))
    # pooled over the items of every domain whose edge gains significantly alone: one figure per fused model
    resolved = [e for e, (_, _, gain) in own.items() if gain["lo"] > 0]
    out = []
    for f in seed["fused"]:
        g = gold_of(f["eval"])
        if not g:
            continue
        cells, num, den = {}, [], []
        for edge, (di, own_gain, gain) in own.items():
            fused_gain = [g[i][GOLD] - gb[i][GOLD] for i in di]
            cells[edge] = {
                "gold": ratio_ci(fused_gain, own_gain),
                "acc": ratio_ci(_correct_diffs(f["eval"], base, di), _correct_diffs(edges[edge], base, di)),
                "edge_gain": gain}
            if edge in resolved:
                num, den = num + fused_gain, den + own_gain
        out.append({"name": f["name"], "cells": cells, "resolved": resolved,
                    "pooled": ratio_ci(num, den) if resolved else None})
    return out


def _pct_ratio(r: dict) -> str:
    def one(x: float) -> str:
        return "−∞" if x == -np.inf else "∞" if x == np.inf else "nan" if np.isnan(x) else f"{100 * x:.0f}"
    return f"{one(r['ratio'])} [{one(r['lo'])}, {one(r['hi'])}]"


def retention_table(doc: dict) -> str:
    rows = retention(doc)
    if not rows:
        return ""
    edges = list(rows[0]["cells"])
    gain = {e: rows[0]["cells"][e]["edge_gain"] for e in edges}
    resolved = rows[0]["resolved"]
    lines = [f"| fused model | pooled gold ({len(resolved)} domains) | "
             + " | ".join(f"{e}: gold | {e}: acc" for e in edges) + " |",
             "|---|---:|" + "---:|---:|" * len(edges),
             f"| *edge alone: Δ gold vs base* | {', '.join(resolved) or 'no edge gains significantly'} | "
             + " | ".join(f"{fmt_raw(gain[e])} | " for e in edges).rstrip(" |") + " |"]
    for r in rows:
        pooled = _pct_ratio(r["pooled"]) if r["pooled"] else "–"
        lines.append(f"| {r['name']} | {pooled} | " + " | ".join(
            f"{_pct_ratio(r['cells'][e]['gold'])} | {_pct_ratio(r['cells'][e]['acc'])}" for e in edges) + " |")
    return "\n".join(lines)


RETENTION_NOTE = ("Retention, %: the fused model's gain over the base on an edge's domain (its subjects' test items) as "
                  "a share of that edge's own adapter's gain there, on the gold log-likelihood and on accuracy; 100 "
                  "keeps the edge's whole gain, 0 loses it, below 0 ends below the base. Intervals resample the "
                  "domain's items; an edge whose own gain is not resolved (first row) gives an unbounded interval. "
                  "*Pooled gold*: Σ of the fused model's gold gains over Σ of the edges' own, over the items of the "
                  "domains whose edge alone raises gold significantly (named in the first row), resampling items.")


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r
    rx, ry = ranks(np.asarray(x, dtype=np.float64)), ranks(np.asarray(y, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):  # a constant sample has no correlation: nan
        return float(np.corrcoef(rx, ry)[0, 1])


def prediction(doc: dict) -> dict | None:
    """Does the fused deviation measured on activations predict what fusion loses, per domain? One point per (fused
    model, edge domain): the deviation ‖(ΔW_f − ΔW_i)H_i‖/‖ΔW_i H_i‖ against the paired Δ of the gold score on
    the domain's items, fused against the base and (with edge-alone evaluations) fused against the edge alone.
    Spearman's ρ with a bootstrap interval over the points; None without interference records and gold scores."""
    seed = doc["seeds"][0] if doc["seeds"] else None
    models = interference_models(doc)
    if not models or not seed or not gold_of(doc["base"]):
        return None
    fused = {f["name"]: f["eval"] for f in seed["fused"]}
    edges = {e["edge"]: e["eval"] for e in seed["edges"] if gold_of(e.get("eval"))}
    ids = domain_item_ids(doc, doc["config"]["edges"])
    points = []
    for m in models:
        ev = fused.get(m["name"])
        for d in m["domains"]:
            di = ids.get(d["domain"]) or []
            if not gold_of(ev) or not di or d["deviation"] is None:
                continue
            vs_base = gold_diff(ev, doc["base"], GOLD, di)
            vs_edge = gold_diff(ev, edges[d["domain"]], GOLD, di) if d["domain"] in edges else None
            points.append({"model": m["name"], "domain": d["domain"], "deviation": d["deviation"],
                           "vs_base": vs_base["diff"], "vs_edge": vs_edge["diff"] if vs_edge else None})
    if len(points) < 3:
        return None
    out = {"points": points}
    for key in ("vs_base", "vs_edge"):
        pts = [p for p in points if p[key] is not None]
        if len(pts) < 3:
            continue
        x, y = [p["deviation"] for p in pts], [p[key] for p in pts]
        rng = np.random.default_rng(0)
        boot = [spearman([x[i] for i in s], [y[i] for i in s]) for s in rng.integers(0, len(pts), (1000, len(pts)))]
        boot = [b for b in boot if not np.isnan(b)]
        out[key] = {"rho": spearman(x, y), "lo": float(np.quantile(boot, 0.025)),
                    "hi": float(np.quantile(boot, 0.975)), "n": len(pts)}
    return out


def prediction_line(doc: dict) -> str:
    p = prediction(doc)
    if not p:
        return ""
    parts = [f"{'against the base' if k == 'vs_base' else 'against the edge alone'}: ρ = {p[k]['rho']:+.2f} "
             f"[{p[k]['lo']:+.2f}, {p[k]['hi']:+.2f}] over {p[k]['n']} (model, domain) points"
             for k in ("vs_base", "vs_edge") if k in p]
    return ("Does the fused deviation on activations predict the gold log-likelihood a fusion loses on that domain? "
            "Spearman's ρ between the deviation and the paired Δ gold log-likelihood on the domain's items (a "
            "negative ρ: larger deviation, larger loss), 95% bootstrap interval over the points — "
            + "; ".join(parts) + ".")
