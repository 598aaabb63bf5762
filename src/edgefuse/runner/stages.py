"""The study's stages, each a pure function over files cached by `StageCache` (through `Study.stage`): data, a
task's data, the base evaluation, prune, train (one round's edges in one dispatch), recover, an edge alone, fuse and
a fused model's evaluation. Each takes its `StageSpec` (name, and what it is about) from the study's plan
(`edgefuse.runner.plan`), which `edgefuse.runner.walk` runs in order; the stages before it hand over their outputs.
Every stage's ``inputs`` dict is its cache key: changing one (a key, a value's form) makes every existing run
directory redo that stage and all after it, so they stay exactly as they are (tests/test_pipeline_e2e.py,
``test_stage_keys_are_those_the_code_before_the_runner_package_wrote``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from edgefuse.adapters import load_adapter, save_adapter
from edgefuse.artifacts import EdgePackageManifest, RoundStartManifest
from edgefuse.data.choices import load_choice_file, with_files
from edgefuse.data.mmlu import load_mmlu, make_splits, select
from edgefuse.data.prompts import answered_prompt
from edgefuse.edge.plan import plan_hash, read_plan, save_pruned
from edgefuse.edge.prune import prune_model
from edgefuse.edge.recover import project_adapter, recover
from edgefuse.errors import EdgefuseError
from edgefuse.fusion import fuse_dirs
from edgefuse.fusion.registry import get_method
from edgefuse.interference.grams import MANIFEST_FILE as GRAMS_MANIFEST
from edgefuse.io import atomic_write_json, jsonable, read_json, sha256_file
from edgefuse.models import count_parameters
from edgefuse.peft_utils import apply_adapter
from edgefuse.runner.plan import StageSpec
from edgefuse.runner.study import Pending, Study
from edgefuse.runner.trainers import Trainer, TrainJob
from edgefuse.tasks.base import EvalContext, Task
from edgefuse.tasks.mmlu import mmlu_gold

log = logging.getLogger("edgefuse.run")


# ----------------------------------------------------------------------------------------------- stages
def stage_data(st: Study, spec: StageSpec) -> None:
    """The data and its splits (``splits.json``); then each task checks its own inputs (`Task.prepare`: a bad file
    fails here, before any model is evaluated)."""
    d = st.cfg.data
    mmlu = load_mmlu(d.mmlu_source)
    st.file_hashes = {name: sha256_file(f.path) for name, f in d.choices.items()}
    st.dataset = with_files(mmlu, {name: load_choice_file(f.path, f.fields, f.domain) for name, f in d.choices.items()})
    st.split_spec = d.split_spec()

    def run(work: Path, advance) -> dict:
        splits = make_splits(st.dataset, st.split_spec)
        atomic_write_json(work / "splits.json", splits, indent=None)
        return {k: len(v) for k, v in splits.items()} | {"skipped_rows": st.dataset.skipped}

    st.stage(spec, st.data_inputs(), run)
    m = st.cfg.benchmarks.mmlu
    # from MMLU alone: its splits are per subject, so the files' questions change none of them
    st.mmlu_items = select(mmlu, "test", m.domains, None, m.limit, d.split_seed, st.split_spec)
    for task in st.tasks:
        task.prepare(st)


def stage_task_data(st: Study, spec: StageSpec) -> None:
    """One of a task's data stages (MMLU-CD: the instance file of one k), as the task planned it."""
    st.task(spec.task).build_data(st, spec.data)


def evaluated_tasks(st: Study, cd: bool = True) -> list[Task]:
    """The tasks one model is evaluated on: all, or (``cd`` False: an edge alone without ``edges_alone_cd``) those
    that are not cross-domain."""
    return [t for t in st.tasks if cd or not t.cross_domain]


def evaluate_model(st: Study, model, work: Path, advance, label: str, cd: bool = True) -> dict:
    """Every task of the study (cross-domain ones unless ``cd`` is False) on one model; full results to files,
    summaries returned by results key.

    MMLU's summary ``accuracy`` and per-item ``correct`` are those of the study's headline metric
    (``benchmarks.metric``); a cloze evaluation also keeps both metrics under ``metrics``.
    """
    b = st.cfg.benchmarks
    summary: dict[str, Any] = {"label": label, "format": b.format, "metric": b.headline_metric}
    ctx = EvalContext(work, advance, label)
    for task in evaluated_tasks(st, cd):
        summary |= task.evaluate(st, model, ctx)
    return summary


