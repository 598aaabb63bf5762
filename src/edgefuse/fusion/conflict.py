"""LoRA-CR: measure conflicts between adapters and resolve them only where they are significant.

Measures, per module, on the weighted updates T_k = w_k ΔW_k:
- pairwise cosine ⟨T_i, T_j⟩/(‖T_i‖‖T_j‖) and overlap of column and row spaces (mean squared cosine of the
  principal angles, ‖U_iᵀU_j‖²_F / min(r_i, r_j)) — both from r×r products of the factors, no m×n matrix;
- sign conflict weighted by magnitude: the share of mass that cancels in the sum,
  1 − Σ_e |Σ_k T_k[e]| / Σ_e Σ_k |T_k[e]| = 2 Σ_e min(P_e, N_e) / Σ_e (P_e + N_e) (dense, one row block at a time).

Selection: a module's score is the strongest opposition between two adapters, max_{i<j} max(0, −cos_ij). Only
modules with score > ``threshold`` are touched; everything else is passed through as the same objects, so a
fusion with LoRA-CR on conflict-free adapters is bit-identical to one without. With ``share`` = q the
selection is instead the ⌈q·M⌉ most conflicting of the M modules (score > 0, ties broken by name): a knob
that does not depend on the scale of the scores, so a sweep over q traces how much editing buys.

Resolution (``strategy``, a `registry.CRStrategy`: the steps below it runs, in order):
- ``element``: per element with P, N the positive and negative mass, the element conflicts when
  min(P, N) ≥ ``element_threshold``·max(P, N); there the entries opposing the dominant sign are dropped.
  The edited ΔW_k is re-factorised at the adapter's own rank (exact truncated SVD; the loss is reported).
  Dense work runs over row blocks: at most one dense ΔW (the edited adapter's) is alive at a time.
- ``direction``: for an opposing pair, along each singular direction (u_l, σ_l, v_l) of adapter i the
  coordinate of j is c_l = u_lᵀ T_j v_l; where c_l < 0, |c_l| ≥ ``direction_threshold``·σ_l and i dominates
  (σ_l > |c_l|), j loses c_l u_l v_lᵀ. Exact in factored form (j's rank grows by the removed directions).
- ``hybrid``: direction, then element.
(``activation`` scores and resolves on activations, after fusion: `fusion.cr_activation`.)
The strategies and the defaults of their thresholds are declared once, in `fusion.registry`.
"""

from __future__ import annotations

import math

import torch

from edgefuse.adapters import LoraAdapter, LoraModule
from edgefuse.fusion import lowrank
from edgefuse.fusion.context import module_names, single_threaded_ops
from edgefuse.fusion.elementwise import FactorRows, row_blocks
from edgefuse.fusion.registry import CR_STRATEGIES, CR_THRESHOLD, common_default


def _weighted(mods, weights) -> list[LoraModule | None]:
    return [None if m is None else LoraModule(m.A, m.B * (m.scale * w), 1.0) for m, w in zip(mods, weights)]


def _overlap(Qi: torch.Tensor, Qj: torch.Tensor) -> float:
    k = min(Qi.shape[1], Qj.shape[1])
    return float((Qi.T @ Qj).pow(2).sum() / k) if k else 0.0


def module_metrics(mods, weights) -> tuple[dict, list]:
    """Factored pairwise metrics for one module; also returns each adapter's SVD (U, S, Vh) or None."""
    T = _weighted(mods, weights)
    K = len(T)
    svds = [None if t is None else lowrank.factored_svd(t.B.double(), t.A.double(), tol=1e-10) for t in T]
    norms = [None if t is None else lowrank.fro_norm(t) for t in T]
    cos = [[None] * K for _ in range(K)]
    col = [[None] * K for _ in range(K)]
    row = [[None] * K for _ in range(K)]
    score = 0.0
    for i in range(K):
        for j in range(K):
            if T[i] is None or T[j] is None:
                continue
            if i == j:
                cos[i][j] = col[i][j] = row[i][j] = 1.0 if norms[i] else 0.0
                continue
            if j < i:
                cos[i][j], col[i][j], row[i][j] = cos[j][i], col[j][i], row[j][i]
                continue
            denom = norms[i] * norms[j]
            cos[i][j] = lowrank.inner(T[i], T[j]) / denom if denom > 0 else 0.0
            col[i][j] = _overlap(svds[i][0].double(), svds[j][0].double())
            row[i][j] = _overlap(svds[i][2].double().T, svds[j][2].double().T)
            score = max(score, -cos[i][j])
    return {"cosine": cos, "col_overlap": col, "row_overlap": row, "score": score, "norms": norms}, svds


def _sources(mods, weights) -> dict[int, FactorRows]:
    """Each present adapter's weighted update T_k = w_k ΔW_k as a row source (dense one row block at a time)."""
    return {k: FactorRows(m, weights[k]) for k, m in enumerate(mods) if m is not None}


