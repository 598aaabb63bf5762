"""The study's plan and its duration, estimated before any work starts (``edgefuse run --dry-run``).

Why: a study on a CPU takes hours, and ``max_minutes`` must be able to refuse one before it starts.
Each stage's cost is a count of work units (prompts trained, items scored, …) times a rate in
seconds per unit. The rates (`RATES`) were measured on the project's 2-core CPU with SmolLM2-135M
(BENCHMARKS.md, "Study duration estimate"); other models scale them by their parameter count, and
a run directory that already holds finished stages corrects each kind's rates by how far its own
measured wall times were from their estimates. The plan is also what the progress display counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgefuse.config import StudyConfig
from edgefuse.runner import names as stage_names
from edgefuse.runner.cache import KINDS, finished_stage_files
from edgefuse.runner.names import round_tag
from edgefuse.tasks.base import Task
from edgefuse.tasks.registry import study_tasks

REFERENCE_PARAMS = 134.5e6  # SmolLM2-135M, the model the rates were measured with

# seconds per unit on the 2-core CPU (SmolLM2-135M, 2 torch threads), measured by bench/cloze_throughput.py,
# bench/edge_recipe_sweep.py and the first stages of configs/cpu-study.yaml (BENCHMARKS.md, "CPU study"); the
# fusion rates from its fuse stages (0.3–1.1 s plain, 6–7 s TIES). A run directory's own finished stages correct
# every kind's rates.
RATES = {
    "setup": 20.0,                 # per study: model load, data, splits
    "prune_calib": 0.6,            # per calibration prompt (Taylor/Wanda: forward (+ backward))
    "prune": 28.0,                 # per edge: scoring, selection, building and saving the pruned model (32 s measured)
    "train_prompt": {"letters": 0.33, "cloze": 0.154, "both": 0.49},  # per prompt of a step (steps × batch)
    "recover": 3.0,                # per edge
    "fuse": {"plain": 1.0, "elementwise": 7.0, "cr": 1.0},   # per fused model; cr is added to the method
    "mmlu_item": {"letters": 0.19, "cloze": 0.165},           # per item, batch 8, adapter applied (250 s / 1,500)
    "cd_answer": {"letters": 0.12, "cloze": 0.30},            # per answer of an MMLU-CD instance (241 s / 800)
    # composition (issue 13): not yet measured in a study; derived from the rates above, and corrected, like every
    # kind, by a run directory's own finished stages
    "embed": 8.0,                  # per edge: load the embedded MiniLM, embed its examples
    "lorahub_eval": 1.5,           # per LoraHub evaluation: fuse with the candidate weights, merge, restore
    "lorahub_example": {"letters": 0.11, "cloze": 0.05},    # per example and evaluation: a forward (train_prompt / 3)
    "mixture": 1.3,                # a retrieval mixture's scoring ÷ a merged adapter's (k adapters' hooks per layer)
    "query": 0.005,                # per request: its MiniLM embedding
    # interference (issue 22): the grams rate from docs/interference.md (20–30 s per domain at 1024 tokens); RegMean and
    # the interference stage not yet measured in a study: derived from their work (a Cholesky of every distinct
    # d_in × d_in Gram matrix per edge when first read, r × r products per module and pair of edges), and corrected,
    # like every kind, by a run directory's own finished stages
    "grams_token": 0.025,          # per token of public prompt per edge: a base-model forward plus float64 HᵀH
    "regmean_edge": 4.0,           # per edge fused by RegMean: its Grams read and checked, its term of the solve
    "interference_edge": 3.0,      # per edge of an interference stage: its Grams read and checked
    "interference_pair": 0.2,      # per (domain, adapter) pair: the output products of every module
}


@dataclass
class PlannedStage:
    kind: str
    name: str
    seconds: float
    done: bool = False


def _scale(params: float | None) -> float:
    return 1.0 if params is None else params / REFERENCE_PARAMS


def _elementwise(method: str) -> bool:
    """Methods that sparsify ΔW element by element (they take a density) stream dense blocks: slower."""
    from edgefuse.fusion.registry import get_method

    return get_method(method).density is not None


def _needs_grams(method: str) -> bool:
    from edgefuse.fusion.registry import get_method

    return get_method(method).needs_grams


def _rate(name: str, fmt: str) -> float:
    """A rate by name; ``name:format`` picks a format other than the study's (a cloze-only task in a letters
    study)."""
    name, _, own = name.partition(":")
    rate = RATES[name]
    return rate[own or fmt] if isinstance(rate, dict) else rate


def task_seconds(cfg: StudyConfig, n_mmlu: int) -> list[tuple[Task, float]]:
    """Each of the study's tasks with one model's evaluation of it at the reference size (`Task.work` × `RATES`)."""
    fmt = cfg.benchmarks.format
    return [(t, sum(units * _rate(name, fmt) for name, units in t.work(n_mmlu).items()))
            for t in study_tasks(cfg.benchmarks, stage_names.cd_build, cfg.data)]


def eval_seconds(tasks: list[tuple[Task, float]], cd: bool = True) -> float:
    """One model's evaluation: every task, or (``cd`` False) those that are not cross-domain."""
    return sum(sec for t, sec in tasks if cd or not t.cross_domain)