def eval_stage(st: Study, spec: StageSpec, inputs: dict, fn, total: int | None) -> dict:
    """One evaluation stage (`Study.stage`, kind eval); its summary's MMLU part always carries the per-item gold
    scores (`edgefuse.evaluate.gold`), taken from the stage's own results file when the cached summary predates
    them, so a finished study gains them without evaluating again."""
    stage_dir, res = st.stage(spec, inputs, fn, total=total)
    mmlu = res.get("mmlu")
    if mmlu is not None and "gold" not in mmlu:
        file = stage_dir / mmlu.get("file", "mmlu.json")
        if file.is_file():
            res = {**res, "mmlu": {**mmlu, "gold": mmlu_gold(st, read_json(file))}}
    return res


def _eval_total(st: Study, cd: bool = True) -> int:
    return sum(t.units(st) for t in evaluated_tasks(st, cd))


def _with_adapter(st: Study, adapter_dir: Path, fn: Callable[[Any], dict]) -> dict:
    """Apply an adapter to the shared base model, run ``fn``, then remove the adapter again."""
    peft_model = apply_adapter(st.model, adapter_dir)
    try:
        return fn(peft_model)
    finally:
        st.model = peft_model.unload()
        st.model.eval()


def precision_inputs(st: Study) -> dict:
    """The device and dtype as stage inputs, only where they differ from the defaults: a default study's
    keys stay those it had before these settings existed, so its run directories keep their cache."""
    extra = st.precision.non_default()
    return {"precision": extra} if extra else {}


# Benchmark settings that say which models are evaluated, not how one is: held at their schema defaults in every
# evaluation's key, so that turning edge-alone evaluations on or off reuses the base and fused evaluations.
WHICH_MODELS = ("edges_alone", "edges_alone_cd")


def eval_inputs(st: Study) -> dict:
    """An evaluation's key: model, data, benchmark settings (``WHICH_MODELS`` at their defaults: held rather than
    dropped, so that the keys of studies that kept the defaults stay valid), MMLU-CD instances. An edge-alone
    evaluation's key adds ``edges_alone_cd`` itself (`stage_recover_eval`)."""
    b = st.cfg.benchmarks
    bench = b.model_dump() | {k: type(b).model_fields[k].default for k in WHICH_MODELS}
    tasks = {t.name: inputs for t in st.tasks if (inputs := t.key_inputs(st)) is not None}
    return {"model": st.base_fingerprint, "data": st.data_inputs(), "bench": bench,
            "cd": st.cd_hashes, **precision_inputs(st), **({"tasks": tasks} if tasks else {})}


def stage_base_eval(st: Study, spec: StageSpec) -> dict:
    return eval_stage(st, spec, eval_inputs(st),
                      lambda work, adv: evaluate_model(st, st.model, work, adv, "base"), total=_eval_total(st))


def train_config(st: Study, seed: int):
    return st.cfg.training.model_copy(update={"seed": seed})


def stage_prune(st: Study, spec: StageSpec) -> tuple[Path, dict, dict]:
    """Prune the base model for one edge; returns (pruned dir, result, stage inputs)."""
    edge, seed = spec.edge, spec.seed
    cfg, domains, p = st.cfg, st.cfg.edges[edge], st.cfg.pruning_for(edge)

    def run_prune(work: Path, advance) -> dict:
        calib = [answered_prompt(it) for it in st.items_of("public", domains)[: p.calib]]
        try:
            res = prune_model(st.model, st.tokenizer, method=p.method, structure=p.structure,
                              ratio=p.ratio if p.memory_budget_gib is None else None,
                              memory_budget_gib=p.memory_budget_gib, calib_prompts=calib or None,
                              train_cfg=train_config(st, seed), seed=seed)
        except EdgefuseError as e:  # which device's budget or settings are wrong
            raise EdgefuseError(f"edge {edge}: {e}") from None
        save_pruned(res, st.tokenizer, work / "pruned")
        return {"dir": "pruned", "ratio": res.plan.get("ratio"), "method": p.method, "structure": p.structure,
                "memory_budget_gib": p.memory_budget_gib, "params": count_parameters(res.model),
                "base_params": count_parameters(st.model), "estimate": jsonable(res.estimate)}

    inputs = {"model": st.base_fingerprint, "pruning": p.model_dump(), "edge": edge, "domains": domains,
              "seed": seed, "training": cfg.training.model_dump(), **precision_inputs(st),
              **({"files": st.file_hashes} if st.file_hashes else {})}  # in every train key too (it holds these)
    out, res = st.stage(spec, inputs, run_prune)
    return out / res["dir"], res, inputs


