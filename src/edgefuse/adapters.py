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

from edgefuse.artifacts import ExternalAdapterManifest, Manifest, parse_manifest
from edgefuse.errors import EdgefuseError
from edgefuse.io import (
    atomic_dir,
    atomic_write_json,
    load_safetensors,
    read_json,
    refuse_pickles,
    safetensors_header,
    sha256_file,
)

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
    manifest: Manifest | None = None
    path: Path | None = None

    @property
    def domain(self) -> str | None:
        """The MMLU domain its edge trained on, when its manifest says (edge packages, recovered adapters)."""
        return getattr(self.manifest, "domain", None)

    @property
    def base_fingerprint(self) -> str | None:
        """The fingerprint of the base model it was made for, when its manifest records one."""
        return getattr(self.manifest, "base_fingerprint", None)

    @property
    def target_modules(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    def delta(self, name: str) -> torch.Tensor:
        return self.modules[name].delta()


# PEFT's LoraConfig defaults, for configs that leave r or lora_alpha out
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
MAX_RANK = 8192
"""Largest LoRA rank the reader accepts: the full rank of a 70B-class model's hidden size. A config above it is a
typo or an attack, refused before PEFT would allocate r × in for every module."""


@dataclass(frozen=True)
class ModelShapes:
    """What an adapter is checked against: a model's name, fingerprint and (out, in) of each linear layer by name.

    Why a description instead of the model: the reader needs nothing more, it is computed once for K adapters
    (``fuse --model``), and a caller that knows a model only by its shapes (e.g. from a plan) can build one.
    """

    name: str
    shapes: dict[str, tuple[int, int]]
    fingerprint: str | None = None

    @classmethod
    def of(cls, model) -> "ModelShapes":
        """From a loaded transformers model (nn.Linear, or GPT-2's Conv1D whose weight is stored (in, out))."""
        from edgefuse.models import fingerprint, linear_shapes  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)

        name = str(getattr(model.config, "name_or_path", "") or "the model")
        return cls(name, linear_shapes(model), fingerprint(model))

    @classmethod
    def of_spec(cls, spec: str) -> "ModelShapes":
        """From a model spec's config alone (no weights, so no fingerprint); `EdgefuseError` when its config is not
        at hand offline (`edgefuse.models.architecture_shapes`)."""
        from edgefuse.models import architecture_shapes  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)

        return cls(spec, architecture_shapes(spec))


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches a dotted suffix of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_rank(cfg: dict[str, Any], module: str) -> int:
    return _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", PEFT_DEFAULT_R))


