"""Gram matrices of module inputs on disk: a directory of one safetensors file per domain plus ``grams.json``.

Why a checked, lazy store: a Gram matrix enters a solve (RegMean) or a ratio (interference), so a corrupt one
(wrong shape, NaN, not symmetric positive semi-definite) must be one line naming its file, never a silently
wrong fusion; and a model's full set is hundreds of MB per domain, so matrices are read one module at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from edgefuse.artifacts import GramDomain, GramsManifest
from edgefuse.data.taxonomy import normalise_subject
from edgefuse.errors import EdgefuseError
from edgefuse.io import atomic_dir, publish, safetensors_header, sha256_file

MANIFEST_FILE = "grams.json"
PSD_TOLERANCE = 1e-5  # a matrix passes when G + tol·max(diag G)·I has a Cholesky factor (float32 storage noise)


def check_gram(G: torch.Tensor, d_in: int | None, what: str, path: object) -> torch.Tensor:
    """``G`` as float64 after checking it is d_in × d_in, finite, symmetric and PSD (one `EdgefuseError` naming
    ``path`` and ``what`` otherwise)."""
    if G.ndim != 2 or G.shape[0] != G.shape[1] or (d_in is not None and G.shape[0] != d_in):
        want = "square" if d_in is None else f"{d_in} × {d_in}"
        raise EdgefuseError(f"Gram matrix of {what} has shape {list(G.shape)}, expected {want}", path=path)
    G = G.double()
    if not math.isfinite(float(G.sum())):  # a NaN or ±Inf anywhere makes the float64 sum non-finite (one pass)
        raise EdgefuseError(f"Gram matrix of {what} contains NaN or Inf", path=path)
    if G.numel() == 0:
        raise EdgefuseError(f"Gram matrix of {what} is empty", path=path)
    scale = float(G.diagonal().abs().max())
    if float((G - G.T).abs().max()) > PSD_TOLERANCE * max(scale, 1e-30):
        raise EdgefuseError(f"Gram matrix of {what} is not symmetric", path=path)
    jitter = PSD_TOLERANCE * scale + 1e-300
    shifted = G.clone()
    shifted.diagonal().add_(jitter)
    _, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0 or float(G.diagonal().min()) < -jitter:
        raise EdgefuseError(f"Gram matrix of {what} is not positive semi-definite", path=path)
    return G


def check_upload(mats: Mapping[str, torch.Tensor], aliases: Mapping[str, str], counts: Mapping[str, object],
                 layout: tuple[dict[str, str], dict[str, int]], path: object) -> None:
    """Gram matrices an edge sent (``interference.source: edges``) against the base model's ``layout``
    (`edgefuse.interference.collect.gram_layout`): the same modules sharing the same inputs, one matrix per input,
    each d_in × d_in, finite, symmetric PSD, and positive ``counts`` (tokens, prompts). One `EdgefuseError` naming
    ``path``."""
    want_aliases, widths = layout
    if dict(aliases) != dict(want_aliases):
        diff = sorted(set(aliases.items()) ^ set(want_aliases.items()))
        raise EdgefuseError(f"Gram matrices do not follow the base model's module layout ({len(diff)} entries "
                            f"differ, first {diff[0][0]} → {diff[0][1]})", path=path)
    if set(mats) != set(widths):
        extra, missing = sorted(set(mats) - set(widths)), sorted(set(widths) - set(mats))
        raise EdgefuseError(f"Gram matrices: unexpected {extra[:3]}, missing {missing[:3]}", path=path)
    for what, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise EdgefuseError(f"Gram matrices: {what} count {n!r} is not a positive integer", path=path)
    for key in sorted(mats):
        check_gram(mats[key], widths[key], f"module {key}", path)


class DomainGrams(Mapping):
    """One domain's Gram matrices, module name → checked float64 d_in × d_in tensor, read on access.

    ``per_token`` divides by the token count (the mean second moment), so domains weigh alike in RegMean
    whatever text each had."""

    def __init__(self, domain: str, path: Path, modules: dict[str, str], tokens: int, per_token: bool = False):
        self.domain, self.path, self.tokens = domain, path, tokens
        self._modules = modules
        self._per_token = per_token
        self._cache: dict[str, torch.Tensor] = {}
        self._checked: set[str] = set()
        self._header = safetensors_header(path)
        missing = sorted({k for k in modules.values()} - set(self._header))
        if missing:
            raise EdgefuseError(f"lacks the Gram matrix {missing[0]!r} that {MANIFEST_FILE} lists", path=path)

    def per_token(self) -> "DomainGrams":
        return DomainGrams(self.domain, self.path, self._modules, self.tokens, per_token=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get_checked(name, None)

    def get_checked(self, name: str, d_in: int | None) -> torch.Tensor:
        """The module's Gram matrix, checked against the module's input width ``d_in`` when given (the full check
        runs once per stored matrix; later reads only re-check the shape)."""
        from safetensors import safe_open

        key = self._modules[name]
        what = f"module {name}" if key == name else f"module {name} (stored as {key})"
        G = self._cache.get(key)
        if G is None:  # q/k/v and gate/up share a key: read it once while they are fused
            with safe_open(str(self.path), framework="pt") as f:
                G = f.get_tensor(key)
            G = G.double() if key in self._checked else check_gram(G, None, what, self.path)
            self._checked.add(key)
            self._cache = {**dict(list(self._cache.items())[-3:]), key: G}
        if d_in is not None and G.shape[0] != d_in:
            check_gram(G, d_in, what, self.path)
        return G / self.tokens if self._per_token else G

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


class GramSet:
    """A Gram directory: its manifest and each domain's matrices."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise EdgefuseError("Gram directory not found (make one with edgefuse grams)", path=self.dir)
        self.manifest = GramsManifest.read(self.dir / MANIFEST_FILE)

    @property
    def domains(self) -> list[str]:
        return list(self.manifest.domains)

    def domain(self, name: str) -> DomainGrams:
        d = self.manifest.domains.get(name)
        if d is None:
            raise EdgefuseError(f"has no Gram matrices for domain {name!r} (it has {', '.join(self.domains)})",
                                path=self.dir / MANIFEST_FILE)
        return DomainGrams(name, self.dir / d.file, self.manifest.modules, d.tokens)

    def for_adapters(self, adapters) -> list[DomainGrams]:
        """Each adapter's domain's matrices: matched by the domain its manifest records, else — when no adapter
        records one — by position (the k-th adapter is the k-th domain)."""
        named = [a.domain for a in adapters]
        if all(named):
            return [self.domain(d) for d in named]
        if any(named) or len(adapters) != len(self.domains):
            raise EdgefuseError(
                f"cannot tell which domain each adapter belongs to: {sum(map(bool, named))} of {len(adapters)} "
                f"adapters record a domain and the directory has {len(self.domains)} domains",
                path=self.dir / MANIFEST_FILE,
            )
        return [self.domain(d) for d in self.domains]


