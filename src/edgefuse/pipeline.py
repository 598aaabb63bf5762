"""``edgefuse run``: the whole cloud–edge study as cached stages, ending in a report.

Stages (each a pure function over files, cached by `StageCache`):
  data → mmlu-cd build (per k) → base eval → per seed: per edge prune; then per round: per edge
  train → recover → eval alone; per fusion method × LoRA-CR strategy: fuse → eval; finally the report.
  With ``rounds.count`` > 1 each round's edges start from the previous round's fused adapter.
The same stage functions are used by the Flower apps (`edgefuse.federated`), so a federated study and a
single-process study with the same seeds produce the same adapters and scores.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgefuse.config import StudyConfig
from edgefuse.edge.plan import plan_hash
from edgefuse.errors import EdgefuseError
from edgefuse.estimate import round_tag
from edgefuse.io import atomic_write_json, read_json, sha256_file, writing
from edgefuse.stages import StageCache

log = logging.getLogger("edgefuse.run")


# ----------------------------------------------------------------------------------------------- progress
class StudyProgress:
    """One overall bar (stage i of N, elapsed, remaining) and one bar for the current stage's work."""

    def __init__(self, total_stages: int, enabled: bool = True):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        from edgefuse.ui import err_console

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=err_console, disable=not enabled)
        self.overall = self.progress.add_task("study", total=total_stages, info="")
        self.current = None
        self.n_done = 0
        self.total = total_stages
        # bars on a log file or a pipe draw nothing until the end: print one plain line per stage instead
        self.plain = enabled and not err_console.is_terminal
        self.started = 0.0
        self.name = ""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def stage(self, name: str, total: int | None) -> Callable[..., None]:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.progress.update(self.overall, description=f"study: stage {self.n_done + 1} of {self.total}")
        self.current = self.progress.add_task(f"  {name}", total=total, info="")
        self.name, self.started = name, time.perf_counter()
        if self.plain:
            print(f"{time.strftime('%H:%M:%S')} stage {self.n_done + 1}/{self.total} {name}: started", flush=True)

        def advance(k: int = 1, total: int | None = None, **fields) -> None:
            if total is not None:
                self.progress.update(self.current, total=total)
            info = " ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in fields.items())
            self.progress.update(self.current, advance=k, **({"info": info} if info else {}))

        return advance

    def stage_done(self, name: str | None = None, note: str | None = None) -> None:
        """``name``/``note`` for a stage that had no `stage` call of its own (a cached or batch-trained edge)."""
        if self.plain:
            note = note or f"finished in {time.perf_counter() - self.started:.0f} s"
            print(f"{time.strftime('%H:%M:%S')} stage {self.n_done + 1}/{self.total} {name or self.name}: {note}",
                  flush=True)
        self.n_done += 1
        self.progress.update(self.overall, advance=1)


# ----------------------------------------------------------------------------------------------- context
@dataclass
class Study:
    """Everything the stages share: config, data, base model, cache and progress."""

    cfg: StudyConfig
    run_dir: Path
    cache: StageCache
    progress: StudyProgress
    dataset: Any = None
    split_spec: Any = None
    model: Any = None
    tokenizer: Any = None
    base_fingerprint: str = ""
    mmlu_items: list = field(default_factory=list)
    cd_docs: dict[int, dict] = field(default_factory=dict)
    cd_hashes: dict[int, str] = field(default_factory=dict)
    missing_edges: list[dict] = field(default_factory=list)  # edges a (federated) trainer could not deliver
    precision: Any = None  # edgefuse.precision.Precision: device and dtype of the base model, pruning and training

    def stage(self, kind: str, name: str, inputs: Any, fn: Callable[[Path, Callable], dict],
              total: int | None = None) -> tuple[Path, dict]:
        advance = self.progress.stage(name, total)
        try:
            return self.cache.run(kind, name, inputs, lambda work: fn(work, advance))
        finally:
            self.progress.stage_done()

    def items_of(self, split: str, domains: list[str] | None = None):
        from edgefuse.data.mmlu import select

        return select(self.dataset, split, domains, None, None, self.cfg.data.split_seed, self.split_spec)


def _edge_names(cfg: StudyConfig) -> list[str]:
    return list(cfg.edges)


def count_stages(cfg: StudyConfig) -> int:
    from edgefuse.estimate import plan

    return len(plan(cfg, 0))


