"""The report's tables (markdown) and ``results.csv``, each a pure function of the results document.

Every accuracy carries its 95% bootstrap interval; every change against the base model is a *paired*
bootstrap interval over the same items, so "inside the interval" has a precise meaning.
"""

from __future__ import annotations

import csv
import io
import statistics
from typing import Any

from edgefuse.data.taxonomy import domain_subjects, is_domain
from edgefuse.evaluate.gold import GOLD, MARGIN, gold_diff, gold_of
from edgefuse.evaluate.stats import bootstrap_ci, fmt_ci, fmt_raw, paired_diff_ci


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _diff(d: dict | None) -> str:
    if not d:
        return "–"
    sig = "" if d["lo"] <= 0 <= d["hi"] else " *"
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]{sig}"


def mmlu_diff(ev: dict, base: dict) -> dict | None:
    if "mmlu" not in ev or "mmlu" not in base:
        return None
    ids = sorted(base["mmlu"]["correct"])
    return paired_diff_ci([ev["mmlu"]["correct"][i] for i in ids], [base["mmlu"]["correct"][i] for i in ids])


def cd_diff(ev: dict, base: dict, k: int) -> dict | None:
    key = f"mmlu_cd_k{k}"
    if key not in ev or key not in base:
        return None
    return paired_diff_ci(ev[key]["strict_outcomes"], base[key]["strict_outcomes"])


def domain_acc(outcomes: dict[str, int], subjects: set[str]) -> dict | None:
    """Accuracy over the items of some subjects (an item id starts with its subject, or its file domain)."""
    xs = [c for i, c in outcomes.items() if i.split("/", 1)[0] in subjects]
    return bootstrap_ci(xs) if xs else None


def cd_ks(doc: dict) -> list[int]:
    return sorted(int(k) for k in doc.get("cd_n", {}))


def task_columns(doc: dict) -> dict[str, str]:
    """The configured tasks' results keys and column titles (`edgefuse.tasks.base.Task.report_columns`); their
    summaries carry ``headline`` and ``outcomes`` by item id (`edgefuse.tasks.base.headline_summary`)."""
    return doc.get("task_columns") or {}


def task_diff(ev: dict, base: dict, key: str) -> dict | None:
    """Paired difference against the base model over a task's items (by id)."""
    if key not in ev or key not in base:
        return None
    ids = sorted(base[key]["outcomes"])
    return paired_diff_ci([ev[key]["outcomes"][i] for i in ids], [base[key]["outcomes"][i] for i in ids])


def item_outcomes(ev: dict, doc: dict) -> dict[str, int]:
    """One evaluation's per-question outcomes by item id: MMLU's (the headline metric) and those of every configured
    task (each in its own metric). Ids start with the subject or the ``data.choices`` domain; a cross-domain task's
    outcomes are per instance (``cd-…``) and belong to no domain."""
    out: dict[str, int] = {}
    for key in task_columns(doc):
        out.update((ev.get(key) or {}).get("outcomes") or {})
    out.update((ev.get("mmlu") or {}).get("correct") or {})
    return out


def score_head(doc: dict) -> str:
    """The score columns' titles, each followed by its paired Δ: MMLU, each MMLU-CD k, each configured task."""
    titles = ["MMLU"] + [f"MMLU-CD k={k} strict" for k in cd_ks(doc)] + list(task_columns(doc).values())
    return "".join(f" {t} % [95% CI] | Δ vs base (paired) |" for t in titles)


def headline_rows(doc: dict) -> list[dict]:
    """One row per model: base, each fused method ± LoRA-CR, then each composition (LoraHub, retrieval mixtures)
    of the study's ``compose`` section (first seed; mean±std in its own table)."""
    base = doc["base"]
    rows = [{"model": "base", "ev": base}]
    if doc["seeds"]:
        rows += [{"model": f["name"], "ev": f["eval"], "fusion": f.get("fusion")} for f in doc["seeds"][0]["fused"]]
        rows += [{"model": c["name"], "ev": c["eval"]} for c in doc["seeds"][0].get("composed") or []]
    return rows


