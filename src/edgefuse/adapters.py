"""LoRA adapters in factored form, read from and written to PEFT's on-disk format.

Why: every later stage (recovery, fusion, LoRA-CR, evaluation) works on the factors B·A, never on
dense m×n updates, and must accept any PEFT LoRA a user brings (different ranks, alphas, rsLoRA,
rank/alpha patterns, target sets). This module is the single place that knows PEFT's file layout.

Convention: a module's update is ΔW = scale · B @ A with A of shape (r, in) and B of shape (out, r);
PEFT's scale is alpha/r, or alpha/sqrt(r) with rsLoRA. Written adapters fold the scale into B and
declare alpha = r per module, which PEFT reads back as scale 1: exact, and valid for any mix of ranks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgefuse.errors import EdgefuseError
from edgefuse.io import atomic_dir, atomic_write_json, read_json, refuse_pickles, sha256_file, load_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "edgefuse.json"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when no tensor holds NaN or ±Inf.

    Why: one reduction per tensor instead of an element-wise mask; NaN and Inf always survive a sum, and a sum
    that overflows from finite values only sends that tensor to the exact element-wise check.
    """
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True


@dataclass
class LoraModule:
    """One adapted linear layer: ΔW = scale · B @ A."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ΔW (out × in). Only for tests, small modules, or one module at a time."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))

    def folded(self) -> "LoraModule":
        """Same update with the scale folded into B (scale 1)."""
        return LoraModule(self.A, self.B * self.scale, 1.0)


@dataclass
class LoraAdapter:
    """A LoRA adapter: module name (e.g. ``model.layers.0.self_attn.q_proj``) → factors."""

    modules: dict[str, LoraModule]
    base_model: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def target_modules(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    def delta(self, name: str) -> torch.Tensor:
        return self.modules[name].delta()


def _scale_for(cfg: dict[str, Any], module: str, rank: int) -> float:
    alpha = cfg.get("lora_alpha", 8)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            alpha = value
            break
    if cfg.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def load_adapter(directory: str | Path, device: str = "cpu") -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (edgefuse's or anyone's) into factored form."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EdgefuseError("adapter directory not found", path=directory)
    refuse_pickles(directory)
    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise EdgefuseError(f"not a PEFT adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})", path=directory)
    cfg = read_json(cfg_path)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise EdgefuseError(f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)", path=cfg_path)
    if cfg.get("use_dora"):
        raise EdgefuseError("DoRA adapters are not supported (magnitude vectors are not a low-rank update)", path=cfg_path)
    tensors = load_safetensors(w_path, device=device)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_" in key or "modules_to_save" in key:
                raise EdgefuseError(f"unsupported tensor {key!r} (only lora_A / lora_B weights)", path=w_path)
            continue
        parts.setdefault(m["module"], {})[m["which"]] = t
    modules: dict[str, LoraModule] = {}
    for name, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise EdgefuseError(f"module {name} has lora_{'A' if 'A' not in ab else 'B'} missing", path=w_path)
        A, B = ab["A"].float(), ab["B"].float()
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise EdgefuseError(f"module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not chain", path=w_path)
        if not all_finite(A, B):
            raise EdgefuseError(f"module {name} contains NaN or Inf", path=w_path)
        modules[name] = LoraModule(A, B, _scale_for(cfg, name, A.shape[0]))
    if not modules:
        raise EdgefuseError("adapter holds no LoRA tensors", path=w_path)
    manifest = read_json(directory / MANIFEST_FILE) if (directory / MANIFEST_FILE).is_file() else None
    return LoraAdapter(modules, cfg.get("base_model_name_or_path"), cfg, manifest, directory)


def peft_config_for(adapter: LoraAdapter, base_model: str | None = None) -> dict[str, Any]:
    """A PEFT LoraConfig dict whose per-module rank/alpha reproduce the factors exactly (scale 1)."""
    ranks = {name: m.rank for name, m in adapter.modules.items()}
    r = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or adapter.base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "target_modules": adapter.target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_adapter(
    adapter: LoraAdapter,
    directory: str | Path,
    manifest: dict[str, Any] | None = None,
    base_model: str | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a PEFT-loadable adapter (+ ``edgefuse.json`` with file hashes) atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in adapter.modules.items():
        f = mod.folded()
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.A.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = f.B.detach().float().contiguous().cpu()
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_FILE, peft_config_for(adapter, base_model))
        for fname, obj in (extra_files or {}).items():
            atomic_write_json(tmp / fname, obj)
        man = dict(manifest or adapter.manifest or {})
        man["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST_FILE}
        atomic_write_json(tmp / MANIFEST_FILE, man)
    return directory


def verify_hashes(directory: str | Path) -> None:
    """Check every file hash recorded in ``edgefuse.json``; raise on any mismatch."""
    directory = Path(directory)
    man = read_json(directory / MANIFEST_FILE)
    for fname, digest in (man.get("files") or {}).items():
        p = directory / fname
        if not p.is_file():
            raise EdgefuseError("file listed in manifest is missing", path=p)
        if sha256_file(p) != digest:
            raise EdgefuseError("sha256 does not match the manifest (file altered or corrupted)", path=p)