# ----------------------------------------------------------------------------------------------- stages
def stage_data(st: Study) -> None:
    from edgefuse.data.mmlu import SplitSpec, load_mmlu, make_splits, select

    d = st.cfg.data
    st.dataset = load_mmlu(None if d.source == "embedded" else d.source)
    st.split_spec = SplitSpec(seed=d.split_seed, public_per_subject=d.public_per_subject,
                              edge_fraction=d.edge_fraction)

    def run(work: Path, advance) -> dict:
        splits = make_splits(st.dataset, st.split_spec)
        atomic_write_json(work / "splits.json", splits, indent=None)
        return {k: len(v) for k, v in splits.items()} | {"skipped_rows": st.dataset.skipped}

    st.stage("data", "data", d.model_dump(), run)
    m = st.cfg.benchmarks.mmlu
    st.mmlu_items = select(st.dataset, "test", m.domains, None, m.limit, d.split_seed, st.split_spec)


def stage_cd_build(st: Study) -> None:
    from edgefuse.data.mmlu_cd import build_instances, load_benchmark, write_benchmark

    cd = st.cfg.benchmarks.mmlu_cd
    if not cd.enabled:
        return
    for k in cd.ks:
        def run(work: Path, advance, k=k) -> dict:
            doc = build_instances(st.dataset, k=k, n=cd.n, seed=st.cfg.data.split_seed, domains=cd.domains,
                                  split="test", split_spec=st.split_spec)
            return {"hash": write_benchmark(doc, work / f"mmlu_cd_k{k}.jsonl"), "file": f"mmlu_cd_k{k}.jsonl"}

        out, res = st.stage("data", f"mmlu-cd-k{k}", {"data": st.cfg.data.model_dump(), "cd": cd.model_dump(),
                                                     "k": k}, run)
        st.cd_docs[k] = load_benchmark(out / res["file"])
        st.cd_hashes[k] = res["hash"]


def evaluate_model(st: Study, model, work: Path, advance, label: str, cd: bool = True) -> dict:
    """MMLU and (unless ``cd`` is False) MMLU-CD for each k, for one model; full results to files, summary returned.

    The summary's ``accuracy`` and per-item ``correct`` are those of the study's headline metric
    (``benchmarks.metric``); a cloze evaluation also keeps both metrics under ``metrics``.
    """
    from edgefuse.evaluate.mmlu import evaluate_mmlu
    from edgefuse.evaluate.mmlu_cd import evaluate_mmlu_cd

    b = st.cfg.benchmarks
    metric = b.headline_metric
    norm = "_norm" if metric == "acc_norm" else ""
    summary: dict[str, Any] = {"label": label, "format": b.format, "metric": metric}
    alone: list[dict] = []  # zero-shot per-item records of this model, reused by MMLU-CD's "items alone"
    if b.mmlu.enabled:
        res = evaluate_mmlu(model, st.tokenizer, st.mmlu_items, shots=b.mmlu.shots,
                            public=st.items_of("public") if b.mmlu.shots else (), batch_size=b.batch_size,
                            progress=advance, meta={"label": label}, fmt=b.format)
        atomic_write_json(work / "mmlu.json", res)
        summary["mmlu"] = {"accuracy": res["accuracy" + norm], "file": "mmlu.json",
                           "correct": {i["id"]: int(i["correct" + norm]) for i in res["items"]}}
        if b.format == "cloze":
            summary["mmlu"]["metrics"] = {"acc": res["accuracy"]["overall"], "acc_norm": res["accuracy_norm"]["overall"]}
        if not b.mmlu.shots:
            alone = list(res["items"])
    for k, doc in (st.cd_docs if cd else {}).items():
        res = evaluate_mmlu_cd(model, st.tokenizer, doc, st.dataset, batch_size=b.batch_size,
                               progress=advance, meta={"label": label}, single_items=alone, fmt=b.format,
                               metric=metric, single=b.mmlu_cd.single)
        alone += res["single_items"] or []
        atomic_write_json(work / f"mmlu_cd_k{k}.json", res)
        summary[f"mmlu_cd_k{k}"] = {key: res[key] for key in ("strict", "per_position", "answer", "single", "penalty", "chance")
                                    if key in res}
        summary[f"mmlu_cd_k{k}"]["file"] = f"mmlu_cd_k{k}.json"
        summary[f"mmlu_cd_k{k}"]["strict_outcomes"] = [int(inst["strict"]) for inst in res["instances"]]
        summary[f"mmlu_cd_k{k}"]["answer_outcomes"] = [[int(c) for c in inst["correct"]] for inst in res["instances"]]
    return summary


