"""The study's interference stages (issue 22), present only when the study collects Gram matrices
(`edgefuse.config.StudyConfig.collects_grams`: a fusion method that needs them, such as regmean, or
``interference.enabled``).

  ``grams`` (kind grams, once per study): the base model over each edge's public-split prompts, one pass per edge,
  keeping G = HᵀH of every adapted module's inputs (`edgefuse.interference.collect`); its directory is what
  ``edgefuse grams`` writes, so fuse stages hand it to `edgefuse.fusion.fuse_dirs` as ``activations``;
  ``interference-<name>-<tag>`` (kind fuse, after each fuse stage): the fused model's deviation from each edge and
  the edges' interference ratios on each edge's inputs (`edgefuse.interference.metrics.interference`), kept apart
  from the fuse stage so that turning interference on leaves every existing fusion's key (and evaluation) as it was.

Every stage's ``inputs`` is its cache key, as everywhere.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

from edgefuse.adapters import load_adapter
from edgefuse.errors import EdgefuseError
from edgefuse.interference.collect import gram_matrices, manifest_fields, public_prompts, token_sequences
from edgefuse.interference.grams import MANIFEST_FILE, GramSet, save_domain, write_manifest
from edgefuse.interference.metrics import interference
from edgefuse.io import atomic_write_json, jsonable, sha256_file
from edgefuse.runner.plan import StageSpec
from edgefuse.runner.stages import adapter_keys, precision_inputs
from edgefuse.runner.study import Study

GRAMS_DIR = "grams"
STATS_FILE = "interference.json"


def grams_inputs(st: Study) -> dict:
    """The grams stage's key: the base model, the data split, how much text (GramSpec), each edge's domains."""
    spec = st.cfg.interference.spec(st.cfg.data.split_seed)
    return {"model": st.base_fingerprint, "data": st.data_inputs(), "grams": asdict(spec),
            "edges": st.cfg.edges, **precision_inputs(st)}


def stage_grams(st: Study, spec: StageSpec) -> None:
    """Collect every edge's Gram matrices (once per distinct set of domains) into one Gram directory, named in the
    manifest by edge (the domain each recovered adapter records); sets ``st.grams_dir`` and ``st.grams_hash``."""
    gram_spec = st.cfg.interference.spec(st.cfg.data.split_seed)
    edges = st.cfg.edges

    def run(work: Path, advance) -> dict:
        prompts = {e: public_prompts(st.dataset, d, gram_spec, st.split_spec) for e, d in edges.items()}  # all checked first
        out = work / GRAMS_DIR  # the stage's own work directory: finished (renamed) only once all is written
        out.mkdir()
        entries, aliases, done = {}, {}, {}
        for edge, domains in edges.items():  # one edge's matrices in memory at a time (~0.8 GB float64 on SmolLM2)
            key = tuple(domains)
            if key not in done:  # edges with the same domains share one pass
                seqs = token_sequences(st.tokenizer, prompts[edge], gram_spec.tokens, gram_spec.per_prompt)
                mats, aliases, n = gram_matrices(st.model, seqs)
                done[key] = save_domain(out, edge, mats, n, len(seqs))
                del mats
                entries[edge] = done[key]
            else:  # the same file under another edge's name
                entries[edge] = done[key].model_copy()
            advance()
        fields = manifest_fields(st.cfg.model, st.base_fingerprint, gram_spec.split, gram_spec.split_seed,
                                 gram_spec.per_prompt)
        return finish_dir(out, fields, aliases, entries)

    out, res = st.stage(spec, grams_inputs(st), run, total=len(edges))
    use_grams(st, out, res)


def finish_dir(out: Path, fields: dict, aliases: dict, entries: dict) -> dict:
    """Write the manifest of a grams stage's directory ``out`` over its domain files; the stage's result."""
    write_manifest(out, fields, aliases, entries)
    return {"dir": GRAMS_DIR, "sha256": sha256_file(out / MANIFEST_FILE),
            "tokens": {e: d.tokens for e, d in entries.items()},
            "prompts": {e: d.prompts for e, d in entries.items()}, "modules": len(aliases)}


def use_grams(st: Study, out: Path, res: dict, **extra) -> None:
    """Make a grams stage's directory the study's (``st.grams_dir``, its hash for the fuse keys, its summary for
    results.json): `stage_grams` and `stage_edge_grams` alike."""
    spec = st.cfg.interference.spec(st.cfg.data.split_seed)
    st.grams_dir, st.grams_hash = out / res["dir"], res["sha256"]
    st.grams_summary = {"tokens": res["tokens"], "prompts": res["prompts"], "modules": res["modules"],
                        "per_prompt": spec.per_prompt, "tokens_per_edge": spec.tokens, "sha256": res["sha256"],
                        **extra}


def stage_edge_grams(st: Study, spec: StageSpec, edges: list[dict]) -> None:
    """``interference.source: edges``: the Gram matrices each edge sent with its first-round package (checked on
    arrival) gathered into the study's Gram directory, one domain per delivered edge; sets ``st.grams_dir`` and
    ``st.grams_hash`` as `stage_grams` does, so fusions and interference read them the same way."""
    import os
    import shutil


    sources = {e["edge"]: Path(e["grams"]) for e in edges}
    inputs = {"edges": {name: sha256_file(d / MANIFEST_FILE) for name, d in sources.items()}}

    def run(work: Path, advance) -> dict:
        out = work / GRAMS_DIR
        out.mkdir()
        entries, aliases, fields = {}, None, None
        for edge, src in sources.items():
            gs = GramSet(src)
            entry = gs.manifest.domains[edge]
            if aliases is not None and gs.manifest.modules != aliases:
                raise EdgefuseError(f"edge {edge}'s Gram matrices follow another module layout", path=src)
            aliases = gs.manifest.modules
            fields = fields or gs.manifest.model_dump(include={"base_model", "base_fingerprint", "split", "split_seed",
                                                                "per_prompt"})
            try:  # the same bytes: a hard link where the file system allows it
                os.link(src / entry.file, out / entry.file)
            except OSError:
                shutil.copyfile(src / entry.file, out / entry.file)
            entries[edge] = entry
            advance()
        return finish_dir(out, fields, aliases, entries)

    out, res = st.stage(spec, inputs, run, total=len(sources))
    use_grams(st, out, res, source="edges")


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _argmax(pairs: list[tuple[str, float | None]]) -> tuple[float | None, str | None]:
    pairs = [(v, n) for n, v in pairs if v is not None]
    return max(pairs, key=lambda p: p[0]) if pairs else (None, None)


def summarize(stats: dict, edges: list[str]) -> list[dict]:
    """Per domain i: the pooled fused deviation, its median over modules and worst module; the worst other
    adapter's pooled ratio, and per module the worst ratio max_j≠i, as its median and its worst module."""
    mods, s = stats["modules"], stats["summary"]
    out = []
    for i, edge in enumerate(edges):
        worst = {n: max((r for j, r in enumerate(e["ratio"][i]) if j != i and r is not None), default=None)
                 for n, e in mods.items()}
        dev = {n: e["deviation"][i] for n, e in mods.items()}
        pooled, adapter = _argmax([(edges[j], r) for j, r in enumerate(s["ratio"][i]) if j != i])
        dmax, dmod = _argmax(list(dev.items()))
        rmax, rmod = _argmax(list(worst.items()))
        out.append({"domain": edge, "deviation": s["deviation"][i], "deviation_median": _median(list(dev.values())),
                    "deviation_max": dmax, "deviation_max_module": dmod, "ratio": pooled, "ratio_adapter": adapter,
                    "ratio_median": _median(list(worst.values())), "ratio_max": rmax, "ratio_max_module": rmod})
    return out


