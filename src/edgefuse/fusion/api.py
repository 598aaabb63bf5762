"""Public entry points: validate inputs, fuse K adapters module by module, save with a manifest.

Why one loop over modules: every method sees one module of the K adapters at a time, so memory stays at
one module's worth whatever the model size, and a missing module in one adapter is a zero update.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from edgefuse.adapters import (CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, LoraModule, ModelShapes, all_finite, check_targets,
                               load_adapter, save_adapter)
from edgefuse.artifacts import FusedAdapterManifest
from edgefuse.errors import EdgefuseError
from edgefuse.fusion.conflict import analyze_conflicts, resolve_conflicts
from edgefuse.fusion.context import Ctx, module_names, single_threaded_ops
from edgefuse.fusion.cr_activation import module_deviation, resolve_on_activations
from edgefuse.fusion.gram_inputs import check_coverage, checked_once, input_width, module_grams
from edgefuse.fusion.registry import CR_THRESHOLD, METHODS, get_cr_strategy, get_method, recipe_for
from edgefuse.fusion.request import FusionRequest, as_request
from edgefuse.interference.grams import GramSet
from edgefuse.io import jsonable, sha256_file
from edgefuse.models import cast, load_model, save_model_dir
from edgefuse.precision import resolve

log = logging.getLogger("edgefuse.fusion")


def _check_inputs(adapters: list[LoraAdapter], weights: list[float]) -> None:
    if not adapters:
        raise EdgefuseError("no adapters to fuse")
    if len(weights) != len(adapters):
        raise EdgefuseError(f"{len(weights)} weights given for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise EdgefuseError("weights must be finite numbers")
    for name in module_names(adapters):
        shapes = {tuple(a.modules[name].shape) for a in adapters if name in a.modules}
        if len(shapes) > 1:
            raise EdgefuseError(
                f"module {name} has different shapes across adapters {sorted(shapes)}: "
                "adapters for different base models cannot be fused"
            )
    for k, a in enumerate(adapters):
        for name, m in a.modules.items():
            if not (all_finite(m.A, m.B) and math.isfinite(m.scale)):
                raise EdgefuseError(
                    f"adapter {k} ({a.path or 'in memory'}) module {name} contains NaN or Inf"
                )


def fuse_adapters(
    adapters: list[LoraAdapter],
    method: str | FusionRequest,
    weights: list[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    cr: str | None = None,
    cr_threshold: float = CR_THRESHOLD.default,
    progress: Callable[..., None] | None = None,
    grams: list | None = None,
    **params,
) -> tuple[LoraAdapter, dict]:
    """Fuse K adapters with ``method`` (optionally after LoRA-CR) into one adapter; returns (adapter, stats).

    ``method`` is a `FusionRequest`, or a method's name with the request's other fields as keywords (``weights``
    … ``cr_threshold``, and the method's parameters).

    ``grams``: for a method that fuses with data (regmean) or LoRA-CR ``activation``, one mapping per adapter,
    module name → Gram matrix of that module's inputs on the adapter's domain
    (`edgefuse.interference.grams.GramSet.for_adapters`).

    LoRA-CR: ``element``/``direction``/``hybrid`` edit the adapters before fusion (`fusion.conflict`);
    ``activation`` scores the fused result on each domain's inputs and re-solves the flagged modules with RegMean
    (`fusion.cr_activation`).

    ``progress``: called as ``progress(0, total=modules)`` once, then ``progress(1)`` per fused module (the
    ``advance`` of `edgefuse.ui.progress_bar`), since a large model's element-wise merge takes minutes.
    """
    request = as_request(method, weights, rank, density, seed, cr, cr_threshold, params)
    get_method(request.method)
    weights = [1.0] * len(adapters) if request.weights is None else list(request.weights)
    _check_inputs(adapters, weights)
    spec, density, resolved = request.check()
    method, rank, seed, cr, cr_threshold = request.method, request.rank, request.seed, request.cr, request.cr_threshold
    cr_grams = cr is not None and get_cr_strategy(cr).needs_grams
    names = module_names(adapters)
    grams = checked_once(grams)  # each distinct matrix fully checked once, here, before any module is fused
    check_coverage(method, spec.needs_grams or cr_grams, grams, adapters, names,
                   what=f"LoRA-CR strategy {cr}" if cr_grams and not spec.needs_grams else None)
    if cr_grams and any(w < 0 for w in weights):
        raise EdgefuseError(f"LoRA-CR strategy {cr} weighs each domain's regression term (RegMean): weights must "
                            "be ≥ 0")
    t0 = time.perf_counter()
    stats: dict[str, Any] = {
        "method": method,
        "weights": weights,
        "density": density if spec.density else None,
        "seed": seed,
        "params": resolved,
    }
    if cr is not None and not cr_grams:
        with single_threaded_ops():
            adapters, stats["cr"] = resolve_conflicts(
                adapters,
                weights,
                cr,
                cr_threshold,
                resolved["cr_element_threshold"],
                resolved["cr_direction_threshold"],
                resolved["cr_share"],
            )
    asked_rank = rank  # LoRA-CR activation's RegMean step truncates only to a rank the caller asked for
    if rank is None and spec.rank == "max":
        rank = max(m.rank for a in adapters for m in a.modules.values())
    shared = torch.Generator().manual_seed(seed)
    recipe = recipe_for(spec, resolved)
    scored: dict[str, tuple[float, list]] = {}  # LoRA-CR activation: each module's score on the domains' inputs

    def one(name: str) -> LoraModule:
        ctx = Ctx(
            name=name,
            rank=rank,
            density=density,
            gamma=resolved.get("gamma", 0.0),
            majority=resolved.get("majority", "total"),
            svd_solver=resolved["svd_solver"],
            seed=seed,
            rng=resolved.get("rng", "module"),
            shared_generator=shared,
            params=resolved,
            recipe=recipe,
        )
        if grams is not None:
            ctx.grams = module_grams(grams, name, input_width(adapters, name))
        try:
            fused = spec.kernel([a.modules.get(name) for a in adapters], weights, ctx)
        except ValueError as e:
            raise EdgefuseError(str(e)) from None
        if not all_finite(fused.A, fused.B):
            raise EdgefuseError(f"fusion produced NaN/Inf in module {name}")
        if cr_grams:
            scored[name] = module_deviation([a.modules.get(name) for a in adapters], fused, ctx.grams, weights)
        if progress is not None:
            progress(1)
        return fused

    if progress is not None:
        progress(0, total=len(names))
    workers = int(resolved["workers"])
    if resolved.get("rng") == "sequential":
        workers = 1  # one random stream in module order
    with single_threaded_ops():
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                out = dict(zip(names, pool.map(one, names)))
        else:
            out = {name: one(name) for name in names}
        if cr_grams:
            out, stats["cr"] = _activation_cr(adapters, out, scored, weights, grams, asked_rank, spec, resolved, cr,
                                              cr_threshold)
    stats["rank"] = rank
    stats["output_rank"] = max((m.rank for m in out.values()), default=0)
    stats["modules"] = len(out)
    stats["wall_s"] = time.perf_counter() - t0
    return LoraAdapter(out, base_model=adapters[0].base_model), stats


def _activation_cr(adapters, out, scored, weights, grams, rank, spec, resolved, cr, cr_threshold):
    """LoRA-CR ``activation`` on the fused modules ``out``: RegMean (the regmean method's kernel and defaults, or
    this call's alpha/ridge when the method is regmean) on the flagged modules: exact at rank Σ r_k like the regmean
    method, or truncated exactly to ``rank`` when the caller asked for one (not to a method's default rank)."""
    reg = METHODS["regmean"]
    params = {**reg.defaults, **({k: resolved[k] for k in reg.defaults} if spec is reg else {})}

    try:
        return resolve_on_activations(
            mods_of=lambda name: [a.modules.get(name) for a in adapters],
            fused=out,
            scored=scored,
            weights=weights,
            grams_of=lambda name: module_grams(grams, name, input_width(adapters, name)),
            ctx_of=lambda name: Ctx(name=name, rank=rank, params=params),
            strategy=cr,
            threshold=cr_threshold,
            share=resolved["cr_share"],
            already_regmean=spec is reg,
        )
    except ValueError as e:
        raise EdgefuseError(str(e)) from None


def merge_into_model(model, adapter: LoraAdapter):
    """Add every module's ΔW to the model's weights in place (all shapes checked before any change)."""
    targets = {}
    for name, mod in adapter.modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise EdgefuseError(f"module {name} of the adapter is not in the model") from None
        W = getattr(layer, "weight", None)
        if W is None or tuple(W.shape) != tuple(mod.shape):
            raise EdgefuseError(
                f"module {name}: adapter shape {tuple(mod.shape)} does not match the model's "
                f"{None if W is None else tuple(W.shape)}"
            )
        targets[name] = W
    with torch.no_grad():
        for name, W in targets.items():
            W.add_(adapter.modules[name].delta().to(device=W.device, dtype=W.dtype))
    return model


def _fingerprints(adapters: list[LoraAdapter]) -> set[str]:
    return {a.base_fingerprint for a in adapters if a.base_fingerprint}


def _load_base(model: str | None, device: str | None = None):
    """(model, tokenizer) of ``--model`` in float32 (a merge then adds ΔW without rounding), or (None, None):
    adapters are then checked by fingerprint only."""
    if model is None:
        return None, None

    return load_model(model, device=device)


def _check_recorded_bases(adapters: list[LoraAdapter]) -> None:
    """Without ``--model``: each adapter's modules against the architecture of the base model its config records
    (``base_model_name_or_path``), built from that model's config alone (`ModelShapes.of_spec`: no weights), so a
    module the model lacks is refused as one line naming the adapter, the module and the model before anything
    is fused or written. Graceful where the check cannot run: an adapter recording no base is not checked, and a
    base whose config is not at hand offline (an adapter from elsewhere) gets one warning line and no check."""
    by_base: dict[str, list[LoraAdapter]] = {}
    for a in adapters:
        if a.base_model:
            by_base.setdefault(a.base_model, []).append(a)
    for spec, group in by_base.items():
        try:
            shapes = ModelShapes.of_spec(spec)
        except EdgefuseError as e:
            where = ", ".join(str(a.path) for a in group)
            log.warning("module names of %s not checked: %s", where, e)
            continue
        for a in group:
            check_targets(a, shapes)


def fuse_dirs(
    adapter_dirs: list[str | Path],
    out: str | Path,
    method: str | FusionRequest,
    weights: list[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    cr: str | None = None,
    cr_threshold: float = CR_THRESHOLD.default,
    force: bool = False,
    merged_out: str | Path | None = None,
    model: str | None = None,
    progress: Callable[..., None] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    activations: str | Path | None = None,
    **params,
) -> dict:
    """Load, check, fuse and save (PEFT adapter + ``edgefuse.json``); optionally merged full weights.

    ``method``: a `FusionRequest`, or a method's name with the request's fields as keywords (`fuse_adapters`); the
    request is checked against the registry before anything is read.

    With ``model`` every adapter is also checked against that base model (fingerprint, targets, shapes);
    without it, each adapter's targets and shapes are checked against the architecture of the base model it
    records, read from that model's config without weights (skipped with a warning line when that config is not
    available offline: `_check_recorded_bases`), and adapters recording different base fingerprints are refused. ``model`` is loaded on
    ``device`` and merged in float32; ``dtype`` is that of the ``merged_out`` weights. Nothing is written
    unless every check and the whole fusion succeed.
    """
    request = as_request(method, weights, rank, density, seed, cr, cr_threshold, params)
    out = Path(out)
    for target in (out, merged_out):
        if target is not None and Path(target).exists() and not force:
            raise EdgefuseError("output already exists (pass --force to overwrite)", path=target)
    if merged_out is not None and model is None:
        raise EdgefuseError("--merged-out needs --model (the base model to merge into)")
    if (device, dtype) != (None, None) and merged_out is None:
        raise EdgefuseError("--device and --dtype apply to --merged-out (where the merge runs, the merged weights' dtype)")
    precision = resolve(device, dtype)
    request.check()
    base, tok = _load_base(model, precision.device)
    target = None if base is None else ModelShapes.of(base)
    adapters = [load_adapter(d, target, force=force) for d in adapter_dirs]
    fps = _fingerprints(adapters)
    names = {a.base_model for a in adapters if a.base_model}
    if (len(fps) > 1 or len(names) > 1) and not force:
        what = f"fingerprints {sorted(fps)}" if len(fps) > 1 else f"base models {sorted(names)}"
        raise EdgefuseError(
            f"adapters were made for different base models ({what}); pass --force to fuse anyway"
        )
    if target is None:
        _check_recorded_bases(adapters)
    grams = None if activations is None else _domain_grams(activations, adapters, fps, force)
    fused, stats = fuse_adapters(adapters, request, progress=progress, grams=grams)
    if activations is not None:
        stats["activations"] = {"path": str(activations), "sha256": sha256_file(Path(activations) / "grams.json")}
    with single_threaded_ops():
        conflicts = analyze_conflicts(adapters, stats["weights"], element=False)
    merged = None
    if merged_out is not None:  # the reader already checked every adapter against this model
        merged = merge_into_model(base, fused)
    manifest = FusedAdapterManifest(
        base_fingerprint=next(iter(fps)) if len(fps) == 1 else None,
        base_model=next(iter(names)) if len(names) == 1 else None,
        method=request.method,
        parameters=jsonable({k: stats[k] for k in ("weights", "density", "seed", "params", "rank", "activations")
                             if k in stats}),
        cr={"strategy": request.cr, "threshold": request.cr_threshold, "share": stats["params"]["cr_share"]}
        if request.cr else None,
        inputs=[
            {
                "path": str(Path(d)),
                "domain": a.domain,
                "sha256": {f: sha256_file(Path(d) / f) for f in (CONFIG_FILE, WEIGHTS_FILE)},
            }
            for d, a in zip(adapter_dirs, adapters)
        ],
        conflicts=jsonable({
            "summary": conflicts["summary"],
            "module_scores": {n: e["score"] for n, e in conflicts["modules"].items()},
        }),
        cr_stats=jsonable(_compact_cr(stats.get("cr"))),
        output_rank=stats["output_rank"],
        wall_s=stats["wall_s"],
    )
    save_adapter(fused, out, manifest, base_model=manifest.base_model)
    if merged is not None:
        save_model_dir(cast(merged, precision.device, precision.torch_dtype), tok, merged_out)
    return {
        **stats,
        "out": str(out),
        "merged_out": str(merged_out) if merged_out else None,
        "conflicts": conflicts,
    }


def _domain_grams(activations: str | Path, adapters: list[LoraAdapter], fps: set[str], force: bool) -> list:
    """Each adapter's domain's Gram matrices per token (RegMean then weighs domains alike whatever text each had),
    refused when collected on another base model than the adapters record (unless ``force``)."""
    gs = GramSet(activations)
    if fps and fps != {gs.manifest.base_fingerprint} and not force:
        raise EdgefuseError("Gram matrices were collected on another base model than the adapters' "
                            f"({gs.manifest.base_model}); pass --force to fuse anyway", path=activations)
    return [g.per_token() for g in gs.for_adapters(adapters)]


def _compact_cr(cr: dict | None) -> dict | None:
    """CR statistics for the manifest: totals plus each flagged module's score and changes."""
    if cr is None:
        return None
    keep = (
        "score",
        "sign_conflict",
        "changed_params",
        "removed_directions",
        "edited_adapters",
        "refactor_error",
        "deviation",
        "score_after",
    )
    flagged = {n: {k: e[k] for k in keep if k in e} for n, e in cr["modules"].items() if e["flagged"]}
    return {
        **{k: v for k, v in cr.items() if k != "modules"},
        "flagged_modules": flagged,
        "module_scores": {n: e["score"] for n, e in cr["modules"].items()},
    }