def _eval_total(st: Study, cd: bool = True) -> int:
    b = st.cfg.benchmarks
    return (len(st.mmlu_items) if b.mmlu.enabled else 0) + (sum(len(d["instances"]) for d in st.cd_docs.values())
                                                            if cd else 0)


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


def eval_inputs(st: Study) -> dict:
    b = st.cfg.benchmarks
    return {"model": st.base_fingerprint, "data": st.cfg.data.model_dump(), "bench": b.model_dump(),
            "cd": st.cd_hashes, **precision_inputs(st)}


def stage_base_eval(st: Study) -> dict:
    _, res = st.stage("eval", "eval-base", eval_inputs(st),
                      lambda work, adv: evaluate_model(st, st.model, work, adv, "base"), total=_eval_total(st))
    return res


@dataclass
class TrainJob:
    """One edge's training request: what a local trainer or a Flower edge needs, and where the package goes."""

    edge: str
    seed: int
    domains: list[str]
    pruned_dir: Path
    config: Any  # edgefuse.edge.train.TrainConfig
    work_dir: Path  # the package must be written to work_dir / "package"
    stage_name: str = ""
    inputs: dict = field(default_factory=dict)
    advance: Callable[..., None] | None = None
    failure: str | None = None  # set by a trainer that could not get this edge's package (the edge is left out)
    round_no: int = 1
    init_dir: Path | None = None  # adapter in this edge's pruned shapes to start from (rounds after the first)

    @property
    def package_dir(self) -> Path:
        return self.work_dir / "package"


def local_trainer(st: Study, jobs: list[TrainJob]) -> None:
    """Train each edge in this process, one after the other, resuming from checkpoints when present."""
    from edgefuse.edge.train import checkpoint_dir_for, train_edge

    for job in jobs:
        items = st.items_of("edge", job.domains)
        state = checkpoint_dir_for(job.package_dir) / "state.json"
        if state.is_file():  # an interrupted run: the stage's work directory kept this edge's last checkpoint
            log.info("edge %s: resuming from its checkpoint at step %d of %d (%s)", job.edge,
                     read_json(state)["step"], job.config.steps, state.parent)
        train_edge(job.pruned_dir, job.edge, items, job.config, job.package_dir, progress=job.advance,
                   resume=state.is_file(), init_dir=job.init_dir,
                   device=st.precision.device, dtype=st.precision.dtype)


def train_config(st: Study, seed: int):
    return st.cfg.training.model_copy(update={"seed": seed})


def stage_prune(st: Study, edge: str, seed: int) -> tuple[Path, dict, dict]:
    """Prune the base model for one edge; returns (pruned dir, result, stage inputs)."""
    from edgefuse.data.prompts import answer_text, mc_prompt
    from edgefuse.edge.plan import save_pruned
    from edgefuse.edge.prune import prune_model
    from edgefuse.models import count_parameters

    cfg, domains, p = st.cfg, st.cfg.edges[edge], st.cfg.pruning_for(edge)

    def run_prune(work: Path, advance) -> dict:
        calib = [mc_prompt(it) + answer_text(it.answer) for it in st.items_of("public", domains)[: p.calib]]
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
                "base_params": count_parameters(st.model), "estimate": _jsonable(res.estimate)}

    inputs = {"model": st.base_fingerprint, "pruning": p.model_dump(), "edge": edge, "domains": domains,
              "seed": seed, "training": cfg.training.model_dump(), **precision_inputs(st)}
    out, res = st.stage("prune", f"prune-{edge}-s{seed}", inputs, run_prune)
    return out / res["dir"], res, inputs


