"""The settings of dynamic composition, declared once: the study config (``compose:``), the CLI and the library
read their defaults and choices here.

This module stays light (pydantic only, no torch), like `edgefuse.edge.schema`, so the study config can
validate a ``compose:`` section without loading the models it describes.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

WEIGHTINGS = ("uniform", "softmax")
ROUTINGS = ("instance", "segment")
LORAHUB_OBJECTIVES = ("letters", "cloze")

DEFAULT_TOP_K = 2
DEFAULT_TEMPERATURE = 0.1  # cosine similarities span little; 0.1 makes softmax prefer the closest clearly
DEFAULT_EMBEDDING_EXAMPLES = 32  # an edge's examples averaged into its adapter's vector
LORAHUB_BUDGET = 40  # optimiser evaluations after the start's (the LoraHub paper's default)
LORAHUB_BOUND = 1.5  # weights are searched in [-bound, bound]
LORAHUB_L1 = 0.05  # objective = mean example loss + l1 · mean|w|
LORAHUB_EXAMPLES = 20  # public-split examples the weights are learned on
LORAHUB_METHOD = "task_arithmetic"
LORAHUB_NAME = "lorahub"  # the LoraHub model's name in a study (its stages and its row in the report)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingSettings(_Strict):
    """Each edge adapter's retrieval vector: the mean MiniLM embedding of ``examples`` of the edge's own training
    items (a sample stratified by subject, seeded by ``seed``), as the edge computes it."""

    examples: int = Field(DEFAULT_EMBEDDING_EXAMPLES, ge=1)
    seed: int = 0


class LoraHubSettings(_Strict):
    """LoraHub (Huang et al. 2023): one weight per edge adapter, learned without gradients on ``examples``
    public-split items of the edges' domains, feeding fusion ``method``; the result is evaluated like a fused
    model. ``objective`` None: the study's scoring format; ``seed`` None: the study's seed."""

    examples: int = Field(LORAHUB_EXAMPLES, ge=1)
    budget: int = Field(LORAHUB_BUDGET, ge=0)
    method: str = LORAHUB_METHOD
    objective: Optional[Literal["letters", "cloze"]] = None
    start: Literal["uniform", "zeros"] = "uniform"
    seed: Optional[int] = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from edgefuse.fusion import list_methods  # local: keeps this pydantic schema torch-free (import 0.12 s; edgefuse.fusion brings torch, 1.4 s, measured)

        known = list(list_methods())
        if v not in known:
            raise ValueError(f"unknown fusion method {v!r}; valid: {', '.join(known)}")
        from edgefuse.fusion.registry import METHODS  # local: keeps this pydantic schema torch-free (import 0.12 s; edgefuse.fusion brings torch, 1.4 s, measured)

        if METHODS[v].needs_grams:
            raise ValueError(f"{v} fuses with Gram matrices, which LoraHub does not pass (choose a method without data)")
        return v


class MixtureSettings(_Strict):
    """A retrieval mixture (LoraRetriever / RAMoLE): each request's top-``k`` edge adapters by cosine similarity of
    its embedding, their outputs mixed ``uniform`` (1/k) or by ``softmax`` over similarity / ``temperature``.
    ``routing`` matters on MMLU-CD only: one mixture per ``instance`` or one per question ``segment``."""

    name: Optional[str] = Field(None, description="the row's name in the report (default: "
                                                  "retrieval-k{k}-{weighting}[-t{temperature}]-{routing})")
    k: int = Field(DEFAULT_TOP_K, ge=1)
    weighting: Literal["uniform", "softmax"] = "uniform"
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0)
    routing: Literal["instance", "segment"] = "instance"

    @model_validator(mode="after")
    def _default_name(self) -> "MixtureSettings":
        if self.name is None:
            self.name = f"{self.retrieval_tag}-{self.routing}"
        return self

    @property
    def retrieval_tag(self) -> str:
        """What decides a request's mixture, routing aside (``retrieval-k2-uniform``, ``retrieval-k2-softmax-t0.1``):
        the MMLU half of two settings that differ in routing only is the same evaluation."""
        return f"retrieval-k{self.k}-{self.weighting}" + (f"-t{self.temperature:g}" if self.weighting == "softmax" else "")


class ComposeConfig(_Strict):
    """Dynamic composition in a study, next to the static fusions: LoraHub weights and retrieval mixtures over the
    last round's edge adapters. Both are off unless named (``lorahub: {}`` runs LoraHub with its defaults)."""

    embedding: EmbeddingSettings = EmbeddingSettings()
    lorahub: Optional[LoraHubSettings] = None
    retrieval_mixture: list[MixtureSettings] = []

    @field_validator("retrieval_mixture")
    @classmethod
    def _distinct_names(cls, v: list[MixtureSettings]) -> list[MixtureSettings]:
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError(f"retrieval mixture names must be distinct (got {names})")
        return v

    @property
    def enabled(self) -> bool:
        return self.lorahub is not None or bool(self.retrieval_mixture)
