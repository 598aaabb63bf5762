"""PNG figures of a study (matplotlib, Agg backend), drawn from the results document alone: each returns a
caption that says what it shows. The conflict heatmap is also drawn by ``edgefuse conflicts --plot``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edgefuse.io import atomic_write_png
from edgefuse.report.tables import cd_ks, cr_sweep_rows, gram_source, interference_models, transfer_matrix


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, title: str, **title_kw) -> None:
    """Title, legend, layout, PNG, close: the common end of every figure."""
    ax.set_title(title, **title_kw)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(fig, path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _err(ci: dict) -> tuple[float, float, float]:
    return 100 * ci["acc"], 100 * (ci["acc"] - ci["lo"]), 100 * (ci["hi"] - ci["acc"])


def fig_cd_methods(doc: dict, path: Path, k: int) -> str:
    """Grouped bars: MMLU-CD strict accuracy per fusion method, LoRA-CR off vs each strategy, with 95% CIs."""
    plt = _plt()
    key = f"mmlu_cd_k{k}"
    fused = doc["seeds"][0]["fused"]
    methods = list(dict.fromkeys(f["method"] for f in fused))
    crs = list(dict.fromkeys(f["cr"] for f in fused))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(methods) + 2), 4.2))
    width = 0.8 / max(1, len(crs))
    for j, cr in enumerate(crs):
        vals, lo, hi = [], [], []
        for m in methods:
            f = next((f for f in fused if f["method"] == m and f["cr"] == cr), None)
            v, down, up = _err(f["eval"][key]["strict"]) if f and key in f["eval"] else (np.nan, 0, 0)
            vals.append(v)
            lo.append(down)
            hi.append(up)
        x = np.arange(len(methods)) + (j - (len(crs) - 1) / 2) * width
        ax.bar(x, vals, width, yerr=[lo, hi], capsize=3, label="LoRA-CR off" if cr == "off" else f"LoRA-CR {cr}")
    base = doc["base"][key]["strict"]["acc"] * 100
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"base model ({base:.1f}%)")
    ax.axhline(100 * 0.25 ** k, color="grey", linestyle=":", linewidth=1, label=f"chance ({100 * 0.25 ** k:.2f}%)")
    ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
    ax.set_ylabel(f"MMLU-CD k={k} strict accuracy (%)")
    _save(fig, ax, path, f"MMLU-CD k={k} by fusion method, LoRA-CR off/on (95% CI)", fontsize=10)
    return f"MMLU-CD k={k} strict accuracy of each fusion method with LoRA-CR off and on; error bars are 95% bootstrap intervals; dashed line: base model; dotted: chance."


def fig_per_domain(doc: dict, path: Path) -> str:
    """Per-category MMLU accuracy for base, each edge alone and each fused model."""
    plt = _plt()
    models = [("base", doc["base"])]
    s0 = doc["seeds"][0]
    models += [(f"edge {e['edge']}", e["eval"]) for e in s0["edges"] if e.get("eval")]
    models += [(f["name"], f["eval"]) for f in s0["fused"]]
    models = [(n, ev) for n, ev in models if "mmlu" in ev]
    cats = list(doc["base"]["mmlu"]["accuracy"]["categories"])
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(models) + 3), 4.2))
    width = 0.8 / len(cats)
    for j, c in enumerate(cats):
        vals = [100 * ev["mmlu"]["accuracy"]["categories"].get(c, {}).get("acc", np.nan) for _, ev in models]
        ax.bar(np.arange(len(models)) + (j - (len(cats) - 1) / 2) * width, vals, width, label=c)
    ax.axhline(25, color="grey", linestyle=":", linewidth=1, label="chance (25%)")
    ax.set_xticks(np.arange(len(models)), [n for n, _ in models], rotation=30, ha="right")
    ax.set_ylabel("MMLU accuracy (%)")
    _save(fig, ax, path, "MMLU accuracy per category: base, edges alone, fused models")
    return "MMLU accuracy per category (STEM, humanities, social sciences, other) of the base model, each edge adapter alone and each fused model."


def fig_loss(doc: dict, path: Path) -> str | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    for s in doc["seeds"]:
        for e in s["edges"]:
            curve = (e.get("train") or {}).get("loss_curve") or []
            if not curve:
                continue
            if isinstance(curve[0], dict):
                xs, ys = [c["step"] for c in curve], [c["loss"] for c in curve]
            elif isinstance(curve[0], (list, tuple)):
                xs, ys = [c[0] for c in curve], [c[-1] for c in curve]
            else:
                xs, ys = list(range(1, len(curve) + 1)), curve
            ax.plot(xs, ys, label=f"{e['edge']} (seed {s['seed']})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    _save(fig, ax, path, "Edge LoRA training loss")
    return "Training loss of each edge's LoRA adapter on its pruned model."


def fig_rounds(doc: dict, path: Path) -> str | None:
    """Accuracy of each fused model per round (MMLU and the headline MMLU-CD k), with 95% CIs."""
    rounds = doc["seeds"][0].get("rounds", [])
    if len(rounds) < 2:
        return None
    plt = _plt()
    k = doc["config"]["output"]["headline_k"]
    keys = [("mmlu", "MMLU")] + ([(f"mmlu_cd_k{k}", f"MMLU-CD k={k} strict")] if str(k) in map(str, doc["cd_n"]) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    xs = [r["round"] for r in rounds]
    for ax, (key, label) in zip(axes[0], keys):
        for name in [f["name"] for f in rounds[0]["fused"]]:
            pts = [next((f["eval"] for f in r["fused"] if f["name"] == name), {}) for r in rounds]
            cis = [(p["mmlu"]["accuracy"]["overall"] if key == "mmlu" else p[key]["strict"]) if key in p else None
                   for p in pts]
            v = [_err(c) if c else (np.nan, 0, 0) for c in cis]
            ax.errorbar(xs, [a for a, _, _ in v], yerr=[[d for _, d, _ in v], [u for _, _, u in v]], capsize=3,
                        marker="o", label=name)
        base = doc["base"].get(key)
        if base:
            b = 100 * (base["accuracy"]["overall"]["acc"] if key == "mmlu" else base["strict"]["acc"])
            ax.axhline(b, color="black", linestyle="--", linewidth=1, label=f"base model ({b:.1f}%)")
        ax.set_xticks(xs)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{label} accuracy (%)")
        if ax is not axes[0][-1]:
            ax.legend(fontsize=8)
    _save(fig, axes[0][-1], path, "Accuracy of the fused models per round (95% CI)", fontsize=10)
    return ("Accuracy of every fused model per round; from round 2 on, each edge starts from the fused model sent "
            "back. Error bars are 95% bootstrap intervals; dashed line: base model.")


def fig_transfer(doc: dict, path: Path) -> str | None:
    """Heatmap of the transfer matrix: edge alone (rows) × domain (columns), paired Δ vs base in points."""
    tm = transfer_matrix(doc)
    if tm is None:
        return None
    plt = _plt()
    rows, cols = list(tm["cells"]), tm["columns"]
    vals = np.array([[100 * (tm["cells"][r][c] or {}).get("diff", np.nan) for c in cols] for r in rows])
    lim = max(1.0, float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2.5, 0.7 * len(rows) + 2))
    im = ax.imshow(vals, cmap="RdBu", vmin=-lim, vmax=lim)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            d = tm["cells"][r][c]
            if d:
                sig = "*" if not d["lo"] <= 0 <= d["hi"] else ""
                ax.text(j, i, f"{100 * d['diff']:+.1f}{sig}\n[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]",
                        ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), [f"{c}\n(n={tm['n'][c]})" for c in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r} alone" for r in rows], fontsize=8)
    fig.colorbar(im, ax=ax, label="Δ vs base (points)")
    ax.set_title("Transfer matrix: each edge adapter alone, per domain", fontsize=10)
    fig.tight_layout()
    atomic_write_png(fig, path, dpi=110)
    plt.close(fig)
    return ("Each edge's adapter alone (rows) on each edge's domain (columns): paired Δ against the base model in "
            "points with its 95% interval (* = excludes 0). Diagonal: own-domain gain; off-diagonal: interference.")


def fig_cr_sweep(doc: dict, path: Path) -> str | None:
    """Share of parameters LoRA-CR changed → its paired Δ on MMLU-CD (per answer) against the method without it."""
    ks = cd_ks(doc)
    rows = [r for r in cr_sweep_rows(doc) if ks and r.get(f"cd_k{ks[0]}_answer") and r["share_changed"] is not None]
    if not rows:
        return None
    k = ks[0]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["share_changed"])
        x = [100 * r["share_changed"] for r in rs]
        d = [r[f"cd_k{k}_answer"] for r in rs]
        y = [100 * v["diff"] for v in d]
        ax.errorbar(x, y, yerr=[[100 * (v["diff"] - v["lo"]) for v in d], [100 * (v["hi"] - v["diff"]) for v in d]],
                    marker="o", capsize=3, label=method)
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xlabel("adapter parameters changed by LoRA-CR (%)")
    ax.set_ylabel(f"Δ MMLU-CD k={k} per answer vs no CR (points)")
    _save(fig, ax, path, "LoRA-CR: how much it edits vs what it changes (95% CI)", fontsize=10)
    return (f"Each LoRA-CR setting: share of adapter parameters it changed (x) and its paired Δ on MMLU-CD k={k} "
            "(per answer) against the same fusion method without LoRA-CR (y), with 95% intervals.")


def fig_interference(doc: dict, path: Path) -> str | None:
    """Two heatmaps: the edges' pooled interference ratio (domain i × adapter j) and each fused model's pooled
    deviation from each edge on its inputs (domain × fused model)."""
    models = interference_models(doc)
    if not models:
        return None
    plt = _plt()
    edges = models[0]["edges"]
    K = len(edges)
    nan = np.nan
    ratio = np.array([[nan if x is None else x for x in row] for row in models[0]["ratio"]], dtype=float)
    dev = np.array([[nan if m["domains"][i]["deviation"] is None else m["domains"][i]["deviation"] for m in models]
                    for i in range(K)], dtype=float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(0.5 * K + 0.6 * len(models) + 5.5, 0.4 * K + 3.2),
                                 gridspec_kw={"width_ratios": [max(K, 2), max(len(models), 2)]})
    for ax, vals, cols, title, label in (
            (a1, ratio, [f"{e}" for e in edges], "interference ratio ‖ΔW_j H_i‖ / ‖ΔW_i H_i‖", "adapter j"),
            (a2, dev, [m["name"] for m in models], "fused deviation ‖(ΔW_f − ΔW_i) H_i‖ / ‖ΔW_i H_i‖", "fused model")):
        im = ax.imshow(vals, cmap="magma", aspect="auto")
        if vals.size <= 100:
            top = np.nanmax(vals) if np.isfinite(vals).any() else 1.0
            for (i, j), v in np.ndenumerate(vals):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 * top else "white")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(K), edges, fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("domain i (edge)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    atomic_write_png(fig, path, dpi=110)
    plt.close(fig)

    return (f"Interference on activations (base-model Gram matrices over {gram_source(doc)}), squared norms "
            "pooled over modules. Left: how loud edge j's adapter is on domain i's inputs next to edge i's own "
            "(diagonal 1). Right: each fused model's error on edge i's inputs relative to edge i's update (0: "
            "reproduces edge i; 1: as far as no adapter).")


def _layer_type(name: str) -> tuple[str, str]:
    m = re.search(r"layers\.(\d+)\.", name)
    return (m.group(1) if m else "-"), name.rsplit(".", 1)[-1]


def conflict_grid(stats: dict, key: str = "score"):
    """Per-layer × module-type table of a conflict statistic (missing cells are None)."""
    layers, types, cells = [], [], {}
    for name, e in stats["modules"].items():
        layer, typ = _layer_type(name)
        layers.append(layer) if layer not in layers else None
        types.append(typ) if typ not in types else None
        cells[(layer, typ)] = e.get(key)
    layers.sort(key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0))
    return layers, types, cells


def plot_heatmap(stats: dict, path: Path, key: str = "score") -> None:
    """Layer × module-type heatmap of one statistic of `edgefuse.fusion.analyze_conflicts`' ``modules``."""
    plt = _plt()
    layers, types, cells = conflict_grid(stats, key)
    grid = np.array([[np.nan if cells.get((y, t)) is None else cells[(y, t)] for t in types] for y in layers])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(types), 1.5 + 0.25 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(f"adapter conflict ({key})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    atomic_write_png(fig, path, dpi=120)
    plt.close(fig)


def edge_conflicts(doc: dict) -> dict | None:
    """The first seed's conflict statistics between its edge adapters, as its fuse stages stored them (every fused
    model of a round has the same ones); None when this results document has no per-module scores."""
    fused = doc["seeds"][0]["fused"] if doc["seeds"] else []
    for f in fused:
        stats = (f.get("fusion") or {}).get("conflicts") or {}
        if stats.get("modules") and all("score" in e for e in stats["modules"].values()):
            return stats
    return None


def draw_figures(doc: dict, run_dir: Path) -> tuple[dict[str, str], list[str]]:
    """Draw every figure the data allows; returns ({file name: caption}, one note per figure it cannot draw)."""
    out: dict[str, str] = {}
    notes: list[str] = []
    ks = cd_ks(doc)
    if doc["seeds"] and doc["seeds"][0]["fused"]:
        for k in ks:
            name = f"mmlu_cd_k{k}_methods.png"
            out[name] = fig_cd_methods(doc, run_dir / name, k)
    if doc["seeds"] and "mmlu" in doc["base"]:
        out["per_domain.png"] = fig_per_domain(doc, run_dir / "per_domain.png")
    if doc["seeds"]:
        cap = fig_loss(doc, run_dir / "loss_curves.png")
        if cap:
            out["loss_curves.png"] = cap
        cap = fig_rounds(doc, run_dir / "rounds.png")
        if cap:
            out["rounds.png"] = cap
        for name, fig in (("transfer.png", fig_transfer), ("cr_sweep.png", fig_cr_sweep),
                          ("interference.png", fig_interference)):
            cap = fig(doc, run_dir / name)
            if cap:
                out[name] = cap
        if len(doc["seeds"][0]["edges"]) >= 2 and doc["seeds"][0]["fused"]:
            stats = edge_conflicts(doc)
            if stats is None:
                notes.append("Conflict heatmap left out: these results hold no per-module conflict scores.")
            else:
                plot_heatmap(stats, run_dir / "conflict_heatmap.png")
                out["conflict_heatmap.png"] = (
                    "Conflict score between the edge adapters per layer (rows) and module type (columns); higher "
                    "means the adapters' updates pull in more opposite directions.")
    return out, notes
