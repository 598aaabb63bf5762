"""The edge's work for one job: rebuild the pruned model from the plan, train on local data, package.

Why here and not in the ClientApp: this is plain edgefuse (no Flower types), so it can be tested
directly and reused by any transport. The edge receives only the plan and a base-model reference;
it loads the base model itself, rebuilds the pruned model with `edgefuse.edge.plan.apply_plan`
and checks its fingerprint against the one the cloud pruned, so both sides train the very same
weights. Its training items come from its own copy of the data (``node_config["data"]``, default the
embedded MMLU) and the split settings in the job; they never leave the node. When the job asks for it
(``"embedding"``: the study has retrieval mixtures), the edge also computes its adapter's retrieval vector
from those items (`edgefuse.compose.embedding.edge_embedding`) and puts it in the package's manifest: one
averaged vector per adapter is all that leaves the node of its data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefuse.compose.embedding import edge_embedding, write_embedding
from edgefuse.compose.schema import EmbeddingSettings
from edgefuse.data.mmlu import SplitSpec, load_mmlu, select
from edgefuse.edge.plan import PruneResult, apply_masks, apply_plan, is_masked, save_pruned, validate_plan
from edgefuse.edge.train import TrainConfig, train_edge
from edgefuse.errors import EdgefuseError
from edgefuse.interference.collect import write_edge_grams
from edgefuse.interference.spec import EDGE_GRAMS_DIR, GramSpec
from edgefuse.models import fingerprint, load_model


def parse_domains(value: Any) -> list[str] | None:
    """Node config ``domains`` as a list: ``"stem,law"`` or ``"stem law"``."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [d for d in str(value).replace(",", " ").split() if d]


def rebuild_pruned(job: dict[str, Any], node_config: dict[str, Any], out_dir: Path, masks: dict | None = None,
                   with_base: Callable[[Any, Any], None] | None = None) -> Path:
    """Base model (node's ``model`` or the job's spec) + plan (+ masks for unstructured/2:4) → pruned
    directory, checked by fingerprint against the cloud's pruned model. ``with_base(model, tokenizer)`` runs on the
    checked base model before it is pruned (the edge's own Gram matrices)."""
    plan = validate_plan(job["plan"], "plan received from the cloud")
    if is_masked(plan) and not masks:
        raise EdgefuseError(f"a {plan['structure']} plan needs the weight masks, and the job carries none")
    spec = str(node_config.get("model") or job["model"])
    model, tok = load_model(spec, dtype=job.get("dtype"))
    fp = fingerprint(model)
    if fp != plan["base_fingerprint"]:
        raise EdgefuseError(f"this edge's base model {spec!r} has fingerprint {fp}, the plan was made for "
                            f"{plan['base_fingerprint']}")
    if with_base is not None:
        with_base(model, tok)
    pruned = apply_masks(model, plan, masks) if is_masked(plan) else apply_plan(model, plan)
    del model
    if job.get("pruned_fingerprint") and fingerprint(pruned) != job["pruned_fingerprint"]:
        raise EdgefuseError("the pruned model rebuilt from the plan differs from the cloud's (fingerprint)")
    return save_pruned(PruneResult(pruned, plan), tok, out_dir)


def local_items(job: dict[str, Any], domains: list[str], node_config: dict[str, Any]):
    """This edge's private training items: its own data, the job's split settings, its domains."""
    source = node_config.get("data") or "embedded"
    ds = load_mmlu(None if source == "embedded" else source)
    s = job["split"]
    spec = SplitSpec(seed=int(s["seed"]), public_per_subject=int(s["public_per_subject"]),
                     edge_fraction=float(s["edge_fraction"]))
    return select(ds, "edge", domains, None, None, spec.seed, spec)


def embed_package(package: Path, items, settings: dict[str, Any], domains: list[str]) -> dict[str, Any]:
    """This edge's retrieval vector, from its own training items, written into its package's manifest (which
    the upload carries whole; the file hashes do not cover the manifest, so the package stays valid)."""
    s = EmbeddingSettings.model_validate(settings)  # the study's settings; anything left out takes the defaults
    record = edge_embedding(items, s.examples, s.seed, source=f"the edge's own training examples ({', '.join(domains)})")
    write_embedding(package, record)
    return record


def run_job(job: dict[str, Any], node_config: dict[str, Any], work_dir: Path | None = None,
            progress: Callable[..., None] | None = None, start_dir: Path | None = None, masks: dict | None = None,
            ) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """Train the job's edge adapter (from ``start_dir`` in later rounds); returns (package dir, temp dir to
    clean up after uploading). When the job asks (``"grams"``), the edge's Gram matrices are written beside the
    package (`edgefuse.interference.spec.EDGE_GRAMS_DIR`)."""
    domains = parse_domains(node_config.get("domains")) or list(job["domains"])
    if sorted(domains) != sorted(job["domains"]):
        raise EdgefuseError(f"edge {job['edge']!r} holds domains {domains}, the study expects {job['domains']}")
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"edgefuse-edge-{job['edge']}-")
        work_dir = Path(tmp.name)
    try:
        items = local_items(job, domains, node_config)
        collect = None
        if job.get("grams") is not None:  # the study asks its edges for their own Gram matrices (opt-in)
            def collect(model, tok):
                spec = GramSpec(tokens=int(job["grams"]["tokens"]), per_prompt=int(job["grams"]["per_prompt"]))
                write_edge_grams(model, tok, items, spec, Path(work_dir) / EDGE_GRAMS_DIR, job["edge"], str(job["model"]),
                                 int(job["split"]["seed"]))
        pruned = rebuild_pruned(job, node_config, Path(work_dir) / "pruned", masks, with_base=collect)
        cfg = TrainConfig(**job["train"])
        package = train_edge(pruned, job["edge"], items, cfg, Path(work_dir) / "package",
                             progress=progress or (lambda *a, **k: None), init_dir=start_dir, dtype=job.get("dtype"))
        if job.get("embedding") is not None:
            embed_package(package, items, job["embedding"], domains)
        return package, tmp
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
