"""Recover an edge adapter (pruned shapes) to a PEFT adapter of the full base model.

For a module kept with output rows R and input columns C, the edge update ΔW' = B'A' (|R| × |C|)
becomes ΔW = B A with B = scatter of B' to rows R (zeros elsewhere) and A = scatter of A' to columns
C: ΔW[R, C] = ΔW' and ΔW is zero on every pruned row and column — exact, and still rank r, so no
dense matrix is ever formed. Layers removed by depth pruning carry no LoRA. This is LoRAM's recovery
step (Zhang et al., ICLR 2025) for structured pruning; for unstructured/2:4 masks it is the identity.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgefuse.adapters import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    LoraAdapter,
    LoraModule,
    load_adapter,
    peft_config_for,
    save_adapter,
)
from edgefuse.edge.plan import from_runs, full_shape, plan_hash, read_plan
from edgefuse.artifacts import PACKAGE_KIND, EdgePackageManifest, RecoveredAdapterManifest
from edgefuse.errors import EdgefuseError
from edgefuse.io import sha256_file


def recover_adapter(adapter: LoraAdapter, plan: dict, where: Path | str = "package") -> LoraAdapter:
    """Scatter every module's factors to the full shapes the plan describes."""
    base = plan["base_config"]
    by_pruned = {e["pruned_name"]: (orig, e) for orig, e in plan["modules"].items()}
    full: dict[str, LoraModule] = {}
    for name, mod in adapter.modules.items():
        if name not in by_pruned:
            raise EdgefuseError(f"package module {name} does not exist in the pruned model of this plan", path=where)
        orig, entry = by_pruned[name]
        proj = name.rsplit(".", 1)[-1]
        out_f, in_f = full_shape(base, proj)
        rows, cols = from_runs(entry["rows"], out_f), from_runs(entry["cols"], in_f)
        if mod.shape != (len(rows), len(cols)):
            raise EdgefuseError(f"package shapes contradict the plan: {name} is {mod.shape[0]}×{mod.shape[1]}, the plan "
                                f"keeps {len(rows)}×{len(cols)} of {orig}", path=where)
        A = torch.zeros(mod.rank, in_f, dtype=mod.A.dtype)
        B = torch.zeros(out_f, mod.rank, dtype=mod.B.dtype)
        A[:, torch.tensor(cols)] = mod.A
        B[torch.tensor(rows)] = mod.B
        full[orig] = LoraModule(A, B, mod.scale)
    return LoraAdapter(full, plan.get("base_model"), adapter.config, adapter.manifest)


def project_adapter(adapter: LoraAdapter, plan: dict, where: Path | str = "adapter") -> LoraAdapter:
    """The inverse of `recover_adapter`: a full-model adapter restricted to the plan's pruned model.

    Module ``orig`` kept with rows R and columns C becomes B[R], A[:, C] under its pruned name, so
    ΔW' = ΔW[R, C] exactly; modules of dropped layers are left out. Why: in multi-round studies the
    fused adapter goes back to each edge as the start of its next round, in the edge's own shapes.
    ``project_adapter(recover_adapter(x, plan), plan)`` gives ``x`` back bit for bit.
    """
    base = plan["base_config"]
    out: dict[str, LoraModule] = {}
    for orig, entry in plan["modules"].items():
        mod = adapter.modules.get(orig)
        if mod is None:
            continue
        proj = orig.rsplit(".", 1)[-1]
        out_f, in_f = full_shape(base, proj)
        if mod.shape != (out_f, in_f):
            raise EdgefuseError(f"{orig} is {mod.shape[0]}×{mod.shape[1]}, the plan's base model has {out_f}×{in_f}",
                                path=where)
        rows, cols = torch.tensor(from_runs(entry["rows"], out_f)), torch.tensor(from_runs(entry["cols"], in_f))
        out[entry["pruned_name"]] = LoraModule(mod.A[:, cols].contiguous(), mod.B[rows].contiguous(), mod.scale)
    return LoraAdapter(out, adapter.base_model, adapter.config, adapter.manifest)


def recover(package_dir: Path, plan_path: Path, out_dir: Path, force: bool = True) -> Path:
    """Check the package against the plan (hashes, fingerprint, plan hash, shapes) and write the full adapter.

    The package is read by the one adapter reader without a model: its tensors have the *pruned* shapes, and the
    pruned model exists here only as the plan, which `recover_adapter` checks every module's name and shape
    against (the recovered adapter's full shapes then follow from the plan's base config by construction).
    """
    package_dir, plan_path, out_dir = Path(package_dir), Path(plan_path), Path(out_dir)
    if not (package_dir / MANIFEST_FILE).is_file():
        raise EdgefuseError(f"not an edge package (no {MANIFEST_FILE})", path=package_dir)
    adapter = load_adapter(package_dir)  # verifies the manifest's hashes first
    man = adapter.manifest
    if type(man) is not EdgePackageManifest:
        raise EdgefuseError(f"not an edge package ({MANIFEST_FILE} kind is {man.kind!r})", path=package_dir)
    plan = read_plan(plan_path)
    if man.base_fingerprint != plan["base_fingerprint"]:
        raise EdgefuseError(f"package was trained for base model {man.base_fingerprint}, the plan is for "
                            f"{plan['base_fingerprint']}", path=plan_path)
    if man.plan_hash != plan_hash(plan):
        raise EdgefuseError("package was trained on another pruning plan (plan hash differs)", path=plan_path)
    full = recover_adapter(adapter, plan, package_dir)
    dropped = sorted(set(range(plan["base_config"]["num_hidden_layers"])) - set(plan["kept_layers"]))
    manifest = RecoveredAdapterManifest(**man.model_dump(exclude={"kind", "files"}), recovery={
        "from_kind": PACKAGE_KIND, "plan_hash": plan_hash(plan),
        "package_adapter_sha256": sha256_file(package_dir / WEIGHTS_FILE),
        "dropped_layers": dropped, "modules": len(full.modules),
        "note": "pruned rows/columns are zero; dropped layers carry no LoRA",
    })
    # dropped layers carry no LoRA: say so in the PEFT config too, so PEFT does not inject empty ones there
    config = peft_config_for(full, plan.get("base_model"))
    if dropped:
        config["layers_to_transform"], config["layers_pattern"] = list(plan["kept_layers"]), "layers"
    return save_adapter(full, out_dir, manifest=manifest, base_model=plan.get("base_model"),
                        extra_files={CONFIG_FILE: config})