def save_grams(out: str | Path, manifest_fields: dict, grams: dict[str, dict[str, torch.Tensor]],
               tokens: dict[str, int], prompts: dict[str, int], modules: dict[str, str], force: bool = False,
               dtype: torch.dtype = torch.float32) -> GramsManifest:
    """Write every domain's matrices and the manifest at once (`atomic_dir`: all or nothing)."""
    with atomic_dir(out, overwrite=force) as tmp:
        domains = {d: save_domain(tmp, d, mats, tokens[d], prompts[d], dtype) for d, mats in grams.items()}
        return write_manifest(tmp, manifest_fields, modules, domains, dtype)


def save_domain(directory: Path, domain: str, mats: dict[str, torch.Tensor], tokens: int, prompts: int,
                dtype: torch.dtype = torch.float32) -> GramDomain:
    """One domain's matrices as ``<domain>.safetensors`` in ``directory`` (one at a time: a study's many domains
    need not all sit in memory); its manifest entry."""
    from safetensors.torch import save_file

    file = f"{normalise_subject(domain)}.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in mats.items()}, str(Path(directory) / file))
    publish(Path(directory) / file)  # safetensors >= 0.8 leaves it 0600 (its own temporary file)
    return GramDomain(file=file, sha256=sha256_file(Path(directory) / file), tokens=tokens, prompts=prompts)


def write_manifest(directory: Path, manifest_fields: dict, modules: dict[str, str], domains: dict[str, GramDomain],
                   dtype: torch.dtype = torch.float32) -> GramsManifest:
    """``grams.json`` over the domain files already in ``directory``."""
    name = "float32" if dtype == torch.float32 else "float64"
    manifest = GramsManifest(**manifest_fields, dtype=name, modules=modules, domains=domains)
    manifest.write(Path(directory) / MANIFEST_FILE)
    return manifest
