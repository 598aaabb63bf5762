"""The study's dynamic-composition stages (issue 13), next to the static fusions and evaluated the same way.

  per edge ``embed``: the adapter's retrieval vector, the mean MiniLM embedding of the edge's own training examples
  (what a real edge computes and sends, `edgefuse.compose.embedding.edge_embedding`); kept in its own stage, so the
  train stage and its cache key stay as they were;
  ``lorahub-<tag>`` (kind fuse): LoraHub weights (Huang et al. 2023) learned on a few public-split examples, written
  as a fused adapter, then ``eval-lorahub-<tag>`` as any fused model;
  retrieval mixtures (LoraRetriever / RAMoLE, Zhao et al. 2024): ``eval-<retrieval>-mmlu-<tag>`` once per way of
  forming a request's mixture (k, weighting, temperature: routing does not matter for single questions), and
  ``eval-<name>-cd-<tag>`` per configured mixture for MMLU-CD, routed per instance or per question segment, and
  ``eval-<retrieval>-<task>-<tag>`` for each configured task that is scored under mixtures (`edgefuse.tasks`).

They run on the last round's recovered edge adapters, in the order `edgefuse.runner.plan.composition_plan` lists them
(one function per step, called by `edgefuse.runner.walk`). Every stage's ``inputs`` is its cache key, as everywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgefuse.adapters import load_adapter
from edgefuse.artifacts import ExternalAdapterManifest, read_manifest
from edgefuse.assets import MINILM_DIST, MINILM_VERSION
from edgefuse.compose.embedding import EMBEDDING_KEY, ENCODER_NAME, edge_embedding
from edgefuse.compose.lorahub import lorahub, save_lorahub
from edgefuse.compose.retrieval import AdapterPool, RetrievalSettings
from edgefuse.compose.schema import LORAHUB_NAME, MixtureSettings
from edgefuse.data.mmlu import select
from edgefuse.evaluate.retrieval import evaluate_mmlu_cd_retrieval, evaluate_mmlu_retrieval
from edgefuse.io import atomic_write_json, hash_obj, read_json, sha256_file
from edgefuse.runner.plan import StageSpec
from edgefuse.runner.stages import adapter_keys, eval_inputs, precision_inputs
from edgefuse.runner.study import Study
from edgefuse.tasks.base import EvalContext
from edgefuse.tasks.mmlu import mmlu_summary
from edgefuse.tasks.mmlu_cd import cd_key, cd_summary

log = logging.getLogger("edgefuse.run")

EMBED_FILE = "embedding.json"


def embedding_inputs(st: Study, edge: str) -> dict:
    return {"data": st.data_inputs(), "edge": edge, "domains": st.cfg.edges[edge],
            "embedding": st.cfg.compose.embedding.model_dump(), "encoder": f"{ENCODER_NAME} {MINILM_DIST}=={MINILM_VERSION}"}


def stage_embed(st: Study, spec: StageSpec) -> None:
    """One edge's retrieval embedding record (when the study has retrieval mixtures), into ``st.embeddings``."""
    e, domains = st.cfg.compose.embedding, st.cfg.edges[spec.edge]

    def run(work: Path, advance) -> dict:
        record = edge_embedding(st.items_of("edge", domains), e.examples, e.seed,
                                source=f"MMLU edge split of {', '.join(domains)}")
        atomic_write_json(work / EMBED_FILE, record)
        return {"file": EMBED_FILE, "n_examples": record["n_examples"]}

    out, res = st.stage(spec, embedding_inputs(st, spec.edge), run)
    st.embeddings[spec.edge] = read_json(out / res["file"])


def lorahub_settings(st: Study, seed: int) -> dict:
    """The study's LoraHub settings with the defaults that follow the study filled in (objective, seed)."""
    lh = st.cfg.compose.lorahub
    return lh.model_dump() | {"objective": lh.objective or st.cfg.benchmarks.format,
                              "seed": seed if lh.seed is None else lh.seed}


def lorahub_items(st: Study, domains: list[str], settings: dict) -> list:
    """The public-split examples LoraHub learns on: a seeded stratified sample of the edges' domains."""
    return select(st.dataset, "public", domains, None, settings["examples"], settings["seed"], st.split_spec)


def _domains(edges: list[dict]) -> list[str]:
    return list(dict.fromkeys(d for e in edges for d in e["domains"]))