def stage_train_all(st: Study, pruned: dict[str, tuple[Path, dict, dict]], seed: int,
                    trainer: Callable[[Study, list[TrainJob]], None], round_no: int = 1,
                    start: Path | None = None) -> dict[str, tuple[Path, dict]]:
    """Train every edge whose package is not cached, through ``trainer`` (local or Flower), then store them.

    ``start`` (rounds after the first) is the fused full-model adapter every edge starts from; each
    job gets it projected to its own pruned shapes in ``work_dir / "init"``.
    """
    out: dict[str, tuple[Path, dict]] = {}
    jobs: list[TrainJob] = []
    tcfg = train_config(st, seed)
    for edge, (pdir, _, pinputs) in pruned.items():
        name = f"train-{edge}-{round_tag(seed, round_no)}"
        inputs = {"prune": pinputs, "plan": sha256_file(pdir / "plan.json"), "train": tcfg.model_dump()}
        if start is not None:
            inputs |= {"round": round_no, "start": sha256_file(start / "adapter_model.safetensors")}
        hit = st.cache.lookup("train", name, inputs)
        if hit is not None:
            out[edge] = (hit[0] / hit[1]["dir"], hit[1])
            st.progress.stage_done(name, "cached")
            continue
        job = TrainJob(edge, seed, st.cfg.edges[edge], pdir, tcfg, st.cache.begin("train", name, inputs), name,
                       inputs, round_no=round_no)
        if start is not None:
            job.init_dir = write_start(start, pdir / "plan.json", job.work_dir / "init")
        jobs.append(job)
    if jobs:
        t0 = time.perf_counter()
        if len(jobs) == 1 or trainer is local_trainer:
            for job in jobs:
                job.advance = st.progress.stage(job.stage_name, tcfg.steps)
                t1 = time.perf_counter()
                trainer(st, [job])
                if _delivered(st, job):
                    out[job.edge] = _finish_train(st, job, time.perf_counter() - t1)
                st.progress.stage_done()
        else:
            st.progress.stage(f"train {len(jobs)} edges", None)
            trainer(st, jobs)
            for job in jobs:
                if _delivered(st, job):
                    out[job.edge] = _finish_train(st, job, time.perf_counter() - t0)
                st.progress.stage_done(job.stage_name, "finished" if job.edge in out else "left out")
    return out


def write_start(fused_dir: Path, plan_path: Path, out_dir: Path) -> Path:
    """The fused adapter projected to one edge's pruned shapes, as a PEFT directory (its next round's start)."""
    from edgefuse.adapters import load_adapter, save_adapter
    from edgefuse.edge.plan import read_plan
    from edgefuse.edge.recover import project_adapter

    if (out_dir / "adapter_model.safetensors").is_file():  # a resumed job: same inputs, same start
        return out_dir
    plan = read_plan(plan_path)
    start = project_adapter(load_adapter(fused_dir), plan, fused_dir)
    return save_adapter(start, out_dir, manifest={"kind": "edgefuse-round-start", "from": str(fused_dir.name),
                                                  "fused_sha256": sha256_file(fused_dir / "adapter_model.safetensors"),
                                                  "plan_hash": plan_hash(plan)})


def _delivered(st: Study, job: TrainJob) -> bool:
    """Whether the trainer wrote this job's package; if not, the edge is left out and recorded with the reason."""
    if job.failure is None and (job.package_dir / "edgefuse.json").is_file():
        return True
    reason = job.failure or "the trainer wrote no package"
    st.missing_edges.append({"edge": job.edge, "seed": job.seed, "round": job.round_no, "reason": reason})
    log.warning("edge %s (seed %d) left out: %s", job.edge, job.seed, reason)
    return False


def _finish_train(st: Study, job: TrainJob, wall: float) -> tuple[Path, dict]:
    man = read_json(job.package_dir / "edgefuse.json")
    result = {"dir": "package", "stats": man.get("training", man.get("stats", {}))}
    final = st.cache.finish("train", job.stage_name, job.inputs, result, wall)
    return final / "package", result


def stage_recover_eval(st: Study, edge: str, seed: int, pruned_dir: Path, package: Path, train_res: dict,
                       prune_res: dict, round_no: int = 1) -> dict:
    from edgefuse.edge.recover import recover

    inputs = {"package": sha256_file(package / "adapter_model.safetensors"), "plan": sha256_file(pruned_dir / "plan.json")}

    def run_recover(work: Path, advance) -> dict:
        recover(package, pruned_dir / "plan.json", work / "adapter")
        return {"dir": "adapter", "sha256": sha256_file(work / "adapter" / "adapter_model.safetensors")}

    tag = round_tag(seed, round_no)
    rec_dir, rec_res = st.stage("recover", f"recover-{edge}-{tag}", inputs, run_recover)
    adapter = rec_dir / rec_res["dir"]
    out = {"edge": edge, "seed": seed, "round": round_no, "domains": st.cfg.edges[edge], "adapter": str(adapter),
           "prune": prune_res, "train": train_res["stats"]}
    if st.cfg.benchmarks.edges_alone:
        _, res = st.stage("eval", f"eval-edge-{edge}-{tag}", {"eval": eval_inputs(st), "adapter": rec_res["sha256"]},
                          lambda work, adv: _with_adapter(st, adapter, lambda m: evaluate_model(
                              st, m, work, adv, edge, cd=st.cfg.benchmarks.edges_alone_cd)),
                          total=_eval_total(st, st.cfg.benchmarks.edges_alone_cd))
        out["eval"] = res
    return out


