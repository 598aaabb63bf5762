"""Running the study's plan: `walk` runs each `StageSpec` of `edgefuse.runner.plan.study_plan` by its step, in the
plan's order, and hands each stage what the stages before it produced (pruned models, packages, recovered adapters,
fused adapters).

Why a walk over the plan rather than loops of its own: the run and the estimate then cannot disagree on which
stages exist or in which order (the estimate prices the same list, `run_study` walks it). The one exception to
"one spec, one call" is training: a round's train specs go to the trainer together, so edges on remote devices
train at the same time. Once the data steps ran, the study's inputs are fixed (`Study.fix_inputs`). Stages the
plan lists but the run cannot do are skipped: an edge the trainer did not deliver has no recover or evaluation, a
mixture with more adapters than delivered edges is not scored (and says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgefuse.errors import EdgefuseError
from edgefuse.runner.composition import (MixtureRuns, stage_embed, stage_lorahub, stage_mixture_cd, stage_mixture_mmlu,
                                         stage_mixture_task)
from edgefuse.runner.interference import stage_edge_grams, stage_grams, stage_interference
from edgefuse.runner.plan import StageSpec
from edgefuse.runner.stages import (stage_base_eval, stage_data, stage_eval_adapter, stage_eval_edge, stage_fuse,
                                    stage_prune, stage_recover, stage_task_data, stage_train_all)
from edgefuse.runner.study import Study
from edgefuse.runner.trainers import Trainer


@dataclass
class RoundRun:
    """One round of one seed as far as it ran."""

    packages: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # edge → (package, train result)
    edges: list[dict] = field(default_factory=list)  # the delivered edges' records, in config order
    recovered: dict[str, tuple[dict, str]] = field(default_factory=dict)  # edge → (its record, adapter sha256)
    fusing: dict[str, tuple[Path, dict, StageSpec]] = field(default_factory=dict)  # fused, not yet evaluated
    fused: list[dict] = field(default_factory=list)


@dataclass
class SeedRun:
    """One seed as far as it ran: its pruned models, its rounds, its compositions."""

    seed: int
    pruned: dict[str, tuple[Path, dict, dict]] = field(default_factory=dict)  # edge → (dir, result, inputs)
    rounds: dict[int, RoundRun] = field(default_factory=dict)
    lorahub: tuple[Path, dict] | None = None  # searched, not yet evaluated
    composed: list[dict] = field(default_factory=list)
    mixtures: MixtureRuns | None = None

    def round(self, r: int) -> RoundRun:
        return self.rounds.setdefault(r, RoundRun())


PREPARE_STEPS = ("data", "task_data")  # the steps that write the study's inputs (`Study.fix_inputs`)


class Walk:
    """The state of one run while it walks its plan; `walk` is the entry point."""

    def __init__(self, st: Study, trainer: Trainer):
        self.st, self.trainer = st, trainer
        self.base: dict | None = None
        self.seeds: dict[int, SeedRun] = {}

    def seed(self, spec: StageSpec) -> SeedRun:
        return self.seeds.setdefault(spec.seed, SeedRun(spec.seed))

    def run(self, specs: list[StageSpec]) -> None:
        i = 0
        while i < len(specs):
            spec = specs[i]
            if spec.step not in PREPARE_STEPS and not self.st.inputs_fixed:  # the data is prepared: fixed from here
                self.st.fix_inputs()
            if spec.step == "train":  # the round's edges in one dispatch
                j = i
                while j < len(specs) and specs[j].step == "train" and (specs[j].seed, specs[j].round) == (
                        spec.seed, spec.round):
                    j += 1
                self.train(specs[i:j])
                i = j
                continue
            getattr(self, "_" + spec.step)(spec)
            i += 1

    # ------------------------------------------------------------------------------------------ before the seeds
    def _data(self, spec: StageSpec) -> None:
        stage_data(self.st, spec)

    def _task_data(self, spec: StageSpec) -> None:
        stage_task_data(self.st, spec)

    def _base_eval(self, spec: StageSpec) -> None:
        self.base = stage_base_eval(self.st, spec)

    def _embed(self, spec: StageSpec) -> None:
        stage_embed(self.st, spec)

    def _grams(self, spec: StageSpec) -> None:
        stage_grams(self.st, spec)

    # -------------------------------------------------------------------------------------------- per seed, round
    def _prune(self, spec: StageSpec) -> None:
        self.seed(spec).pruned[spec.edge] = stage_prune(self.st, spec)

    def train(self, specs: list[StageSpec]) -> None:
        """One round's edges; from the second round on each starts from the fused model `StudyConfig.sent_back`
        names (in its own pruned shapes)."""
        s, r = self.seed(specs[0]), specs[0].round
        start = None
        if r > 1:
            sent = self.st.cfg.sent_back()
            start = next(Path(f["adapter"]) for f in s.round(r - 1).fused if f["name"] == sent)
        run = s.round(r)
        run.packages = stage_train_all(self.st, specs, s.pruned, self.trainer, start)
        if not run.packages:
            raise EdgefuseError(f"round {r} (seed {s.seed}): no edge delivered an adapter")

    def _recover(self, spec: StageSpec) -> None:
        s = self.seed(spec)
        run = s.round(spec.round)
        if spec.edge not in run.packages:  # not delivered: recorded in missing_edges
            return
        pruned_dir, prune_res, _ = s.pruned[spec.edge]
        package, train_res = run.packages[spec.edge]
        record, sha = stage_recover(self.st, spec, pruned_dir, package, train_res, prune_res)
        run.edges.append(record)
        run.recovered[spec.edge] = (record, sha)

    def _eval_edge(self, spec: StageSpec) -> None:
        run = self.seed(spec).round(spec.round)
        if spec.edge in run.recovered:
            record, sha = run.recovered[spec.edge]
            record["eval"] = stage_eval_edge(self.st, spec, record, sha)

    def _edge_grams(self, spec: StageSpec) -> None:
        stage_edge_grams(self.st, spec, self.seed(spec).round(spec.round).edges)

    def _fuse(self, spec: StageSpec) -> None:
        run = self.seed(spec).round(spec.round)
        adapter, res = stage_fuse(self.st, spec, run.edges)
        run.fusing[spec.model] = (adapter, res, spec)

    def _interference(self, spec: StageSpec) -> None:
        run = self.seed(spec).round(spec.round)
        self.st.interference.append(stage_interference(self.st, spec, run.edges, run.fusing[spec.model][0]))

    def _eval_fused(self, spec: StageSpec) -> None:
        run = self.seed(spec).round(spec.round)
        adapter, res, fuse = run.fusing.pop(spec.model)
        run.fused.append({"name": spec.model, "method": fuse.method, "cr": fuse.cr.name, "seed": spec.seed,
                          "round": spec.round, "adapter": str(adapter), "fusion": res["stats"],
                          "eval": stage_eval_adapter(self.st, spec, adapter)})

    # ---------------------------------------------------------------------------- compositions, after the last round
    def _lorahub(self, spec: StageSpec) -> None:
        s = self.seed(spec)
        s.lorahub = stage_lorahub(self.st, spec, s.round(spec.round).edges)

    def _eval_composed(self, spec: StageSpec) -> None:
        s = self.seed(spec)
        adapter, record = s.lorahub
        s.composed.append(record | {"eval": stage_eval_adapter(self.st, spec, adapter)})

    def mixtures(self, s: SeedRun) -> MixtureRuns:
        s.mixtures = s.mixtures or MixtureRuns(self.st, s.round(self.st.cfg.rounds.count).edges)
        return s.mixtures

    def _mixture(self, spec: StageSpec, stage) -> None:
        runs = self.mixtures(self.seed(spec))
        if runs.fits(spec.mixture):  # otherwise left out, with a warning in `MixtureRuns.records`
            stage(self.st, spec, runs)

    def _mixture_mmlu(self, spec: StageSpec) -> None:
        self._mixture(spec, stage_mixture_mmlu)

    def _mixture_cd(self, spec: StageSpec) -> None:
        self._mixture(spec, stage_mixture_cd)

    def _mixture_task(self, spec: StageSpec) -> None:
        self._mixture(spec, stage_mixture_task)

    # ------------------------------------------------------------------------------------------------- results
    def seed_record(self, seed: int) -> dict:
        """A seed's entry in results.json: the last round's edges and fused models, every round, the edges left
        out, and (with ``compose``) the composed models and the retrieval accuracy."""
        cfg, s = self.st.cfg, self.seeds[seed]
        sent, n = cfg.sent_back(), cfg.rounds.count
        rounds = [{"round": r, "edges": s.round(r).edges, "fused": s.round(r).fused,
                   "sent_back": sent if r < n else None} for r in range(1, n + 1)]
        out = {"seed": seed, "edges": rounds[-1]["edges"], "fused": rounds[-1]["fused"], "rounds": rounds,
               "missing_edges": [m for m in self.st.missing_edges if m["seed"] == seed]}
        if cfg.compose.enabled:
            mixtures, accuracy = self.mixtures(s).records(seed, n) if cfg.compose.retrieval_mixture else ([], None)
            out |= {"composed": s.composed + mixtures, "retrieval": accuracy}
        return out


def walk(st: Study, specs: list[StageSpec], trainer: Trainer) -> tuple[dict, list[dict]]:
    """Run every stage of ``specs`` (the study's plan) in order; (the base model's summary, each seed's record)."""
    w = Walk(st, trainer)
    w.run(specs)
    return w.base, [w.seed_record(seed) for seed in st.cfg.seeds]