def stage_interference(st: Study, spec: StageSpec, edges: list[dict], fused_dir: Path) -> dict:
    """The interference of one fused adapter over its edges, on the study's Grams; its record for results.json."""
    names = [e["edge"] for e in edges]
    inputs = {"grams": st.grams_hash, "adapters": adapter_keys(edges),
              "fused": sha256_file(fused_dir / "adapter_model.safetensors")}

    def run(work: Path, advance) -> dict:
        adapters = [load_adapter(e["adapter"]) for e in edges]
        stats = interference(adapters, GramSet(st.grams_dir).for_adapters(adapters), load_adapter(fused_dir))
        stats["domains"] = names
        atomic_write_json(work / STATS_FILE, jsonable(stats), indent=None)
        return {"file": STATS_FILE, "modules": stats["summary"]["modules"], "ratio": stats["summary"]["ratio"],
                "domains": summarize(stats, names)}

    out, res = st.stage(spec, inputs, run)
    return {"name": spec.model, "seed": spec.seed, "round": spec.round, "edges": names, "modules": res["modules"],
            "ratio": res["ratio"], "domains": res["domains"], "file": str(out / res["file"])}


def interference_doc(st: Study) -> dict | None:
    """results.json's ``interference`` (`edgefuse.artifacts.StudyInterference`), None without a grams stage."""
    if st.grams_dir is None:
        return None
    return {"grams": st.grams_summary, "models": st.interference}