def stage_train_all(st: Study, specs: list[StageSpec], pruned: dict[str, tuple[Path, dict, dict]], trainer: Trainer,
                    start: Path | None = None) -> dict[str, tuple[Path, dict]]:
    """Train the edges of one round (``specs``, one seed and round) whose package is not cached, through ``trainer``
    (local or Flower); (package, result) by edge.

    ``start`` (rounds after the first) is the fused full-model adapter every edge starts from; each
    job gets it projected to its own pruned shapes in ``work_dir / "init"``. A trainer with ``parallel`` gets
    every pending edge in one call; an edge it could not deliver is left out and recorded in ``missing_edges``.
    """
    seed, round_no = specs[0].seed, specs[0].round
    tcfg = train_config(st, seed)
    grams = edge_gram_spec(st) if round_no == 1 else None  # the edges' own Gram matrices: first round only
    wanted: dict[str, tuple[str, Pending]] = {}  # stage name → (edge, stage)
    for spec in specs:
        pdir, _, pinputs = pruned[spec.edge]
        inputs = {"prune": pinputs, "plan": sha256_file(pdir / "plan.json"), "train": tcfg.model_dump()}
        if start is not None:
            inputs |= {"round": round_no, "start": sha256_file(start / "adapter_model.safetensors")}
        if grams is not None:
            inputs |= {"grams": asdict(grams)}
        wanted[spec.name] = (spec.edge, Pending(spec.name, inputs, tcfg.steps))

    def train(group: list[Pending]) -> None:
        jobs = []
        for p in group:
            edge = wanted[p.name][0]
            pdir = pruned[edge][0]
            job = TrainJob(edge, seed, st.cfg.edges[edge], pdir, tcfg, p.work, p.name, p.inputs,
                           advance=p.advance, round_no=round_no, grams=grams)
            if start is not None:
                job.init_dir = write_start(start, pdir / "plan.json", job.work_dir / "init")
            jobs.append(job)
        trainer.train(st, jobs)
        for p, job in zip(group, jobs):
            p.result = _package_result(st, job)

    done = st.stages("train", [p for _, p in wanted.values()], train, together=trainer.parallel,
                     label="train {n} edges")
    return {wanted[name][0]: (final / res["dir"], res) for name, (final, res) in done.items()}


def write_start(fused_dir: Path, plan_path: Path, out_dir: Path) -> Path:
    """The fused adapter projected to one edge's pruned shapes, as a PEFT directory (its next round's start)."""
    if (out_dir / "adapter_model.safetensors").is_file():  # a resumed job: same inputs, same start
        return out_dir
    plan = read_plan(plan_path)
    start = project_adapter(load_adapter(fused_dir), plan, fused_dir)
    manifest = RoundStartManifest(source=fused_dir.name, plan_hash=plan_hash(plan),
                                  fused_sha256=sha256_file(fused_dir / "adapter_model.safetensors"))
    return save_adapter(start, out_dir, manifest=manifest)


def edge_gram_spec(st: Study):
    """The GramSpec each edge collects its own Gram matrices with, or None where the cloud collects them."""
    i = st.cfg.interference
    return i.spec(st.cfg.data.split_seed) if st.cfg.collects_grams and i.from_edges else None


def _package_result(st: Study, job: TrainJob) -> dict | None:
    """The train stage's result if the trainer wrote this job's package (and the Gram matrices it was asked for);
    else None, the edge left out and recorded with the reason."""
    missing_grams = job.grams is not None and not (job.grams_dir / GRAMS_MANIFEST).is_file()
    if job.failure is None and (job.package_dir / "edgefuse.json").is_file() and not missing_grams:
        res = {"dir": "package", "stats": EdgePackageManifest.read(job.package_dir / "edgefuse.json").stats}
        if job.grams is not None:
            res["grams"] = job.grams_dir.name
        return res
    reason = job.failure or ("the edge sent no Gram matrices" if missing_grams else "the trainer wrote no package")
    st.missing_edges.append({"edge": job.edge, "seed": job.seed, "round": job.round_no, "reason": reason})
    log.warning("edge %s (seed %d) left out: %s", job.edge, job.seed, reason)
    return None


