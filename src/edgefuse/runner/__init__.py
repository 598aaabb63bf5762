"""The study runner (``edgefuse run``): stages cached by their inputs, trainers, and the run's entry point.

- `plan`: `study_plan`, every stage of a study as a `StageSpec`, in order: the one stage graph.
- `estimate`: the plan's duration (each spec priced), for ``--dry-run`` and ``max_minutes``.
- `walk`: runs the plan's specs in order, handing each stage what the earlier ones produced.
- `cache`: `StageCache`, the on-disk store of finished stages (``stages/<name>-<key>/``).
- `study`: `Study`, the context the stages share (its inputs fixed after the data steps), and the one path a stage
  takes through cache and progress.
- `stages`: the stage functions (data, prune, train, recover, fuse, evaluate) and their cache inputs.
- `composition`: the ``compose:`` stages (each edge's retrieval embedding, LoraHub, retrieval mixtures).
- `interference`: the ``grams`` stage (Gram matrices of module inputs on public prompts, for RegMean and the
  interference table) and each fused model's ``interference`` stage.
- `trainers`: the `Trainer` contract, `TrainJob` and the in-process `LocalTrainer` (Flower's is in
  `edgefuse.federated.trainer`).
- `run`: `run_study`, which locks the run directory, estimates the plan, walks it and writes the report.
"""

from edgefuse.runner.run import run_study
from edgefuse.runner.trainers import LocalTrainer, Trainer, TrainJob

__all__ = ["LocalTrainer", "TrainJob", "Trainer", "run_study"]