def sign_conflict(mods, weights) -> float:
    """Share of the total magnitude of the weighted updates that cancels in their sum, accumulated over row
    blocks (never the K dense updates at once)."""
    srcs = list(_sources(mods, weights).values())
    net = total = 0.0
    for s in row_blocks(srcs[0].shape):
        T = [src.rows(s) for src in srcs]
        acc, mass = T[0].clone(), T[0].abs()
        for t in T[1:]:
            acc.add_(t)
            mass.add_(t.abs())
        net += float(acc.abs().sum(dtype=torch.float64))
        total += float(mass.sum(dtype=torch.float64))
    return 1 - net / total if total > 0 else 0.0


def _element(mods, weights, rho: float, rank_of) -> tuple[list, dict]:
    """Element-level resolution, row block by row block: per block the K weighted blocks give P, N, the
    conflict mask and the dominant sign; an edited adapter's ΔW (one dense update) is rebuilt from its blocks
    and re-factorised exactly at its own rank."""
    srcs = _sources(mods, weights)
    shape = next(iter(srcs.values())).shape
    blocks = row_blocks(shape)

    def block(s):
        T = {k: src.rows(s) for k, src in srcs.items()}
        first = next(iter(T.values()))
        P, N = torch.zeros_like(first), torch.zeros_like(first)
        for t in T.values():
            P.add_(t.clamp(min=0))
            N.sub_(t.clamp(max=0))
        lo, hi = torch.minimum(P, N), torch.maximum(P, N)
        return T, (lo > 0) & (lo >= rho * hi), torch.sign(P - N)

    editable = [k for k in srcs if weights[k] != 0]
    per_adapter, conflicts = dict.fromkeys(editable, 0), 0
    for s in blocks:
        T, conflict, dominant = block(s)
        conflicts += int(conflict.sum())
        for k in editable:
            per_adapter[k] += int((conflict & (T[k] * dominant < 0)).sum())
    per_adapter = {k: nk for k, nk in per_adapter.items() if nk}
    out, errors = list(mods), []
    for k in per_adapter:
        mod = mods[k]
        new = torch.empty(shape, dtype=torch.float32, device=mod.A.device)
        for s in blocks:
            T, conflict, dominant = block(s)
            new[s] = T[k].masked_fill_(conflict & (T[k] * dominant < 0), 0.0).div_(weights[k])
        fac = lowrank.dense_truncated_svd(new, rank_of(k, mod))
        num = den = 0.0
        for s in blocks:
            num += float((new[s] - fac.B[s] @ fac.A).double().pow(2).sum())
            den += float(new[s].double().pow(2).sum())
        errors.append((num / den) ** 0.5 if den > 0 else 0.0)
        out[k] = LoraModule(fac.A.to(mod.A.dtype), fac.B.to(mod.B.dtype), 1.0)
    return out, {"per_adapter": per_adapter, "conflict_elements": conflicts, "refactor_error": max(errors, default=0.0)}


def _direction(mods, weights, metrics, svds, threshold: float, delta: float) -> tuple[list, dict]:
    T = _weighted(mods, weights)
    removals: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i, ti in enumerate(T):
        for j, tj in enumerate(T):
            if i == j or ti is None or tj is None or weights[j] == 0 or metrics["cosine"][i][j] >= -threshold:
                continue
            U, S, Vh = (x.double() for x in svds[i])
            c = ((U.T @ tj.B.double()) * (tj.A.double() @ Vh.T).T).sum(1)
            sel = (c < 0) & (c.abs() >= delta * S) & (S > c.abs())
            if sel.any():
                removals.setdefault(j, []).append((U[:, sel] * c[sel], Vh[sel]))
    out, dirs, changed = list(mods), 0, 0
    for j, parts in sorted(removals.items()):
        mod = mods[j]
        Bx = torch.cat([p[0] for p in parts], dim=1) / weights[j]
        Ax = torch.cat([p[1] for p in parts], dim=0)
        out[j] = LoraModule(
            A=torch.cat([mod.A, Ax.to(mod.A.dtype)], 0),
            B=torch.cat([mod.B * mod.scale, -Bx.to(mod.B.dtype)], 1),
            scale=1.0,
        )
        dirs += Ax.shape[0]
        changed += mod.shape[0] * mod.shape[1]
    return out, {"changed_params": changed, "edited_adapters": sorted(removals), "removed_directions": dirs}