def stage_recover(st: Study, spec: StageSpec, pruned_dir: Path, package: Path, train_res: dict,
                  prune_res: dict) -> tuple[dict, str]:
    """One edge's package back to the full model's shapes; (its record for results.json, the adapter's sha256)."""
    inputs = {"package": sha256_file(package / "adapter_model.safetensors"), "plan": sha256_file(pruned_dir / "plan.json")}

    def run_recover(work: Path, advance) -> dict:
        recover(package, pruned_dir / "plan.json", work / "adapter")
        return {"dir": "adapter", "sha256": sha256_file(work / "adapter" / "adapter_model.safetensors")}

    rec_dir, rec_res = st.stage(spec, inputs, run_recover)
    edge = spec.edge
    out = {"edge": edge, "seed": spec.seed, "round": spec.round, "domains": st.cfg.edges[edge],
           "adapter": str(rec_dir / rec_res["dir"]), "prune": prune_res, "train": train_res["stats"]}
    if train_res.get("grams"):  # the edge's own Gram matrices, beside its package (interference.source: edges)
        out["grams"] = str(package.parent / train_res["grams"])
    return out, rec_res["sha256"]


def stage_eval_edge(st: Study, spec: StageSpec, edge: dict, sha256: str) -> dict:
    """One recovered edge adapter alone on the study's tasks (cross-domain ones with ``edges_alone_cd``)."""
    cd = st.cfg.benchmarks.edges_alone_cd
    key = {"eval": eval_inputs(st), "adapter": sha256, **({"cd": True} if cd else {})}
    adapter = Path(edge["adapter"])
    return eval_stage(st, spec, key, lambda work, adv: _with_adapter(st, adapter, lambda m: evaluate_model(
        st, m, work, adv, spec.edge, cd=cd)), total=_eval_total(st, cd))


def adapter_keys(edges: list[dict]) -> list[str]:
    """The edge adapters as the fuse, interference and LoraHub stages name them in their inputs (stage directory and
    file, content-addressed)."""
    return [e["adapter"].rsplit("/stages/", 1)[-1] for e in edges]


def fusion_weights(st: Study, edges: list[dict]) -> list[float] | None:
    """The configured fusion weights of the delivered edges (a missing edge's weight is left out)."""
    f, names = st.cfg.fusion, list(st.cfg.edges)
    return [f.weights[names.index(e["edge"])] for e in edges] if f.weights else None


def stage_fuse(st: Study, spec: StageSpec, edges: list[dict]) -> tuple[Path, dict]:
    """One fused model (``spec.method`` with ``spec.cr``) of the round's delivered edges; (its adapter directory,
    the stage's result)."""
    f, method, setting, seed = st.cfg.fusion, spec.method, spec.cr, spec.seed
    weights = fusion_weights(st, edges)
    method_spec = get_method(method)  # the shared rank/density apply to the methods that take them
    inputs = {"adapters": adapter_keys(edges), "method": method,
              "cr": setting.name if setting.is_plain else setting.model_dump(exclude={"methods"}), "rank": f.rank,
              "density": f.density, "weights": weights, "params": f.params.get(method, {}), "seed": seed}
    grams = method_spec.needs_grams or setting.needs_grams
    if grams:  # RegMean, LoRA-CR activation: the Gram matrices are an input (other keys stay as they were)
        inputs["grams"] = st.grams_hash

    request = f.request(method, setting, seed, weights)  # as the config checked it when it loaded

    def run_fuse(work: Path, advance) -> dict:
        stats = fuse_dirs([Path(e["adapter"]) for e in edges], work / "fused", request, force=True, progress=advance,
                          activations=st.grams_dir if grams else None)
        return {"dir": "fused", "stats": jsonable(stats)}

    fdir, fres = st.stage(spec, inputs, run_fuse)
    return fdir / fres["dir"], fres


def stage_eval_adapter(st: Study, spec: StageSpec, adapter: Path) -> dict:
    """A fused or composed model (the base model with ``adapter``) on every task of the study."""
    return eval_stage(st, spec, {"eval": eval_inputs(st), "fused": sha256_file(adapter / "adapter_model.safetensors")},
                      lambda work, adv: _with_adapter(st, adapter, lambda m: evaluate_model(st, m, work, adv, spec.model)),
                      total=_eval_total(st))
