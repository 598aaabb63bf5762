"""Retrieval of edge adapters for each request: cosine top-k over a pool's embeddings, then a mixture.

Method of LoraRetriever / RAMoLE (Zhao et al. 2024, "Retrieval-Augmented Mixture of LoRA Experts for
Uploadable Machine Learning"): embed the request, rank the pool's adapters by cosine similarity with
their vectors (`edgefuse.compose.embedding`), keep the top k and mix their outputs with weights 1/k (the
released RAMoLE code) or softmax(similarity / temperature) (`edgefuse.compose.mixture.top_k_weights`).
k = 1 is plain per-request adapter selection. Retrieval accuracy (the share of questions whose
own-domain adapter ranks first) says how well the router can do its job at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgefuse.adapters import LoraAdapter, MANIFEST_FILE, load_adapter
from edgefuse.artifacts import read_manifest
from edgefuse.compose.embedding import read_embedding
from edgefuse.compose.mixture import top_k_weights
from edgefuse.compose.schema import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, ROUTINGS, WEIGHTINGS
from edgefuse.errors import EdgefuseError


@dataclass(frozen=True)
class RetrievalSettings:
    """How a retrieval mixture is formed; the defaults come from `edgefuse.compose.schema` (the CLI passes what it is
    given, the study config's `MixtureSettings` has the same ones).

    ``routing`` matters on MMLU-CD only: ``instance`` retrieves one mixture from the whole prompt,
    ``segment`` one per ``Question j`` block, used by that block and its answer positions."""

    top_k: int = DEFAULT_TOP_K
    weighting: str = WEIGHTINGS[0]
    temperature: float = DEFAULT_TEMPERATURE
    routing: str = ROUTINGS[0]

    def check(self, pool_size: int | None = None) -> "RetrievalSettings":
        """One clear line for an impossible setting; with ``pool_size``, k must fit the pool."""
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise EdgefuseError(f"--top-k must be a positive integer, got {self.top_k!r}")
        if pool_size is not None and self.top_k > pool_size:
            raise EdgefuseError(f"--top-k {self.top_k} is larger than the pool of {pool_size} adapter"
                                f"{'s' if pool_size != 1 else ''}")
        if self.weighting not in WEIGHTINGS:
            raise EdgefuseError(f"unknown weighting {self.weighting!r}; use one of: {', '.join(WEIGHTINGS)}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise EdgefuseError(f"--temperature must be > 0, got {self.temperature!r}")
        if self.routing not in ROUTINGS:
            raise EdgefuseError(f"unknown routing {self.routing!r}; use one of: {', '.join(ROUTINGS)}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def given(cls, **values) -> "RetrievalSettings":
        """Settings from the values a caller set (None: keep the default)."""
        return cls(**{k: v for k, v in values.items() if v is not None})


@dataclass
class AdapterPool:
    """The adapters retrieval chooses from, with their names, domains (a domain, the list of an edge's domains, or
    None) and L2-normalised vectors (n, d)."""

    adapters: list[LoraAdapter]
    names: list[str]
    domains: list[str | list[str] | None]
    vectors: torch.Tensor

    def __len__(self) -> int:
        return len(self.adapters)

    @classmethod
    def of(cls, adapters: Sequence[LoraAdapter], names: Sequence[str] | None = None) -> "AdapterPool":
        """A pool from loaded adapters; each must carry an embedding, all of one dimension."""
        adapters = list(adapters)
        if not adapters:
            raise EdgefuseError("retrieval needs a pool of at least one adapter (--pool DIR DIR ...)")
        names = list(names) if names is not None else [
            str(a.path) if a.path is not None else f"adapter {j}" for j, a in enumerate(adapters)]
        vecs = [read_embedding(a.manifest, a.path if a.path is not None else names[j]) for j, a in enumerate(adapters)]
        dims = {v.shape[0] for v in vecs}
        if len(dims) != 1:
            j = next(j for j, v in enumerate(vecs) if v.shape[0] != vecs[0].shape[0])
            raise EdgefuseError(f"retrieval embedding has {vecs[j].shape[0]} dimensions, {names[0]}'s has "
                                f"{vecs[0].shape[0]}", path=names[j])
        stacked = torch.stack(vecs)
        return cls(adapters, names, [a.domain for a in adapters],
                   stacked / stacked.norm(dim=1, keepdim=True))


def pool_manifests(dirs: Sequence[str | Path]) -> list:
    """The manifests of a pool's directories, each checked for an embedding, before any model loads."""
    if not dirs:
        raise EdgefuseError("retrieval needs a pool of at least one adapter (--pool DIR DIR ...)")
    out = []
    for d in dirs:
        path = Path(d) / MANIFEST_FILE
        man = read_manifest(path) if path.is_file() else None
        read_embedding(man, Path(d))
        out.append(man)
    return out


def load_pool(dirs: Sequence[str | Path], model=None, *, force: bool = False) -> AdapterPool:
    """Read the pool's adapters (checked against ``model`` when given) and their embeddings."""
    pool_manifests(dirs)
    return AdapterPool.of([load_adapter(d, model, force=force) for d in dirs], [str(d) for d in dirs])


def similarities(queries: torch.Tensor, pool: AdapterPool) -> torch.Tensor:
    """(rows, pool size) cosine similarity of each query vector with each adapter's vector."""
    q = torch.as_tensor(queries, dtype=torch.float32)
    q = q.unsqueeze(0) if q.ndim == 1 else q
    if q.shape[1] != pool.vectors.shape[1]:
        raise EdgefuseError(f"query embeddings have {q.shape[1]} dimensions, the pool's {pool.vectors.shape[1]}")
    return (q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ pool.vectors.T


def retrieve(queries: torch.Tensor, pool: AdapterPool, settings: RetrievalSettings) -> torch.Tensor:
    """(rows, pool size) mixture weights: each query's top-k adapters, weighted as the settings say."""
    settings.check(len(pool))
    return top_k_weights(similarities(queries, pool), settings.top_k, settings.weighting, settings.temperature)