def stage_lorahub(st: Study, spec: StageSpec, edges: list[dict]) -> tuple[Path, dict]:
    """LoraHub weights over the edge adapters → a fused adapter (kind fuse; evaluated as any fused model by the next
    stage); (the adapter's directory, its record for results.json without the evaluation)."""
    seed = spec.seed
    settings = lorahub_settings(st, seed)
    domains = _domains(edges)
    b = st.cfg.benchmarks
    inputs = {"adapters": adapter_keys(edges), "lorahub": settings, "data": st.data_inputs(),
              "domains": domains, "seq": st.cfg.training.seq, "batch_size": b.batch_size, **precision_inputs(st)}

    def run(work: Path, advance) -> dict:
        items = lorahub_items(st, domains, settings)
        adapters = [load_adapter(e["adapter"], st.model) for e in edges]
        res = lorahub(st.model, st.tokenizer, adapters, items, objective=settings["objective"],
                      budget=settings["budget"], method=settings["method"], start=settings["start"],
                      seed=settings["seed"], seq=st.cfg.training.seq, batch_size=b.batch_size,
                      device=next(st.model.parameters()).device, progress=advance)
        res.settings.update({"domains": domains, "model": st.cfg.model})
        names = {a.base_model for a in adapters if a.base_model}
        save_lorahub(res, work / "fused", base_model=next(iter(names)) if len(names) == 1 else None,
                     inputs=[{"edge": e["edge"], "domains": e["domains"], "adapter": key}
                             for e, key in zip(edges, adapter_keys(edges))], base_fingerprint=st.base_fingerprint)
        return {"dir": "fused", "lorahub": {"weights": res.weights, "edges": [e["edge"] for e in edges],
                                            "loss": res.loss, "objective": res.objective, "start_loss": res.start_loss,
                                            "start_objective": res.start_objective, "evaluations": len(res.trace),
                                            "examples": len(items)}}

    fdir, fres = st.stage(spec, inputs, run, total=settings["budget"] + 1)
    adapter = fdir / fres["dir"]
    return adapter, {"name": LORAHUB_NAME, "kind": "lorahub", "seed": seed, "round": spec.round,
                     "adapter": str(adapter), "settings": settings, "lorahub": fres["lorahub"]}


def edge_vector(st: Study, edge: dict) -> dict:
    """An edge adapter's retrieval embedding record: the one its edge sent in the manifest (a Flower edge does,
    `edgefuse.federated.edge.embed_package`; recovery keeps it), else its ``embed`` stage's."""
    return read_manifest(Path(edge["adapter"]) / "edgefuse.json").embedding or st.embeddings[edge["edge"]]


def mixture_pool(st: Study, edges: list[dict]):
    """The retrieval pool: each edge's recovered adapter with its retrieval vector (`edge_vector`), named by edge."""
    adapters = []
    for e in edges:
        a = load_adapter(e["adapter"], st.model)
        a.manifest = (a.manifest or ExternalAdapterManifest()).model_copy(update={EMBEDDING_KEY: edge_vector(st, e)})
        adapters.append(a)
    pool = AdapterPool.of(adapters, [e["edge"] for e in edges])
    pool.domains = [list(e["domains"]) for e in edges]
    return pool


def _retrieval(mix: MixtureSettings, routing: str | None = None):
    return RetrievalSettings(top_k=mix.k, weighting=mix.weighting, temperature=mix.temperature,
                             routing=routing or mix.routing)


def retrieval_key(mix: MixtureSettings) -> dict:
    """How a request's mixture is formed, and nothing else (no routing; no temperature for uniform weights)."""
    return {"top_k": mix.k, "weighting": mix.weighting} | (
        {"temperature": mix.temperature} if mix.weighting == "softmax" else {})


def mixture_inputs(st: Study, edges: list[dict]) -> dict:
    """What every mixture evaluation depends on besides its settings: the benchmarks, the adapters and vectors."""
    return {"eval": eval_inputs(st), "adapters": [sha256_file(Path(e["adapter"]) / "adapter_model.safetensors")
                                                  for e in edges],
            "edges": [e["edge"] for e in edges], "embeddings": [hash_obj(edge_vector(st, e)) for e in edges]}