def plan(cfg: StudyConfig, n_mmlu: int, params: float | None = None) -> list[PlannedStage]:
    """Every stage `edgefuse.runner.run_study` will pass through, in order, with its estimated seconds."""
    s, b, f = _scale(params), cfg.benchmarks, cfg.fusion
    tasks = task_seconds(cfg, n_mmlu)
    full_eval, edge_eval = eval_seconds(tasks), eval_seconds(tasks, cd=b.edges_alone_cd)
    out = [PlannedStage("data", stage_names.DATA, RATES["setup"])]
    out += [PlannedStage("data", d.name, d.seconds) for t, _ in tasks for d in t.data_plan()]
    out.append(PlannedStage("eval", stage_names.BASE_EVAL, s * full_eval))
    if cfg.compose.retrieval_mixture:
        out += [PlannedStage("embed", stage_names.embed(e), RATES["embed"]) for e in cfg.edges]
    K = len(cfg.edges)
    grams_pass = s * cfg.interference.tokens * RATES["grams_token"]
    edge_grams = cfg.collects_grams and cfg.interference.from_edges  # each edge's pass is part of its training
    if cfg.collects_grams and not edge_grams:  # one base-model pass per distinct set of edge domains
        passes = len({tuple(d) for d in cfg.edges.values()})
        out.append(PlannedStage("grams", stage_names.GRAMS, passes * grams_pass))
    t = cfg.training
    train_s = s * t.steps * t.batch * t.grad_accum * RATES["train_prompt"][t.objective]
    for seed in cfg.seeds:
        for e in cfg.edges:
            p = cfg.pruning_for(e)
            calib = p.calib * RATES["prune_calib"] if p.method in ("taylor", "wanda") else 0.0
            out.append(PlannedStage("prune", stage_names.prune(e, seed), s * (RATES["prune"] + calib)))
        for r in range(1, cfg.rounds.count + 1):
            tag = round_tag(seed, r)
            first_grams = edge_grams and r == 1
            out += [PlannedStage("train", stage_names.train(e, tag), train_s + (grams_pass if first_grams else 0.0))
                    for e in cfg.edges]
            for e in cfg.edges:
                out.append(PlannedStage("recover", stage_names.recover(e, tag), s * RATES["recover"]))
                if b.edges_alone:
                    out.append(PlannedStage("eval", stage_names.eval_edge(e, tag), s * edge_eval))
            if first_grams:  # the edges' Gram matrices gathered into the study's Gram directory
                out.append(PlannedStage("grams", stage_names.edge_grams(tag), 1.0))
            for m, c, name in f.fusions():
                fuse = RATES["fuse"]["elementwise" if _elementwise(m) else "plain"]
                fuse += 0.0 if c.is_off else RATES["fuse"]["cr"]
                fuse += K * RATES["regmean_edge"] if _needs_grams(m) else 0.0
                out.append(PlannedStage("fuse", stage_names.fuse(name, tag), s * fuse))
                if cfg.collects_grams:
                    out.append(PlannedStage("fuse", stage_names.interference(name, tag), s * (
                        K * RATES["interference_edge"] + K * K * RATES["interference_pair"])))
                out.append(PlannedStage("eval", stage_names.evaluation(name, tag), s * full_eval))
        out += composition_plan(cfg, round_tag(seed, cfg.rounds.count), s, n_mmlu, full_eval, tasks)
    return out