def _scale_for(cfg: dict[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    if cfg.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_rank_value(value: Any, what: str, path: Path) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EdgefuseError(f"{what} must be a positive integer, got {value!r}", path=path)
    if value > MAX_RANK:
        raise EdgefuseError(f"{what} = {value} is absurd (the reader accepts LoRA ranks up to {MAX_RANK})", path=path)


def _check_patterns(cfg: dict[str, Any], key: str, check_value, path: Path) -> None:
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise EdgefuseError(f"{key} must map module patterns to values", path=path)
    for pattern, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error:
            raise EdgefuseError(f"{key} key {pattern!r} is not a regular expression", path=path) from None
        check_value(value, f"{key}[{pattern!r}]", path)


def _check_alpha_value(value: Any, what: str, path: Path) -> None:
    if not _is_number(value):
        raise EdgefuseError(f"{what} must be a finite number, got {value!r}", path=path)


def _read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA this reader can represent exactly: type, DoRA, ranks and alphas checked."""
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise EdgefuseError("adapter config is not a JSON object", path=path)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise EdgefuseError(f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)", path=path)
    if cfg.get("use_dora"):
        raise EdgefuseError("DoRA adapters are not supported (magnitude vectors are not a low-rank update)", path=path)
    _check_rank_value(cfg.get("r", PEFT_DEFAULT_R), "r", path)
    _check_alpha_value(cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha", path)
    _check_patterns(cfg, "rank_pattern", _check_rank_value, path)
    _check_patterns(cfg, "alpha_pattern", _check_alpha_value, path)
    return cfg


def _read_manifest(directory: Path) -> Manifest | None:
    """``edgefuse.json`` when present, its listed files' names and hashes verified first (tampering wins)."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise EdgefuseError("manifest is not a JSON object", path=path)
    _verify_files(directory, raw.get("files"))
    return parse_manifest(raw, path)


def _lora_keys(header: dict[str, dict[str, Any]], path: Path) -> dict[str, dict[str, str]]:
    """Module name → {"A": tensor key, "B": tensor key}, from the header alone; only plain LoRA tensors allowed."""
    parts: dict[str, dict[str, str]] = {}
    for key in sorted(header):
        m = _KEY.match(key)
        if m is None:
            if "lora_" in key or "modules_to_save" in key:
                raise EdgefuseError(f"unsupported tensor {key!r} (only lora_A / lora_B weights)", path=path)
            continue
        if m["which"] in parts.setdefault(m["module"], {}):
            raise EdgefuseError(f"module {m['module']} has two lora_{m['which']} tensors", path=path)
        parts[m["module"]][m["which"]] = key
    if not parts:
        raise EdgefuseError("adapter holds no LoRA tensors", path=path)
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise EdgefuseError(f"module {name} has lora_{'A' if 'A' not in ab else 'B'} missing", path=path)
        a, b = header[ab["A"]]["shape"], header[ab["B"]]["shape"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise EdgefuseError(f"module {name}: lora_A {tuple(a)} and lora_B {tuple(b)} do not chain", path=path)
    return parts


def _check_ranks(cfg: dict[str, Any], header: dict, keys: dict[str, dict[str, str]], path: Path) -> None:
    """Each module's tensor rank is the one its config gives (r or rank_pattern): else PEFT's alpha/r scale is wrong."""
    for name, ab in keys.items():
        got, want = header[ab["A"]]["shape"][0], _module_rank(cfg, name)
        if got != want:
            raise EdgefuseError(f"module {name} has rank {got}, {CONFIG_FILE} gives r = {want} (its alpha/r scale "
                                "would be wrong)", path=path)


def _check_model(manifest: Manifest | None, header: dict, keys: dict[str, dict[str, str]], model: ModelShapes,
                 directory: Path, force: bool) -> None:
    """The adapter fits ``model``: same recorded base fingerprint (unless forced), existing targets, equal shapes."""
    want = getattr(manifest, "base_fingerprint", None)
    if want and model.fingerprint and want != model.fingerprint and not force:
        raise EdgefuseError(f"adapter was made for base model {want}, not {model.fingerprint}",
                            path=directory / MANIFEST_FILE)
    for name, ab in keys.items():
        _check_target(name, (header[ab["B"]]["shape"][0], header[ab["A"]]["shape"][1]), model, directory / WEIGHTS_FILE)


def _check_target(name: str, shape: tuple[int, int], model: ModelShapes, path: Path | str) -> None:
    """Module ``name`` of shape (out, in) is a linear layer of ``model`` with that shape."""
    have = model.shapes.get(name)
    if have is None:
        raise EdgefuseError(f"module {name} is not a linear layer of {model.name}", path=path)
    if tuple(shape) != tuple(have):
        raise EdgefuseError(f"module {name} is {shape[0]}×{shape[1]}, {model.name} has {have[0]}×{have[1]}", path=path)


def check_targets(adapter: "LoraAdapter", model: ModelShapes) -> None:
    """Every module of an adapter already read is a linear layer of ``model`` with its shape: the reader's target
    check (`load_adapter` with a model), for callers that learn the model only from the adapter itself."""
    path = adapter.path / WEIGHTS_FILE if adapter.path is not None else "adapter in memory"
    for name, mod in adapter.modules.items():
        _check_target(name, mod.shape, model, path)


def _factors(tensors: dict[str, torch.Tensor], keys: dict[str, dict[str, str]], cfg: dict[str, Any],
             path: Path) -> dict[str, LoraModule]:
    modules = {}
    for name, ab in sorted(keys.items()):
        A, B = tensors[ab["A"]].float(), tensors[ab["B"]].float()
        if not all_finite(A, B):
            raise EdgefuseError(f"module {name} contains NaN or Inf", path=path)
        modules[name] = LoraModule(A, B, _scale_for(cfg, name, A.shape[0]))
    return modules


def _adapter_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise EdgefuseError("adapter directory not found", path=directory)
    refuse_pickles(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise EdgefuseError(f"not a PEFT adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})", path=directory)
    return directory


def load_adapter(directory: str | Path, model=None, *, force: bool = False, device: str = "cpu") -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (edgefuse's or anyone's) into factored form, refusing anything unsound.

    The one reader of adapters: every command and stage reads through it, so each refuses the same inputs with
    the same line. In order: pickles; the manifest's file names and hashes; the config (LoRA only, no DoRA, sane
    ranks and alphas); the safetensors header against the file size; tensor ranks against the config; with
    ``model`` (a loaded model or a `ModelShapes`) the base fingerprint (skipped with ``force``), target names and
    shapes; only then the tensors are loaded and checked for NaN/Inf. Nothing large is allocated before the
    header has shown the file holds what it claims.
    """
    directory = _adapter_dir(directory)
    w_path = directory / WEIGHTS_FILE
    manifest = _read_manifest(directory)
    cfg = _read_config(directory / CONFIG_FILE)
    header = safetensors_header(w_path)
    keys = _lora_keys(header, w_path)
    _check_ranks(cfg, header, keys, w_path)
    if model is not None:
        target = model if isinstance(model, ModelShapes) else ModelShapes.of(model)
        _check_model(manifest, header, keys, target, directory, force)
    modules = _factors(load_safetensors(w_path, device=device), keys, cfg, w_path)
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
    manifest: Manifest | None = None,
    base_model: str | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a PEFT-loadable adapter (+ ``edgefuse.json`` with file hashes) atomically.

    ``manifest`` (default: the adapter's own, or an external-adapter note) gets the files' hashes."""
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
        man = manifest or adapter.manifest or ExternalAdapterManifest()
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST_FILE}
        man.model_copy(update={"files": files}).write(tmp / MANIFEST_FILE)
    return directory


def _listed_file(directory: Path, name: Any, manifest_path: Path) -> Path:
    """The path of a file the manifest lists, refused when the name leaves the directory (``../``, absolute, symlink)."""
    rel = Path(str(name))
    if not isinstance(name, str) or not name or rel.is_absolute() or ".." in rel.parts:
        raise EdgefuseError(f"manifest lists file {name!r}, a path outside the package directory", path=manifest_path)
    p = directory / rel
    if not p.resolve().is_relative_to(directory.resolve()):
        raise EdgefuseError(f"manifest lists file {name!r}, a symlink to {p.resolve()} outside the package directory",
                            path=manifest_path)
    return p


def verify_hashes(directory: str | Path) -> None:
    """Check every file recorded in ``edgefuse.json``: its name stays inside the directory and its sha256 matches."""
    directory = Path(directory)
    man = read_json(directory / MANIFEST_FILE)
    _verify_files(directory, man.get("files") if isinstance(man, dict) else None)


def _verify_files(directory: Path, files: Any) -> None:
    """Before the manifest's own fields are believed: the files it lists are inside ``directory`` and intact."""
    man_path = directory / MANIFEST_FILE
    if files is not None and not isinstance(files, dict):
        raise EdgefuseError("manifest 'files' must map file names to sha256 digests", path=man_path)
    for fname, digest in (files or {}).items():
        p = _listed_file(directory, fname, man_path)
        if not p.is_file():
            raise EdgefuseError("file listed in manifest is missing", path=p)
        if sha256_file(p) != digest:
            raise EdgefuseError("sha256 does not match the manifest (file altered or corrupted)", path=p)


def _natural_key(name: str) -> list:
    """Sort ``layers.10`` after ``layers.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def module_names(adapters) -> list[str]:
    """Union of the adapters' module names in natural order (here, below fusion and interference, so both use it
    without importing each other)."""
    return sorted({n for a in adapters for n in a.modules}, key=_natural_key)