def stage_edges(st: Study, seed: int, trainer: Callable[[Study, list[TrainJob]], None],
                pruned: dict[str, tuple[Path, dict, dict]], round_no: int = 1, start: Path | None = None) -> list[dict]:
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
    for method in f.methods:
        for setting in f.cr:
            cr = setting.name
            name = f"{method}+{cr}" if cr != "off" else method
            inputs = {"adapters": [e["adapter"].rsplit("/stages/", 1)[-1] for e in edges], "method": method,
                      "cr": cr if setting.is_plain else setting.model_dump(), "rank": f.rank, "density": f.density,
                      "weights": weights, "params": f.params.get(method, {}), "seed": seed}

            def run_fuse(work: Path, advance, method=method, setting=setting) -> dict:
                spec = get_method(method)  # the shared rank/density apply to the methods that take them
                off = setting.strategy == "off"
                stats = fuse_dirs([Path(e["adapter"]) for e in edges], work / "fused", method=method,
                                  cr=None if off else setting.strategy, cr_threshold=setting.threshold,
                                  weights=weights, rank=None if spec.exact_rank else f.rank,
                                  density=f.density if spec.density is not None else None,
                                  seed=seed, force=True, progress=advance,
                                  **{**f.params.get(method, {}), **({} if off else setting.fuse_params())})
                return {"dir": "fused", "stats": _jsonable(stats)}

            tag = round_tag(seed, round_no)
            fdir, fres = st.stage("fuse", f"fuse-{name}-{tag}", inputs, run_fuse)
            adapter = fdir / fres["dir"]
            _, res = st.stage("eval", f"eval-{name}-{tag}",
                              {"eval": eval_inputs(st), "fused": sha256_file(adapter / "adapter_model.safetensors")},
                              lambda work, adv, adapter=adapter, name=name: _with_adapter(
                                  st, adapter, lambda m: evaluate_model(st, m, work, adv, name)),
                              total=_eval_total(st))
            results.append({"name": name, "method": method, "cr": cr, "seed": seed, "round": round_no,
                            "adapter": str(adapter),
                            "fusion": fres["stats"], "eval": res})
    return results


