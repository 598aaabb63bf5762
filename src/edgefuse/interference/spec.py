"""How much public text a domain's Gram matrices see (`GramSpec`), apart from the collection code so that the
study config (`edgefuse.config.InterferenceConfig`) takes its defaults from here without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


# An edge's own Gram matrices (``interference.source: edges``): a one-domain Gram directory of this name beside its
# package in the job's work directory, on the edge and in the cloud's train stage alike.
EDGE_GRAMS_DIR = "grams"


@dataclass(frozen=True)
class GramSpec:
    """How much public text a domain's matrices see: the one place the defaults live (CLI and library)."""

    tokens: int = 1024  # per domain (docs/interference.md: how far 256/512 are from 1024 on SmolLM2)
    per_prompt: int = 64  # tokens of each prompt at most: more prompts, so more subjects, within the budget
    split: str = "public"
    split_seed: int = 0
