"""Who trains the edges: the `Trainer` contract, one edge's `TrainJob`, and the in-process `LocalTrainer`.

Why a contract: the study is the same whether the edges train in this process or on Flower SuperNodes
(`edgefuse.federated.trainer.FlowerTrainer`); the runner only hands a trainer the jobs whose stage is not
cached and stores the packages it writes. A trainer says whether it trains its jobs together (``parallel``:
the jobs are sent in one call, so remote edges train at the same time) and which memory budgets its devices
report (each becomes that edge's pruning budget; none for a local trainer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from edgefuse.edge.train import checkpoint_dir_for, train_edge
from edgefuse.interference.collect import write_edge_grams
from edgefuse.interference.grams import MANIFEST_FILE as GRAMS_MANIFEST
from edgefuse.interference.spec import EDGE_GRAMS_DIR
from edgefuse.io import read_json

if TYPE_CHECKING:
    from edgefuse.runner.study import Study

log = logging.getLogger("edgefuse.run")


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
    grams: Any = None  # a GramSpec when the study asks edges for their own Gram matrices (interference.source: edges)

    @property
    def package_dir(self) -> Path:
        return self.work_dir / "package"

    @property
    def grams_dir(self) -> Path:
        """Where the edge's own Gram matrices go (a one-domain Gram directory), when ``grams`` asks for them."""
        return self.work_dir / EDGE_GRAMS_DIR


class Trainer(Protocol):
    """Trains edges: writes each job's package to ``job.package_dir`` or sets ``job.failure``."""

    parallel: bool  # True: `train` gets every pending job of a round in one call

    def check(self, cfg) -> None:
        """Refuse, before any stage runs, a study this trainer cannot train (optional: `run_study` calls it when
        present)."""
        ...

    def device_budgets(self, edges: list[str]) -> dict[str, float]:
        """Memory budget (GiB) each edge's device reports; the edges it does not know are left out."""
        ...

    def train(self, st: Study, jobs: list[TrainJob]) -> None:
        ...


class LocalTrainer:
    """Train each edge in this process, one after the other, resuming from checkpoints when present."""

    parallel = False

    def device_budgets(self, edges: list[str]) -> dict[str, float]:
        return {}  # this machine's memory is the study's pruning settings' business

    def train(self, st: Study, jobs: list[TrainJob]) -> None:
        for job in jobs:
            items = st.items_of("edge", job.domains)
            state = checkpoint_dir_for(job.package_dir) / "state.json"
            if state.is_file():  # an interrupted run: the stage's work directory kept this edge's last checkpoint
                log.info("edge %s: resuming from its checkpoint at step %d of %d (%s)", job.edge,
                         read_json(state)["step"], job.config.steps, state.parent)
            if job.grams is not None and not (job.grams_dir / GRAMS_MANIFEST).is_file():
                # as a Flower edge does: the base model over this edge's own prompts (a resumed job has them already:
                # they are written all or nothing)

                write_edge_grams(st.model, st.tokenizer, items, job.grams, job.grams_dir, job.edge, st.cfg.model,
                                 st.cfg.data.split_seed)
            train_edge(job.pruned_dir, job.edge, items, job.config, job.package_dir, progress=job.advance,
                       resume=state.is_file(), init_dir=job.init_dir,
                       device=st.precision.device, dtype=st.precision.dtype)