class MixtureRuns:
    """One seed's retrieval mixtures over its last round's delivered edges: the adapter pool (built when first
    needed), what every mixture evaluation's key shares, and each evaluation's result as its stage ran."""

    def __init__(self, st: Study, edges: list[dict]):
        self.st, self.edges = st, edges
        self._pool, self._common = None, None
        self.mmlu: dict[str, dict] = {}  # retrieval tag → MMLU stage result
        self.cd: dict[str, dict] = {}  # mixture name → MMLU-CD summaries by key
        self.tasks: dict[tuple[str, str], dict] = {}  # (retrieval tag, task) → summaries by key

    def fits(self, mix: MixtureSettings) -> bool:
        return mix.k <= len(self.edges)

    def pool(self):
        self._pool = self._pool or mixture_pool(self.st, self.edges)
        return self._pool

    def common(self) -> dict:
        self._common = self._common or mixture_inputs(self.st, self.edges)
        return self._common

    def records(self, seed: int, round_no: int) -> tuple[list[dict], dict | None]:
        """The mixtures' records for results.json in config order, and the retrieval accuracy on the MMLU test
        questions (None without a mixture on MMLU); a mixture with more adapters than delivered edges is left out."""
        b = self.st.cfg.benchmarks
        records, accuracy = [], None
        for mix in self.st.cfg.compose.retrieval_mixture:
            if not self.fits(mix):
                log.warning("retrieval mixture %s left out: k = %d, but only %d edge adapters delivered",
                            mix.name, mix.k, len(self.edges))
                continue
            ev: dict[str, Any] = {"label": mix.name, "format": b.format, "metric": b.headline_metric}
            if mix.retrieval_tag in self.mmlu:
                ev["mmlu"] = self.mmlu[mix.retrieval_tag]["mmlu"]
                accuracy = accuracy or self.mmlu[mix.retrieval_tag]["retrieval"]["accuracy"]
            ev |= self.cd.get(mix.name, {})
            for task in (t for t in self.st.tasks if t.mixture):
                ev |= self.tasks[(mix.retrieval_tag, task.name)]
            records.append({"name": mix.name, "kind": "retrieval-mixture", "seed": seed, "round": round_no,
                            "settings": mix.model_dump(), "eval": ev})
        return records, accuracy


def stage_mixture_mmlu(st: Study, spec: StageSpec, runs: MixtureRuns) -> None:
    """MMLU under a way of forming each question's mixture (shared by the mixtures that form them alike)."""
    b, mix = st.cfg.benchmarks, spec.mixture
    rtag = mix.retrieval_tag

    def run_mmlu(work: Path, advance) -> dict:
        res = evaluate_mmlu_retrieval(
            st.model, st.tokenizer, st.mmlu_items, runs.pool(), _retrieval(mix, "instance"),
            shots=b.mmlu.shots, public=st.items_of("public") if b.mmlu.shots else (), fmt=b.format,
            batch_size=b.batch_size, progress=advance, meta={"label": rtag})
        atomic_write_json(work / "mmlu.json", res)
        return {"mmlu": mmlu_summary(st, res), "retrieval": res["retrieval"]}

    inputs = runs.common() | {"retrieval": retrieval_key(mix)}
    _, runs.mmlu[rtag] = st.stage(spec, inputs, run_mmlu, total=len(st.mmlu_items))


def stage_mixture_cd(st: Study, spec: StageSpec, runs: MixtureRuns) -> None:
    """MMLU-CD under one mixture, routed per instance or per question segment."""
    b, mix = st.cfg.benchmarks, spec.mixture

    def run_cd(work: Path, advance) -> dict:
        out = {}
        for k, doc in st.cd_docs.items():
            res = evaluate_mmlu_cd_retrieval(
                st.model, st.tokenizer, doc, st.dataset, runs.pool(), _retrieval(mix), fmt=b.format,
                metric=b.headline_metric, batch_size=b.batch_size, single=b.mmlu_cd.single, progress=advance,
                meta={"label": mix.name})
            atomic_write_json(work / f"mmlu_cd_k{k}.json", res)
            out[cd_key(k)] = cd_summary(res, k)
        return out

    _, runs.cd[mix.name] = st.stage(spec, runs.common() | {"retrieval": _retrieval(mix).as_dict()},
                                    run_cd, total=sum(len(d["instances"]) for d in st.cd_docs.values()))


def stage_mixture_task(st: Study, spec: StageSpec, runs: MixtureRuns) -> None:
    """A configured task under a way of forming each question's mixture, routed per question as MMLU."""
    mix, task = spec.mixture, st.task(spec.task)

    def run_task(work: Path, advance) -> dict:
        return task.evaluate_mixture(st, runs.pool(), _retrieval(mix, "instance"),
                                     EvalContext(work, advance, mix.retrieval_tag))

    _, runs.tasks[(mix.retrieval_tag, task.name)] = st.stage(
        spec, runs.common() | {"retrieval": retrieval_key(mix), "task": task.name}, run_task,
        total=task.units(st))
