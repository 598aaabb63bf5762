"""The edge layer's settings and file names, declared once: the CLI, the study config and the library read them here.

Why one module: a default written in two places drifts (the CLI once pruned with 32 calibration prompts
where a study used 16). `PruningConfig` and `TrainConfig` carry every default and bound; the constants
name the files and kinds that pruning, training and recovery write and check. This module stays light
(pydantic and the family table, no torch), so the command line can build its options from it at startup.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefuse.edge.families import ALL_PROJECTIONS, ROLES

PLAN_FILE = "plan.json"  # edgefuse.artifacts.PrunePlan
MODEL_META = "edgefuse_model.json"  # beside a pruned model: edgefuse.artifacts.PrunedModelMeta
CHECKPOINT_STATE = "state.json"  # in a training checkpoint directory, beside the LoRA and optimizer tensors

PruneMethod = Literal["magnitude", "wanda", "taylor", "random"]
PruneStructure = Literal["width", "depth", "unstructured", "2:4"]
METHODS: tuple[str, ...] = get_args(PruneMethod)
STRUCTURES: tuple[str, ...] = get_args(PruneStructure)


class PruningConfig(BaseModel):
    """How the cloud prunes for an edge (the study's ``pruning`` section and ``edgefuse prune``'s defaults)."""

    model_config = ConfigDict(extra="forbid")

    method: PruneMethod = "magnitude"
    structure: PruneStructure = "width"
    ratio: Optional[float] = Field(0.25, ge=0, lt=1)
    memory_budget_gib: Optional[float] = Field(None, gt=0)
    calib: int = Field(16, ge=0, description="calibration prompts from the public split")


class TrainConfig(BaseModel):
    """Hyper-parameters of edge LoRA training (everything but steps/checkpointing fixes a run's identity)."""

    steps: int = Field(80, ge=1)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    lr: float = Field(3e-4, gt=0)
    batch: int = Field(8, ge=1)
    seq: int = Field(256, ge=8)
    grad_accum: int = Field(1, ge=1)
    targets: list[str] = Field(default_factory=lambda: list(ROLES), description=(
        "projections to adapt, in any family's names; each model adapts its own projections doing their work "
        "(families.resolve_targets: q_proj on Phi-3 adapts qkv_proj). The default, the seven Llama names, is "
        "every projection of every family"))
    seed: int = 0
    checkpoint_every: int = Field(20, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    bucket: int = Field(16, ge=1)
    grad_checkpointing: bool = False
    objective: Literal["letters", "cloze", "both"] = Field(
        "letters", description="what the loss teaches: the answer letter after the lettered prompt, the answer "
                               "text after the cloze prompt, or the mean of both")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in ALL_PROJECTIONS]
        if bad or not v:
            raise ValueError(f"targets must be among {', '.join(ALL_PROJECTIONS)} (got {v})")
        return sorted(set(v), key=ALL_PROJECTIONS.index)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must share to be resumed (steps may grow; the schedule is step-indexed)."""
        return self.model_dump(exclude={"steps", "checkpoint_every"})


def default(model: type[BaseModel], name: str) -> Any:
    """The declared default of ``model``'s field ``name`` (what a CLI option shows and falls back to)."""
    return model.model_fields[name].get_default(call_default_factory=True)


def lower_bound(model: type[BaseModel], name: str) -> float | None:
    """The inclusive lower bound (``ge``) of ``model``'s field ``name``, or None: a CLI option's ``min``."""
    return next((m.ge for m in model.model_fields[name].metadata if getattr(m, "ge", None) is not None), None)
