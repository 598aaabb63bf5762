"""The study's stages, each a pure function over files cached by `StageCache` (through `Study.stage`).

  data → tasks' data (MMLU-CD: build per k) → base eval → (retrieval mixtures) per edge embed → (Grams: `edgefuse.runner.
  interference`) grams → per seed: per edge prune; then per round: per edge train → recover → eval alone;
  per fusion method × LoRA-CR strategy: fuse → (Grams) interference → eval;
  after the last round (`edgefuse.runner.composition`): lorahub → eval, retrieval mixtures' evals.
Every stage's ``inputs`` dict is its cache key: changing one (a key, a value's form) makes every existing run
directory redo that stage and all after it, so they stay exactly as they are (tests/test_pipeline_e2e.py,
``test_stage_keys_are_those_the_code_before_the_runner_package_wrote``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from edgefuse.artifacts import EdgePackageManifest, RoundStartManifest
from edgefuse.config import StudyConfig
from edgefuse.edge.plan import plan_hash
from edgefuse.errors import EdgefuseError
from edgefuse.data.prompts import answered_prompt
from edgefuse.io import atomic_write_json, jsonable, read_json, sha256_file
from edgefuse.runner import names as stage_names
from edgefuse.runner.names import round_tag
from edgefuse.runner.study import Pending, Study
from edgefuse.runner.trainers import Trainer, TrainJob
from edgefuse.tasks.base import EvalContext, Task
from edgefuse.tasks.mmlu import mmlu_gold
from edgefuse.tasks.registry import study_tasks

log = logging.getLogger("edgefuse.run")


def _edge_names(cfg: StudyConfig) -> list[str]:
    return list(cfg.edges)


# ----------------------------------------------------------------------------------------------- stages
def stage_data(st: Study) -> None:
    from edgefuse.data.choices import load_choice_file, with_files
    from edgefuse.data.mmlu import SplitSpec, load_mmlu, make_splits, select

    d = st.cfg.data
    mmlu = load_mmlu(None if d.source == "embedded" else d.source)
    st.file_hashes = {name: sha256_file(f.path) for name, f in d.choices.items()}
    st.dataset = with_files(mmlu, {name: load_choice_file(f.path, f.fields, f.domain) for name, f in d.choices.items()})
    st.split_spec = SplitSpec(seed=d.split_seed, public_per_subject=d.public_per_subject,
                              edge_fraction=d.edge_fraction)

    def run(work: Path, advance) -> dict:
        splits = make_splits(st.dataset, st.split_spec)
        atomic_write_json(work / "splits.json", splits, indent=None)
        return {k: len(v) for k, v in splits.items()} | {"skipped_rows": st.dataset.skipped}

    st.stage("data", stage_names.DATA, st.data_inputs(), run)
    m = st.cfg.benchmarks.mmlu
    # from MMLU alone: its splits are per subject, so the files' questions change none of them
    st.mmlu_items = select(mmlu, "test", m.domains, None, m.limit, d.split_seed, st.split_spec)


def stage_tasks(st: Study) -> None:
    """The study's tasks (`edgefuse.tasks.registry.study_tasks`), each preparing its data (MMLU-CD: its instance
    files, stages ``mmlu-cd-k<k>``) before any model is evaluated."""
    st.tasks = study_tasks(st.cfg.benchmarks, stage_names.cd_build, st.cfg.data)
    for task in st.tasks:
        task.prepare(st)


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


def eval_stage(st: Study, name: str, inputs: dict, fn, total: int | None) -> dict:
    """One evaluation stage (`Study.stage`, kind eval); its summary's MMLU part always carries the per-item gold
    scores (`edgefuse.evaluate.gold`), taken from the stage's own results file when the cached summary predates
    them, so a finished study gains them without evaluating again."""
    stage_dir, res = st.stage("eval", name, inputs, fn, total=total)
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
    from edgefuse.peft_utils import apply_adapter

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


def stage_base_eval(st: Study) -> dict:
    return eval_stage(st, stage_names.BASE_EVAL, eval_inputs(st),
                      lambda work, adv: evaluate_model(st, st.model, work, adv, "base"), total=_eval_total(st))


def train_config(st: Study, seed: int):
    return st.cfg.training.model_copy(update={"seed": seed})


def stage_prune(st: Study, edge: str, seed: int) -> tuple[Path, dict, dict]:
    """Prune the base model for one edge; returns (pruned dir, result, stage inputs)."""
    from edgefuse.edge.plan import save_pruned
    from edgefuse.edge.prune import prune_model
    from edgefuse.models import count_parameters

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
    out, res = st.stage("prune", stage_names.prune(edge, seed), inputs, run_prune)
    return out / res["dir"], res, inputs


def stage_train_all(st: Study, pruned: dict[str, tuple[Path, dict, dict]], seed: int, trainer: Trainer,
                    round_no: int = 1, start: Path | None = None) -> dict[str, tuple[Path, dict]]:
    """Train every edge whose package is not cached, through ``trainer`` (local or Flower); (package, result) by edge.

    ``start`` (rounds after the first) is the fused full-model adapter every edge starts from; each
    job gets it projected to its own pruned shapes in ``work_dir / "init"``. A trainer with ``parallel`` gets
    every pending edge in one call; an edge it could not deliver is left out and recorded in ``missing_edges``.
    """
    tcfg = train_config(st, seed)
    grams = edge_gram_spec(st) if round_no == 1 else None  # the edges' own Gram matrices: first round only
    wanted: dict[str, tuple[str, Pending]] = {}  # stage name → (edge, stage)
    for edge, (pdir, _, pinputs) in pruned.items():
        name = stage_names.train(edge, round_tag(seed, round_no))
        inputs = {"prune": pinputs, "plan": sha256_file(pdir / "plan.json"), "train": tcfg.model_dump()}
        if start is not None:
            inputs |= {"round": round_no, "start": sha256_file(start / "adapter_model.safetensors")}
        if grams is not None:
            inputs |= {"grams": asdict(grams)}
        wanted[name] = (edge, Pending(name, inputs, tcfg.steps))

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
    from edgefuse.adapters import load_adapter, save_adapter
    from edgefuse.edge.plan import read_plan
    from edgefuse.edge.recover import project_adapter

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
    from edgefuse.interference.grams import MANIFEST_FILE as GRAMS_MANIFEST

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


def stage_recover_eval(st: Study, edge: str, seed: int, pruned_dir: Path, package: Path, train_res: dict,
                       prune_res: dict, round_no: int = 1) -> dict:
    from edgefuse.edge.recover import recover

    inputs = {"package": sha256_file(package / "adapter_model.safetensors"), "plan": sha256_file(pruned_dir / "plan.json")}

    def run_recover(work: Path, advance) -> dict:
        recover(package, pruned_dir / "plan.json", work / "adapter")
        return {"dir": "adapter", "sha256": sha256_file(work / "adapter" / "adapter_model.safetensors")}

    tag = round_tag(seed, round_no)
    rec_dir, rec_res = st.stage("recover", stage_names.recover(edge, tag), inputs, run_recover)
    adapter = rec_dir / rec_res["dir"]
    out = {"edge": edge, "seed": seed, "round": round_no, "domains": st.cfg.edges[edge], "adapter": str(adapter),
           "prune": prune_res, "train": train_res["stats"]}
    if train_res.get("grams"):  # the edge's own Gram matrices, beside its package (interference.source: edges)
        out["grams"] = str(package.parent / train_res["grams"])
    if st.cfg.benchmarks.edges_alone:
        cd = st.cfg.benchmarks.edges_alone_cd
        key = {"eval": eval_inputs(st), "adapter": rec_res["sha256"], **({"cd": True} if cd else {})}
        out["eval"] = eval_stage(st, stage_names.eval_edge(edge, tag), key,
                                 lambda work, adv: _with_adapter(st, adapter, lambda m: evaluate_model(
                                     st, m, work, adv, edge, cd=cd)),
                                 total=_eval_total(st, cd))
    return out


def stage_edges(st: Study, seed: int, trainer: Trainer, pruned: dict[str, tuple[Path, dict, dict]],
                round_no: int = 1, start: Path | None = None) -> list[dict]:
    """train all (one dispatch, so federated edges train in parallel) → recover and evaluate each."""
    packages = stage_train_all(st, pruned, seed, trainer, round_no, start)
    return [stage_recover_eval(st, e, seed, pruned[e][0], packages[e][0], packages[e][1], pruned[e][1], round_no)
            for e in _edge_names(st.cfg) if e in packages]


def stage_fusions(st: Study, edges: list[dict], seed: int, round_no: int = 1) -> list[dict]:
    from edgefuse.fusion import fuse_dirs
    from edgefuse.fusion.registry import get_method

    f = st.cfg.fusion
    names = _edge_names(st.cfg)
    weights = [f.weights[names.index(e["edge"])] for e in edges] if f.weights else None  # without missing edges
    results = []
    for method, setting, name in f.fusions():
        cr = setting.name
        spec = get_method(method)  # the shared rank/density apply to the methods that take them
        inputs = {"adapters": [e["adapter"].rsplit("/stages/", 1)[-1] for e in edges], "method": method,
                  "cr": cr if setting.is_plain else setting.model_dump(exclude={"methods"}), "rank": f.rank, "density": f.density,
                  "weights": weights, "params": f.params.get(method, {}), "seed": seed}
        grams = spec.needs_grams or setting.needs_grams
        if grams:  # RegMean, LoRA-CR activation: the Gram matrices are an input (other keys stay as they were)
            inputs["grams"] = st.grams_hash

        def run_fuse(work: Path, advance, method=method, setting=setting, spec=spec, grams=grams) -> dict:
            density, params = f.fuse_args(method, setting)  # as the config checked them when it loaded
            stats = fuse_dirs([Path(e["adapter"]) for e in edges], work / "fused", method=method,
                              cr=None if setting.is_off else setting.strategy, cr_threshold=setting.threshold,
                              weights=weights, rank=None if spec.exact_rank else f.rank, density=density,
                              seed=seed, force=True, progress=advance,
                              activations=st.grams_dir if grams else None, **params)
            return {"dir": "fused", "stats": jsonable(stats)}

        tag = round_tag(seed, round_no)
        fdir, fres = st.stage("fuse", stage_names.fuse(name, tag), inputs, run_fuse)
        adapter = fdir / fres["dir"]
        if st.grams_dir is not None:
            from edgefuse.runner.interference import stage_interference

            st.interference.append(stage_interference(st, edges, adapter, name, seed, round_no))
        res = eval_stage(st, stage_names.evaluation(name, tag),
                         {"eval": eval_inputs(st), "fused": sha256_file(adapter / "adapter_model.safetensors")},
                         lambda work, adv, adapter=adapter, name=name: _with_adapter(
                             st, adapter, lambda m: evaluate_model(st, m, work, adv, name)),
                         total=_eval_total(st))
        results.append({"name": name, "method": method, "cr": cr, "seed": seed, "round": round_no,
                        "adapter": str(adapter),
                        "fusion": fres["stats"], "eval": res})
    return results


def run_seed(st: Study, seed: int, trainer: Trainer) -> dict:
    """Prune each edge once, then ``rounds.count`` rounds of train → recover → fuse → evaluate.

    From the second round on, every edge starts from the fused model named by `StudyConfig.sent_back`
    (in its own pruned shapes); the seed's ``edges``/``fused`` are the last round's, ``rounds`` all of them.
    """
    pruned = {e: stage_prune(st, e, seed) for e in _edge_names(st.cfg)}
    rounds, start = [], None
    for round_no in range(1, st.cfg.rounds.count + 1):
        edges = stage_edges(st, seed, trainer, pruned, round_no, start)
        if not edges:
            raise EdgefuseError(f"round {round_no} (seed {seed}): no edge delivered an adapter")
        if round_no == 1 and edge_gram_spec(st) is not None:  # the Gram directory the fusions use, from the edges
            from edgefuse.runner.interference import stage_edge_grams

            stage_edge_grams(st, edges, seed)
        fused = stage_fusions(st, edges, seed, round_no)
        sent = st.cfg.sent_back()
        rounds.append({"round": round_no, "edges": edges, "fused": fused,
                       "sent_back": sent if round_no < st.cfg.rounds.count else None})
        start = next(Path(f["adapter"]) for f in fused if f["name"] == sent)
    return {"seed": seed, "edges": rounds[-1]["edges"], "fused": rounds[-1]["fused"], "rounds": rounds,
            "missing_edges": [m for m in st.missing_edges if m["seed"] == seed]}