def composed_line(doc: dict) -> str:
    """What the composition rows of the headline are (empty when the study has none)."""
    composed = doc["seeds"][0].get("composed") if doc["seeds"] else None
    if not composed:
        return ""
    parts = []
    for c in composed:
        s = c["settings"]
        if c["kind"] == "lorahub":
            w = ", ".join(f"{e} {x:+.2f}" for e, x in zip(c["lorahub"]["edges"], c["lorahub"]["weights"]))
            parts.append(f"`{c['name']}`: LoraHub weights ({w}) learned on {c['lorahub']['examples']} public examples "
                         f"in {c['lorahub']['evaluations']} evaluations, fused by {s['method']}")
        else:
            how = "1/k" if s["weighting"] == "uniform" else f"softmax over similarity / {s['temperature']:g}"
            parts.append(f"`{c['name']}`: each request mixes its top-{s['k']} edge adapters' outputs ({how}); "
                         f"MMLU-CD routed per {s['routing']}")
    return "Compositions: " + "; ".join(parts) + "."


def retrieval_line(doc: dict) -> str:
    """The retrieval mixtures' router on its own: the share of MMLU test questions whose own-domain edge adapter
    ranks first (first seed), with its 95% bootstrap interval; empty without a retrieval mixture on MMLU."""
    acc = doc["seeds"][0].get("retrieval") if doc["seeds"] else None
    if not acc:
        return ""
    chance = len(doc["config"]["edges"])
    skipped = f"; {acc['skipped']} questions of domains no edge covers left out" if acc.get("skipped") else ""
    return (f"Retrieval accuracy (the question's own-domain edge adapter ranked first by MiniLM similarity): "
            f"{fmt_ci(acc)} % of {acc['n']} MMLU test questions (chance {100 / chance:.0f}%){skipped}.")


def headline_table(doc: dict) -> str:
    head = "| model |" + score_head(doc)
    sep = "|---|---:|---:|" + "---:|---:|" * (len(cd_ks(doc)) + len(task_columns(doc)))
    lines = [head, sep]
    for r in headline_rows(doc):
        lines.append("| " + " | ".join([r["model"]] + score_cells(r["ev"], doc, r["model"] == "base")) + " |")
    return "\n".join(lines)