def _jsonable(obj: Any) -> Any:
    """Fusion statistics may hold tensors or numpy scalars; keep what JSON can carry."""
    import numbers

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, numbers.Number):
        return float(obj) if not isinstance(obj, int) else int(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def run_seed(st: Study, seed: int, trainer: Callable[[Study, list[TrainJob]], None]) -> dict:
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
        fused = stage_fusions(st, edges, seed, round_no)
        sent = st.cfg.sent_back()
        rounds.append({"round": round_no, "edges": edges, "fused": fused,
                       "sent_back": sent if round_no < st.cfg.rounds.count else None})
        start = next(Path(f["adapter"]) for f in fused if f["name"] == sent)
    return {"seed": seed, "edges": rounds[-1]["edges"], "fused": rounds[-1]["fused"], "rounds": rounds,
            "missing_edges": [m for m in st.missing_edges if m["seed"] == seed]}


# ----------------------------------------------------------------------------------------------- entry
class RunLogHandler(logging.FileHandler):
    """``run.log``, dropping what it cannot write: on a full disk the stage writing next stops the run with one
    line naming its file, which a traceback per log record (logging's default) would bury."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


def setup_logging(run_dir: Path) -> logging.Handler:
    with writing(run_dir / "run.log", always=True):
        run_dir.mkdir(parents=True, exist_ok=True)
        h = RunLogHandler(run_dir / "run.log", encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("edgefuse")
    root.setLevel(logging.INFO)
    root.addHandler(h)
    return h


@contextlib.contextmanager
def deterministic(seed: int = 0):
    """The whole study under torch's deterministic algorithms, with every global RNG seeded at its start.

    Each stage also seeds its own generators from the study's seeds (training, pruning, fusion), so a resumed run
    draws the same numbers as one from scratch; the global seeding here is only a safety net. ``warn_only``: an
    operation torch has no deterministic kernel for warns instead of failing the study. The previous setting is
    restored afterwards, so a library caller's process is left as it was."""
    import os
    import random

    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it (CUDA ≥ 10.2)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def run_study(cfg: StudyConfig, run_dir: str | Path, force: str | None = None, show_progress: bool = True,
              trainer: Callable[[Study, list[TrainJob]], None] | None = None,
              on_estimate: Callable[[list], None] | None = None) -> dict:
    """Run (or resume) the whole study; returns the results document also written to ``results.json``.

    ``trainer`` trains the edges that are not cached (default: in this process); the Flower ServerApp
    passes one that sends the jobs to real or simulated edges. A trainer with ``device_budgets(edges)``
    (Flower's) reports each device's own memory budget, which becomes that edge's pruning budget.
    Before any stage runs, the remaining duration is estimated (`edgefuse.estimate`), checked against
    ``max_minutes`` and handed to ``on_estimate``; results.json keeps it beside the measured wall times.
    One run at a time per run directory: a second one is refused at once (`edgefuse.runlock`). The study runs
    under `deterministic`: the same config run twice from scratch gives the same adapters and scores.
    """
    from edgefuse.runlock import run_lock

    with run_lock(run_dir) as stale, deterministic(cfg.seeds[0] if cfg.seeds else 0):
        return _run_locked(cfg, Path(run_dir), force, show_progress, trainer, on_estimate, stale)


def _run_locked(cfg: StudyConfig, run_dir: Path, force: str | None, show_progress: bool,
                trainer: Callable[[Study, list[TrainJob]], None] | None,
                on_estimate: Callable[[list], None] | None, stale: dict | None) -> dict:
    """`run_study` while this process holds the run directory's lock (``stale``: a dead run's lock it took over)."""
    from edgefuse.estimate import estimate_study, remaining_seconds
    from edgefuse.models import count_parameters, fingerprint, load_model
    from edgefuse.report import write_report

    t0 = time.perf_counter()
    precision = cfg.precision()  # an unreachable device or a dtype it cannot run fails here, before any work
    budgets = trainer.device_budgets(list(cfg.edges)) if hasattr(trainer, "device_budgets") else {}
    if budgets:
        cfg = cfg.with_device_budgets(budgets)
    model, tokenizer = load_model(cfg.model, device=precision.device, dtype=precision.dtype)
    stages = estimate_study(cfg, run_dir, count_parameters(model), force)
    remaining = remaining_seconds(stages)
    if cfg.max_minutes is not None and remaining > 60 * cfg.max_minutes:  # before anything is written
        raise EdgefuseError(f"the study's estimated duration is {remaining / 60:.0f} min, more than its "
                            f"max_minutes {cfg.max_minutes:g} (see `edgefuse run --dry-run`)")
    if on_estimate is not None:
        on_estimate(stages)
    handler = setup_logging(run_dir)
    try:
        if stale is not None:
            from edgefuse.runlock import stale_note

            log.warning(stale_note(stale, run_dir))
        if budgets:
            log.info("memory budgets reported by the edge devices (GiB): %s; the config sets the pruning of %s",
                     budgets, sorted(set(budgets) & set(cfg.edge_pruning)) or "none of them")
        log.info("estimated duration of the %d stages to run: %.1f min", sum(not s.done for s in stages), remaining / 60)
        atomic_write_json(run_dir / "config.json", cfg.model_dump())
        log.info("study %s in %s", cfg.name, run_dir)
        with StudyProgress(len(stages), enabled=show_progress) as progress:
            st = Study(cfg, run_dir, StageCache(run_dir, force), progress, precision=precision)
            st.model, st.tokenizer = model, tokenizer
            st.base_fingerprint = fingerprint(st.model)
            stage_data(st)
            stage_cd_build(st)
            base = stage_base_eval(st)
            seeds = [run_seed(st, seed, trainer or local_trainer) for seed in cfg.seeds]
        doc = {"name": cfg.name, "model": cfg.model, "base_fingerprint": st.base_fingerprint,
               "config": cfg.model_dump(), "precision": precision.as_dict(), "base": base, "seeds": seeds, "missing_edges": st.missing_edges,
               "stages": st.cache.records, "wall_s": round(time.perf_counter() - t0, 1),
               "mmlu_n": len(st.mmlu_items), "cd_n": {k: len(d["instances"]) for k, d in st.cd_docs.items()},
               "estimate": {"remaining_s": round(remaining, 1),
                            "stages": {s.name: round(s.seconds, 1) for s in stages if not s.done}}}
        write_report(doc, run_dir)
        log.info("study finished in %.1f s", doc["wall_s"])
        return doc
    finally:
        logging.getLogger("edgefuse").removeHandler(handler)
        handler.close()
