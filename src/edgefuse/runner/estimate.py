"""The study's plan and its duration, estimated before any work starts (``edgefuse run --dry-run``).

Why: a study on a CPU takes hours, and ``max_minutes`` must be able to refuse one before it starts.
Each stage's cost is a count of work units (prompts trained, items scored, …) times a rate in
seconds per unit. The rates (`RATES`) were measured on the project's 2-core CPU with SmolLM2-135M
(BENCHMARKS.md, "Study duration estimate"); other models scale them by their parameter count, and
a run directory that already holds finished stages corrects each kind's rates by how far its own
measured wall times were from their estimates. What is priced is the study's plan (`edgefuse.runner.plan`), the
list `run_study` then walks; the progress display counts it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgefuse.config import StudyConfig
from edgefuse.data.mmlu import load_mmlu, select
from edgefuse.fusion.registry import get_method
from edgefuse.runner.cache import KINDS, finished_stage_files
from edgefuse.runner.plan import StageSpec, plan_tasks, study_plan
from edgefuse.tasks.base import Task

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
    """A stage of the plan (`edgefuse.runner.plan.StageSpec`) with its estimated seconds and whether a finished copy
    is already in the run directory."""

    spec: StageSpec
    seconds: float
    done: bool = False

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def name(self) -> str:
        return self.spec.name


def _scale(params: float | None) -> float:
    return 1.0 if params is None else params / REFERENCE_PARAMS


def _rate(name: str, fmt: str) -> float:
    """A rate by name; ``name:format`` picks a format other than the study's (a cloze-only task in a letters
    study)."""
    name, _, own = name.partition(":")
    rate = RATES[name]
    return rate[own or fmt] if isinstance(rate, dict) else rate


class StageCosts:
    """Each step's cost model: seconds of one `StageSpec` at the model size ``params`` (`price`)."""

    def __init__(self, cfg: StudyConfig, n_mmlu: int, params: float | None, tasks: list[Task]):
        self.cfg, self.n_mmlu, self.s = cfg, n_mmlu, _scale(params)
        self.fmt = cfg.benchmarks.format
        self.task_s = {t.name: sum(units * _rate(name, self.fmt) for name, units in t.work(n_mmlu).items())
                       for t in tasks}
        self.full_eval = sum(self.task_s.values())  # one model on every task
        cd = cfg.benchmarks.edges_alone_cd  # an edge alone: cross-domain tasks only with edges_alone_cd
        self.edge_eval = sum(self.task_s[t.name] for t in tasks if cd or not t.cross_domain)
        self.grams_pass = self.s * cfg.interference.tokens * RATES["grams_token"]

    def price(self, spec: StageSpec) -> float:
        return getattr(self, "_" + spec.step)(spec)

    def _data(self, spec: StageSpec) -> float:
        return RATES["setup"]

    def _task_data(self, spec: StageSpec) -> float:
        return spec.data.seconds

    def _base_eval(self, spec: StageSpec) -> float:
        return self.s * self.full_eval

    _eval_fused = _eval_composed = _base_eval

    def _embed(self, spec: StageSpec) -> float:
        return RATES["embed"]

    def _grams(self, spec: StageSpec) -> float:
        """One base-model pass per distinct set of edge domains."""
        return len({tuple(d) for d in self.cfg.edges.values()}) * self.grams_pass

    def _prune(self, spec: StageSpec) -> float:
        p = self.cfg.pruning_for(spec.edge)
        calib = p.calib * RATES["prune_calib"] if p.method in ("taylor", "wanda") else 0.0
        return self.s * (RATES["prune"] + calib)

    def _train(self, spec: StageSpec) -> float:
        """Its prompts; in the first round with ``interference.source: edges`` also the edge's Gram pass."""
        t, cfg = self.cfg.training, self.cfg
        edge_grams = cfg.collects_grams and cfg.interference.from_edges and spec.round == 1
        return self.s * t.steps * t.batch * t.grad_accum * RATES["train_prompt"][t.objective] + (
            self.grams_pass if edge_grams else 0.0)

    def _recover(self, spec: StageSpec) -> float:
        return self.s * RATES["recover"]

    def _eval_edge(self, spec: StageSpec) -> float:
        return self.s * self.edge_eval

    def _edge_grams(self, spec: StageSpec) -> float:
        return 1.0

    def _fuse(self, spec: StageSpec) -> float:
        """Element-wise methods stream dense blocks (slower); LoRA-CR adds its pass; RegMean reads each edge's Grams."""
        method = get_method(spec.method)
        fuse = RATES["fuse"]["elementwise" if method.density is not None else "plain"]
        fuse += 0.0 if spec.cr.is_off else RATES["fuse"]["cr"]
        fuse += len(self.cfg.edges) * RATES["regmean_edge"] if method.needs_grams else 0.0
        return self.s * fuse

    def _interference(self, spec: StageSpec) -> float:
        K = len(self.cfg.edges)
        return self.s * (K * RATES["interference_edge"] + K * K * RATES["interference_pair"])

    def _lorahub(self, spec: StageSpec) -> float:
        lh = self.cfg.compose.lorahub
        per_eval = RATES["lorahub_eval"] + lh.examples * RATES["lorahub_example"][lh.objective or self.fmt]
        return self.s * (lh.budget + 1) * per_eval

    def _mixture_mmlu(self, spec: StageSpec) -> float:
        return self.s * self.n_mmlu * RATES["mmlu_item"][self.fmt] * RATES["mixture"] + self.n_mmlu * RATES["query"]

    def _mixture_cd(self, spec: StageSpec) -> float:
        """Each answer is scored on the whole growing text (no cache across answers): about k items' worth."""
        cd, item = self.cfg.benchmarks.mmlu_cd, RATES["mmlu_item"][self.fmt] * RATES["mixture"]
        alone = item if cd.single else 0.0
        return self.s * sum(cd.n * k * (item * k + alone + 2 * RATES["query"]) for k in cd.ks)

    def _mixture_task(self, spec: StageSpec) -> float:
        return self.s * self.task_s[spec.task] * RATES["mixture"]


def plan(cfg: StudyConfig, n_mmlu: int, params: float | None = None,
         tasks: list[Task] | None = None) -> list[PlannedStage]:
    """Every stage `edgefuse.runner.run_study` will pass through (`edgefuse.runner.plan.study_plan`), in order, with
    its estimated seconds; ``tasks``: the study's (built from the config when not given)."""
    tasks = plan_tasks(cfg) if tasks is None else tasks
    costs = StageCosts(cfg, n_mmlu, params, tasks)
    return [PlannedStage(spec, costs.price(spec)) for spec in study_plan(cfg, tasks)]


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
    d = cfg.data
    return len(select(load_mmlu(d.mmlu_source), "test", m.domains, None, None, d.split_seed, d.split_spec()))


def estimate_study(cfg: StudyConfig, run_dir: Path, params: float | None = None, force: str | None = None,
                   tasks: list[Task] | None = None) -> list[PlannedStage]:
    """The plan with this run directory's finished stages marked and its measured corrections applied;
    ``force`` (a stage kind) marks that kind and every later one to run again. `run_study` walks the specs of
    this very list."""

    stages = plan(cfg, mmlu_count(cfg), params, tasks)
    mark_done(stages, run_dir)
    for st in stages:
        st.done = st.done and not (force and KINDS.index(st.kind) >= KINDS.index(force))
    return stages