def cd_answer_table(doc: dict) -> str:
    """MMLU-CD scored per answer (each of the k answers of an instance, conditioned on the model's own earlier
    answers): k times the outcomes of the strict score, so its paired intervals are narrower."""
    ks = [k for k in cd_ks(doc) if "answer_outcomes" in doc["base"].get(f"mmlu_cd_k{k}", {})]
    if not ks:
        return ""
    lines = ["| model |" + "".join(f" MMLU-CD k={k} answers % [95% CI] | Δ vs base (paired) |" for k in ks),
             "|---|" + "---:|---:|" * len(ks)]
    for r in headline_rows(doc):
        cells = [r["model"]]
        for k in ks:
            ev, b = r["ev"].get(f"mmlu_cd_k{k}"), doc["base"][f"mmlu_cd_k{k}"]
            if not ev or "answer_outcomes" not in ev:
                cells += ["–", "–"]
                continue
            flat = [c for row in ev["answer_outcomes"] for c in row]
            cells += [fmt_ci(bootstrap_ci(flat)), "–" if r["model"] == "base" else _diff(
                paired_diff_ci(flat, [c for row in b["answer_outcomes"] for c in row]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_cells(ev: dict, doc: dict, is_base: bool = False) -> list[str]:
    """MMLU and each MMLU-CD k: accuracy [CI] and the paired Δ against the base model."""
    base = doc["base"]
    cells = [fmt_ci(ev["mmlu"]["accuracy"]["overall"]) if "mmlu" in ev else "–",
             "–" if is_base else _diff(mmlu_diff(ev, base))]
    for k in cd_ks(doc):
        key = f"mmlu_cd_k{k}"
        cells += [fmt_ci(ev[key]["strict"]) if key in ev else "–", "–" if is_base else _diff(cd_diff(ev, base, k))]
    for key in task_columns(doc):
        cells += [fmt_ci(ev[key]["headline"]) if key in ev else "–", "–" if is_base else _diff(task_diff(ev, base, key))]
    return cells


def rounds_table(doc: dict) -> str:
    """Accuracy per round of every fused model (and each edge alone, when evaluated), first seed."""
    lines = ["| round | model |" + score_head(doc),
             "|---:|---|---:|---:|" + "---:|---:|" * (len(cd_ks(doc)) + len(task_columns(doc)))]
    for r in doc["seeds"][0].get("rounds", []):
        sent = r.get("sent_back")
        rows = [(f"edge {e['edge']} alone", e["eval"]) for e in r["edges"] if e.get("eval")]
        rows += [(f["name"] + (" (sent back)" if f["name"] == sent else ""), f["eval"]) for f in r["fused"]]
        for name, ev in rows:
            lines.append("| " + " | ".join([str(r["round"]), name] + score_cells(ev, doc)) + " |")
    return "\n".join(lines)


def subjects_of(domain: str) -> list[str]:
    """An edge domain's MMLU subjects; a ``data.choices`` file's domain is its own (its items' ids start with it)."""
    return domain_subjects(domain) if is_domain(domain) else [domain]


def ids_by_edge(item_ids, edges: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each edge's domain as the given items of its domains' subjects (sorted ids; an id starts with its subject)."""
    out = {}
    for edge, domains in edges.items():
        subjects = {x for d in domains for x in subjects_of(d)}
        out[edge] = sorted(i for i in item_ids if i.split("/", 1)[0] in subjects)
    return out


def domain_item_ids(doc: dict, edges: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each edge's domain as the base model's MMLU test items of its domains' subjects (sorted ids)."""
    return ids_by_edge(doc["base"].get("mmlu", {}).get("correct", {}), edges)


LOSS_TAIL_STEPS = 20  # the edges table's loss column: mean training loss of the last N steps


EDGES_NOTE = (
    "Edge tensor peak: the most tensor memory the edge's own training held: its weights, buffers and optimizer "
    "state, plus what its heaviest step (the most padded tokens) allocated, counted by the thread that trains "
    "the edge, so it is this edge's figure even when other edges or stages share the process; allocator "
    "overhead and memory outside torch are not in it. The estimate is the plan's a-priori formula "
    "(`--memory-budget`), fitted to whole-process peaks, so it sits above the tensor peak. Process memory "
    "rise: the process's resident memory (CUDA: the allocator's peak) while the edge trained, above its level "
    "when the edge started; everything in the process counts, and memory the allocator kept from earlier work "
    "is reused without showing, so it is not the edge's own figure; `bench/edge_memory.py` measures one process "
    "per pruning ratio. Loss: the mean training loss of the last "
    f"{LOSS_TAIL_STEPS} steps (of all steps when fewer); one step's loss is one batch's and swings widely.")


def tail_loss(curve: list, n: int = LOSS_TAIL_STEPS) -> float:
    """Mean training loss of the curve's last ``n`` steps (all, when fewer). Why not the last step: each
    step's loss is one batch's, and on the CPU study it swings between 0.3 and 7 from step to step."""
    tail = curve[-n:]
    return sum(_loss_value(p) for p in tail) / len(tail)


def _loss_value(point) -> float:
    """One curve point: a number, a ``{"step", "loss"}`` dict or a ``[step, ..., loss]`` list (older files)."""
    return float(point["loss"] if isinstance(point, dict) else point[-1] if isinstance(point, (list, tuple)) else point)


def _mib(x) -> str:
    return f"{x / 2**20:.0f}" if isinstance(x, (int, float)) else "–"


def edges_table(doc: dict) -> str:
    """One row per edge. Memory: the edge's own tensor peak (``tensor_peak_bytes``; "–" in results older than
    it) with the plan's estimate, and apart from it the process's rise (``peak_memory_bytes``), which counts
    whatever shares the process and is therefore not the edge's figure (see the note under the table)."""
    base = item_outcomes(doc["base"], doc)
    lines = ["| edge | domains | seed | pruning (ratio) | params (pruned / base) | edge tensor peak MiB (estimate) | "
             f"process memory rise MiB | tokens/s | train s | loss, mean of last {LOSS_TAIL_STEPS} steps | "
             "own domain % [CI] n (base) | all MMLU % [CI] | Δ all vs base |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in doc["seeds"]:
        for e in s["edges"]:
            tr, pr = e.get("train") or {}, e.get("prune") or {}
            subjects = {x for d in e["domains"] for x in subjects_of(d)}
            ev = e.get("eval") or {}
            own, own_base = domain_acc(item_outcomes(ev, doc), subjects), domain_acc(base, subjects)
            loss = tr.get("loss_curve", [])
            lines.append("| " + " | ".join([
                e["edge"], ", ".join(e["domains"]), str(e["seed"]), _pruning_cell(pr),
                f"{pr.get('params', 0) / 1e6:.1f}M / {pr.get('base_params', 0) / 1e6:.1f}M",
                _mib(tr.get("tensor_peak_bytes"))
                + (f" (est. {_mib(tr['memory_estimate_bytes'])})" if tr.get("memory_estimate_bytes") else ""),
                _mib(tr.get("peak_memory_bytes")),  # None where no meter could measure it
                f"{tr.get('tokens_per_s', 0):.0f}" if tr.get("tokens_per_s") else "–",
                f"{tr.get('wall_s', 0):.0f}",
                f"{tail_loss(loss):.3f}" if loss else "–",
                (fmt_ci(own) + f" n={own['n']} (base {_pct(own_base['acc'])})") if own and own_base else "–",
                fmt_ci(ev["mmlu"]["accuracy"]["overall"]) if "mmlu" in ev else "–",
                _diff(mmlu_diff(ev, doc["base"])) if ev else "–",
            ]) + " |")
    return "\n".join(lines)


def transfer_matrix(doc: dict) -> dict | None:
    """Each edge adapter alone (rows) on each edge's domain (columns): paired Δ against the base model on the
    same test items. The diagonal is the own-domain gain, the rest cross-domain interference — what a fusion
    result is made of. A ``data.choices`` domain's items are those its tasks scored (`item_outcomes`). First seed,
    last round; None when edges were not evaluated alone."""
    edges = [e for e in doc["seeds"][0]["edges"] if "mmlu" in (e.get("eval") or {})] if doc["seeds"] else []
    base = item_outcomes(doc["base"], doc)
    if not edges or not base:
        return None
    ids = ids_by_edge(base, {e["edge"]: e["domains"] for e in edges})
    columns = list(ids)
    outcomes = {e["edge"]: item_outcomes(e["eval"], doc) for e in edges}
    cells = {e["edge"]: {c: paired_diff_ci([outcomes[e["edge"]][i] for i in ids[c]],
                                           [base[i] for i in ids[c]]) if ids[c] else None for c in columns}
             for e in edges}
    base_acc = {c: bootstrap_ci([base[i] for i in ids[c]]) if ids[c] else None for c in columns}
    return {"columns": columns, "n": {c: len(ids[c]) for c in columns}, "base": base_acc, "cells": cells}


def transfer_table(doc: dict) -> str:
    tm = transfer_matrix(doc)
    if tm is None:
        return ""
    cols = tm["columns"]
    lines = ["| edge alone \\ domain | " + " | ".join(f"{c} (n={tm['n'][c]})" for c in cols) + " |",
             "|---|" + "---:|" * len(cols),
             "| base accuracy | " + " | ".join(fmt_ci(tm["base"][c]) if tm["base"][c] else "–" for c in cols) + " |"]
    for edge, row in tm["cells"].items():
        lines.append(f"| {edge} | " + " | ".join(
            ("**" + _diff(row[c]) + "**" if c == edge else _diff(row[c])) for c in cols) + " |")
    return "\n".join(lines)


def cr_sweep_rows(doc: dict) -> list[dict]:
    """Every fused model of the first seed with its share of changed parameters and its paired Δ against the
    same method without LoRA-CR, on MMLU and on each MMLU-CD k (per answer and strict)."""
    fused = doc["seeds"][0]["fused"] if doc["seeds"] else []
    plain = {f["method"]: f for f in fused if f["cr"] == "off"}
    rows = []
    for f in fused:
        ref = plain.get(f["method"])
        if f["cr"] == "off" or ref is None:
            continue
        cr = (f.get("fusion") or {}).get("cr") or {}
        row = {"name": f["name"], "method": f["method"], "cr": f["cr"], "share_changed": cr.get("share_changed"),
               "modules_flagged": cr.get("modules_flagged"), "modules_total": cr.get("modules_total"),
               "mmlu": mmlu_diff(f["eval"], ref["eval"]),
               "gold": gold_diff(f["eval"], ref["eval"], GOLD), "margin": gold_diff(f["eval"], ref["eval"], MARGIN)}
        for k in cd_ks(doc):
            key = f"mmlu_cd_k{k}"
            ev, rv = f["eval"].get(key), ref["eval"].get(key)
            if ev and rv:
                row[f"cd_k{k}"] = paired_diff_ci(ev["strict_outcomes"], rv["strict_outcomes"])
                if "answer_outcomes" in ev and "answer_outcomes" in rv:
                    row[f"cd_k{k}_answer"] = paired_diff_ci([c for r in ev["answer_outcomes"] for c in r],
                                                            [c for r in rv["answer_outcomes"] for c in r])
        rows.append(row)
    return rows


def cr_sweep_table(doc: dict) -> str:
    rows = cr_sweep_rows(doc)
    if not rows:
        return ""
    ks = cd_ks(doc)
    gold = any(r["gold"] for r in rows)
    lines = ["| model | modules edited | params changed % | Δ MMLU vs no CR |"
             + (" Δ gold log-lik. vs no CR | Δ margin vs no CR |" if gold else "") + "".join(
        f" Δ MMLU-CD k={k} per answer | Δ MMLU-CD k={k} strict |" for k in ks),
        "|---|---:|---:|---:|" + ("---:|---:|" if gold else "") + "---:|---:|" * len(ks)]
    for r in rows:
        cells = [r["name"], f"{r['modules_flagged']}/{r['modules_total']}" if r["modules_total"] else "–",
                 f"{100 * r['share_changed']:.2f}" if r["share_changed"] is not None else "–", _diff(r["mmlu"])]
        if gold:
            cells += [fmt_raw(r["gold"]), fmt_raw(r["margin"])]
        for k in ks:
            cells += [_diff(r.get(f"cd_k{k}_answer")), _diff(r.get(f"cd_k{k}"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pruning_cell(pr: dict) -> str:
    """``taylor width 0.25``, with the device's budget when the ratio came from one (edges may differ)."""
    what = " ".join(str(pr[k]) for k in ("method", "structure") if pr.get(k))
    cell = f"{what} {pr.get('ratio', 0) or 0:.2f}".strip()
    return cell + (f" (budget {pr['memory_budget_gib']:g} GiB)" if pr.get("memory_budget_gib") else "")


def seeds_table(doc: dict) -> str:
    """Mean ± std across seeds for every fused model (only meaningful with ≥ 2 seeds)."""
    ks = cd_ks(doc)
    names = [f["name"] for f in doc["seeds"][0]["fused"]]
    lines = ["| model | MMLU mean ± std |" + "".join(f" MMLU-CD k={k} mean ± std |" for k in ks),
             "|---|---:|" + "---:|" * len(ks)]
    for name in names:
        evs = [f["eval"] for s in doc["seeds"] for f in s["fused"] if f["name"] == name]
        cells = [name]
        for key in ["mmlu"] + [f"mmlu_cd_k{k}" for k in ks]:
            vals = [(ev[key]["accuracy"]["overall"]["acc"] if key == "mmlu" else ev[key]["strict"]["acc"])
                    for ev in evs if key in ev]
            cells.append(f"{100 * statistics.mean(vals):.1f} ± {100 * (statistics.stdev(vals) if len(vals) > 1 else 0):.1f}"
                         if vals else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conflict_table(doc: dict) -> str:
    """Conflict between the edge adapters (same for every method) and what LoRA-CR changed."""
    lines = ["| fused model | seed | mean / max module conflict score | modules flagged by LoRA-CR | "
             "share of parameters changed |", "|---|---:|---:|---:|---:|"]
    for s in doc["seeds"]:
        for f in s["fused"]:
            st = f.get("fusion") or {}
            summ = (st.get("conflicts") or {}).get("summary") or {}
            cr = st.get("cr") or {}
            flagged = f"{cr['modules_flagged']} / {cr['modules_total']}" if "modules_flagged" in cr else "– (off)"
            lines.append(f"| {f['name']} | {s['seed']} | {_num(summ.get('mean_score'))} / {_num(summ.get('max_score'))} | "
                         f"{flagged} | {_num(cr.get('share_changed'), pct=True) if cr else '0 (off)'} |")
    return "\n".join(lines)


def _num(x: Any, pct: bool = False) -> str:
    if x is None:
        return "–"
    if isinstance(x, (int,)) and not pct:
        return str(x)
    try:
        return f"{100 * float(x):.2f}%" if pct else f"{float(x):.4g}"
    except (TypeError, ValueError):
        return str(x)


def stages_table(doc: dict) -> str:
    """Each stage's wall time, with the estimate made before the run started (`edgefuse.runner.estimate`)."""
    est = (doc.get("estimate") or {}).get("stages", {})
    lines = ["| stage | status | wall s | estimated s |", "|---|---|---:|---:|"]
    for r in doc["stages"]:
        e = est.get(r["stage"]) if r["status"] == "ran" else None
        lines.append(f"| {r['stage']} | {r['status']} | {r['wall_s']:.1f} | {'–' if e is None else f'{e:.0f}'} |")
    ran = [r for r in doc["stages"] if r["status"] == "ran" and r["stage"] in est]
    if ran:
        lines.append(f"| **stages run** | | {sum(r['wall_s'] for r in ran):.0f} | "
                     f"{sum(est[r['stage']] for r in ran):.0f} |")
    return "\n".join(lines)


def results_csv(doc: dict) -> str:
    ks = cd_ks(doc)
    buf = io.StringIO()
    w = csv.writer(buf)
    gold = gold_of(doc["base"]) is not None
    w.writerow(["model", "seed", "mmlu_acc", "mmlu_lo", "mmlu_hi", "mmlu_diff_vs_base", "mmlu_diff_lo", "mmlu_diff_hi"]
               + [f"cd_k{k}_{x}" for k in ks for x in ("strict", "lo", "hi", "diff_vs_base", "diff_lo", "diff_hi")]
               + (["mmlu_gold", "mmlu_gold_diff_vs_base", "mmlu_gold_diff_lo", "mmlu_gold_diff_hi"] if gold else [])
               + [f"{key}_{x}" for key in task_columns(doc) for x in ("acc", "lo", "hi", "diff_vs_base", "diff_lo",
                                                                      "diff_hi")])
    entries = [("base", "", doc["base"])] + [(e["edge"], s["seed"], e["eval"]) for s in doc["seeds"]
                                             for e in s["edges"] if e.get("eval")] \
        + [(f["name"], s["seed"], f["eval"]) for s in doc["seeds"] for f in s["fused"]] \
        + [(c["name"], s["seed"], c["eval"]) for s in doc["seeds"] for c in s.get("composed") or []]
    for name, seed, ev in entries:
        row: list[Any] = [name, seed]
        m = ev.get("mmlu", {}).get("accuracy", {}).get("overall")
        d = mmlu_diff(ev, doc["base"]) if name != "base" else None
        row += [m and m["acc"], m and m["lo"], m and m["hi"], d and d["diff"], d and d["lo"], d and d["hi"]]
        for k in ks:
            c = ev.get(f"mmlu_cd_k{k}", {}).get("strict")
            d = cd_diff(ev, doc["base"], k) if name != "base" else None
            row += [c and c["acc"], c and c["lo"], c and c["hi"], d and d["diff"], d and d["lo"], d and d["hi"]]
        if gold:  # the gold answer's mean log-likelihood (`edgefuse.evaluate.gold`), in runs that kept it
            g = gold_of(ev)
            d = gold_diff(ev, doc["base"], GOLD) if name != "base" else None
            row += [g and statistics.fmean(v[GOLD] for v in g.values()), d and d["diff"], d and d["lo"], d and d["hi"]]
        for key in task_columns(doc):
            c = ev.get(key, {}).get("headline")
            d = task_diff(ev, doc["base"], key) if name != "base" else None
            row += [c and c["acc"], c and c["lo"], c and c["hi"], d and d["diff"], d and d["lo"], d and d["hi"]]
        w.writerow(row)
    return buf.getvalue()


def scoring_line(doc: dict) -> str:
    b = doc["config"]["benchmarks"]
    fmt = b.get("format", "letters")
    metric = b.get("metric") or ("acc_norm" if fmt == "cloze" else "acc")
    what = {"letters": "the answer letter after the lettered choices",
            "cloze": "each answer text as the continuation of the question (cloze)"}[fmt]
    norm = " divided by the answer's length in characters" if metric == "acc_norm" else ""
    return f"Scoring: {what}; the prediction is the choice with the highest log-likelihood{norm} (`{metric}`)."


def interference_models(doc: dict) -> list[dict]:
    """The first seed's last-round fused models' interference records (empty when the study collected no Grams)."""
    inter = doc.get("interference") or {}
    models = inter.get("models") or []
    if not models or not doc["seeds"]:
        return []
    seed = doc["seeds"][0]["seed"]
    last = max((m["round"] for m in models if m["seed"] == seed), default=None)
    return [m for m in models if m["seed"] == seed and m["round"] == last]


def interference_table(doc: dict) -> str:
    """Per edge domain i: how loud the other edges' adapters are on its inputs (worst ratio ‖ΔW_j H_i‖/‖ΔW_i H_i‖,
    pooled over modules, median over modules, worst module; the same for every fused model) and each fused model's
    deviation ‖(ΔW_f − ΔW_i) H_i‖/‖ΔW_i H_i‖ from edge i, pooled over modules."""
    models = interference_models(doc)
    if not models:
        return ""
    first = models[0]["domains"]
    lines = ["| domain (edge) | worst ratio, pooled (adapter) | worst ratio, median over modules | worst module | "
             + " | ".join(f"dev. {m['name']}" for m in models) + " |",
             "|---|---:|---:|---|" + "---:|" * len(models)]
    for i, d in enumerate(first):
        worst = "–" if d["ratio_max"] is None else f"{d['ratio_max']:.3g} ({d['ratio_max_module']})"
        lines.append(f"| {d['domain']} | {_num(d['ratio'])} ({d['ratio_adapter'] or '–'}) | {_num(d['ratio_median'])} "
                     f"| {worst} | " + " | ".join(_num(m["domains"][i]["deviation"]) for m in models) + " |")
    return "\n".join(lines)


def gram_source(doc: dict) -> str:
    """Whose prompts the study's Gram matrices come from, in words (``interference.source``)."""
    if (doc.get("interference") or {}).get("grams", {}).get("source") == "edges":
        return "each edge's own training prompts, sent by the edges (interference.source: edges)"
    return "each edge's public-split prompts (never edge data)"


def interference_note(doc: dict) -> str:
    return f"Measured on the base model's Gram matrices of every adapted module's inputs over {gram_source(doc)}. " + \
        INTERFERENCE_NOTE


INTERFERENCE_NOTE = ("*Ratio*: adapter j's output change on domain i's inputs "
                     "over edge i's own, ‖ΔW_j H_i‖ / ‖ΔW_i H_i‖, for the worst other edge j: near 0 it barely touches "
                     "domain i, near or above 1 it moves i's outputs as much as i's own edge does. *Dev.*: the fused "
                     "model's error on edge i's inputs relative to what edge i learnt, ‖(ΔW_f − ΔW_i) H_i‖ / ‖ΔW_i H_i‖: "
                     "0 reproduces edge i there, 1 is as far as dropping its adapter. Squared norms pooled over modules "
                     "unless stated (docs/interference.md).")