def resolve_conflicts(
    adapters: list[LoraAdapter],
    weights: list[float] | None = None,
    strategy: str = "element",
    threshold: float = CR_THRESHOLD.default,
    element_threshold: float = common_default("cr_element_threshold"),
    direction_threshold: float = common_default("cr_direction_threshold"),
    share: float | None = None,
) -> tuple[list[LoraAdapter], dict]:
    """Return adapters with conflicting updates resolved (untouched modules are the same objects) and stats.

    ``share`` (0 < q ≤ 1) replaces ``threshold``: the ⌈q·M⌉ modules with the highest positive scores are edited.
    """
    if strategy not in CR_STRATEGIES:
        raise ValueError(f"unknown LoRA-CR strategy {strategy!r}; valid: {', '.join(CR_STRATEGIES)}")
    if CR_STRATEGIES[strategy].needs_grams:
        raise ValueError(f"LoRA-CR strategy {strategy!r} acts on the fused result with Gram matrices: use "
                         f"fuse_adapters(..., cr={strategy!r}, grams=...) (`fusion.cr_activation`)")
    steps = CR_STRATEGIES[strategy].steps
    if share is not None and not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    K = len(adapters)
    weights = list(weights) if weights is not None else [1.0] * K
    new_modules = [dict(a.modules) for a in adapters]
    names = module_names(adapters)
    chosen = None
    if share is not None:
        scores = {n: module_metrics([a.modules.get(n) for a in adapters], weights)[0]["score"] for n in names}
        ranked = sorted((n for n in names if scores[n] > 0), key=lambda n: (-scores[n], n))
        chosen = set(ranked[: math.ceil(share * len(names))])
    per_module, total, changed, flagged, touched = {}, 0, 0, 0, set()
    for name in names:
        mods = [a.modules.get(name) for a in adapters]
        metrics, svds = module_metrics(mods, weights)
        size = next(m for m in mods if m is not None).shape
        total += sum(size[0] * size[1] for m in mods if m is not None)
        entry = {k: metrics[k] for k in ("score", "cosine", "col_overlap", "row_overlap")}
        entry["flagged"] = metrics["score"] > threshold if chosen is None else name in chosen
        entry["changed_params"] = 0
        if entry["flagged"]:
            flagged += 1
            entry["sign_conflict"] = sign_conflict(mods, weights)
            counts: dict[int, int] = {}  # edited adapter → changed parameters (a direction edit: all of them)
            for step in steps:
                if step == "direction":
                    mods, st = _direction(mods, weights, metrics, svds, threshold, direction_threshold)
                    entry["removed_directions"] = st["removed_directions"]
                    counts.update({k: size[0] * size[1] for k in st["edited_adapters"]})
                elif step == "element":
                    ranks = [a.modules[name].rank if name in a.modules else 0 for a in adapters]
                    mods, st = _element(mods, weights, element_threshold, lambda k, m: ranks[k])
                    entry["conflict_elements"] = st["conflict_elements"]
                    entry["refactor_error"] = st["refactor_error"]
                    for k, nk in st["per_adapter"].items():
                        counts.setdefault(k, nk)
                else:
                    raise ValueError(f"LoRA-CR strategy {strategy!r} names an unknown step {step!r}")
            entry["edited_adapters"] = sorted(counts)
            entry["changed_params"] = sum(counts.values())
            for k in counts:
                new_modules[k][name] = mods[k]
                touched.add(k)
            changed += entry["changed_params"]
        per_module[name] = entry
    out = [
        a
        if k not in touched
        else LoraAdapter(new_modules[k], a.base_model, dict(a.config), a.manifest, a.path)
        for k, a in enumerate(adapters)
    ]
    stats = {
        "strategy": strategy,
        "threshold": threshold,
        "share": share,
        "element_threshold": element_threshold,
        "direction_threshold": direction_threshold,
        "modules_total": len(per_module),
        "modules_flagged": flagged,
        "params_total": total,
        "params_changed": changed,
        "share_changed": changed / total if total else 0.0,
        "modules": per_module,
    }
    return out, stats


def analyze_conflicts(
    adapters: list[LoraAdapter], weights: list[float] | None = None, element: bool = True
) -> dict:
    """Conflict statistics for every module (streamed: dense work one module and one row block at a time)."""
    with single_threaded_ops():
        return _analyze(adapters, weights, element)


def _analyze(adapters, weights, element):
    K = len(adapters)
    weights = list(weights) if weights is not None else [1.0] * K
    per_module = {}
    for name in module_names(adapters):
        mods = [a.modules.get(name) for a in adapters]
        metrics, _ = module_metrics(mods, weights)
        entry = {k: metrics[k] for k in ("score", "cosine", "col_overlap", "row_overlap")}
        if element:
            entry["sign_conflict"] = sign_conflict(mods, weights)
        per_module[name] = entry
    scores = [e["score"] for e in per_module.values()]
    summary = {
        "modules": len(per_module),
        "max_score": max(scores, default=0.0),
        "mean_score": sum(scores) / len(scores) if scores else 0.0,
    }
    if element and per_module:
        summary["mean_sign_conflict"] = sum(e["sign_conflict"] for e in per_module.values()) / len(per_module)
    return {"adapters": K, "weights": weights, "summary": summary, "modules": per_module}