def composition_plan(cfg: StudyConfig, tag: str, s: float, n_mmlu: int, full_eval: float,
                     tasks: list[tuple[Task, float]] = ()) -> list[PlannedStage]:
    """The composition stages after the last round (`edgefuse.runner.composition`), in the order they run;
    ``full_eval``: one model's evaluation on every task (LoraHub's fused adapter is evaluated as any fused model).
    Retrieval mixtures are evaluated on MMLU, MMLU-CD and each of ``tasks`` (with their seconds) that is scored
    under mixtures."""
    from edgefuse.compose.schema import LORAHUB_NAME

    b, c = cfg.benchmarks, cfg.compose
    fmt, out = b.format, []
    eval_s = n_mmlu * RATES["mmlu_item"][fmt] if b.mmlu.enabled else 0.0
    cd_ks = b.mmlu_cd.ks if b.mmlu_cd.enabled else []
    if c.lorahub is not None:
        objective = c.lorahub.objective or fmt
        per_eval = RATES["lorahub_eval"] + c.lorahub.examples * RATES["lorahub_example"][objective]
        out.append(PlannedStage("fuse", stage_names.composed(LORAHUB_NAME, tag), s * (c.lorahub.budget + 1) * per_eval))
        out.append(PlannedStage("eval", stage_names.evaluation(LORAHUB_NAME, tag), s * full_eval))
    seen = set()
    for mix in c.retrieval_mixture:
        if b.mmlu.enabled and mix.retrieval_tag not in seen:
            seen.add(mix.retrieval_tag)
            out.append(PlannedStage("eval", stage_names.mixture_mmlu(mix.retrieval_tag, tag),
                                    s * eval_s * RATES["mixture"] + n_mmlu * RATES["query"]))
        if cd_ks:
            # each answer is scored on the whole growing text (no cache across answers): about k items' worth
            per_answer = {k: RATES["mmlu_item"][fmt] * k * RATES["mixture"] for k in cd_ks}
            alone = RATES["mmlu_item"][fmt] * RATES["mixture"] if b.mmlu_cd.single else 0.0
            cd = sum(b.mmlu_cd.n * k * (per_answer[k] + alone + 2 * RATES["query"]) for k in cd_ks)
            out.append(PlannedStage("eval", stage_names.mixture_cd(mix.name, tag), s * cd))
        for task, sec in tasks:
            if task.mixture and (mix.retrieval_tag, task.name) not in seen:
                seen.add((mix.retrieval_tag, task.name))
                out.append(PlannedStage("eval", stage_names.mixture_task(mix.retrieval_tag, task.name, tag),
                                        s * sec * RATES["mixture"]))
    return out


def mark_done(stages: list[PlannedStage], run_dir: Path) -> dict[str, float]:
    """Mark the stages already finished in ``run_dir`` (a finished directory of the same name; a changed
    config may still redo some of them) and return each kind's correction factor, measured ÷ estimated
    over the stages this run directory has run."""
    finished = {}
    for marker in finished_stage_files(run_dir):
        try:
            rec = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        finished[rec.get("name")] = float(rec.get("wall_s", 0.0))
    measured: dict[str, list[float]] = {}
    for st in stages:
        if st.name in finished:
            st.done = True
            if st.seconds > 0 and finished[st.name] > 0:
                measured.setdefault(st.kind, [0.0, 0.0])
                measured[st.kind][0] += finished[st.name]
                measured[st.kind][1] += st.seconds
    factors = {k: m / e for k, (m, e) in measured.items() if e > 0 and m / e > 0}
    for st in stages:
        st.seconds *= factors.get(st.kind, 1.0)
    return factors


def remaining_seconds(stages: list[PlannedStage]) -> float:
    return sum(st.seconds for st in stages if not st.done)


def plan_table(stages: list[PlannedStage]) -> str:
    """A plain listing: one stage a line with its state and estimate, then the total still to run."""
    lines = [f"{'stage':<44} {'kind':<8} {'state':<6} {'estimate':>9}"]
    for st in stages:
        lines.append(f"{st.name:<44} {st.kind:<8} {'done' if st.done else 'to run':<6} {st.seconds / 60:>7.1f} m")
    todo = [st for st in stages if not st.done]
    lines.append(f"{len(todo)} of {len(stages)} stages to run, estimated {remaining_seconds(stages) / 60:.0f} min")
    return "\n".join(lines)


def mmlu_count(cfg: StudyConfig) -> int:
    """How many MMLU items the study scores per model (its ``limit``, or the whole selected test split)."""
    m = cfg.benchmarks.mmlu
    if not m.enabled:
        return 0
    if m.limit is not None:
        return m.limit
    from edgefuse.data.mmlu import SplitSpec, load_mmlu, select

    d = cfg.data
    ds = load_mmlu(None if d.source == "embedded" else d.source)
    spec = SplitSpec(seed=d.split_seed, public_per_subject=d.public_per_subject, edge_fraction=d.edge_fraction)
    return len(select(ds, "test", m.domains, None, None, d.split_seed, spec))


def estimate_study(cfg: StudyConfig, run_dir: Path, params: float | None = None,
                   force: str | None = None) -> list[PlannedStage]:
    """The plan with this run directory's finished stages marked and its measured corrections applied;
    ``force`` (a stage kind) marks that kind and every later one to run again."""

    stages = plan(cfg, mmlu_count(cfg), params)
    mark_done(stages, run_dir)
    for st in stages:
        st.done = st.done and not (force and KINDS.index(st.kind) >= KINDS.index(force))
    return stages
