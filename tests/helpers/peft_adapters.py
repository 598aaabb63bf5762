"""Random PEFT LoRA adapters of the seeded tiny model, saved as PEFT directories (the pools of the mixture,
retrieval and scorer tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from edgefuse.models import tiny_model


def save_random_adapters(root: Path, configs: list[dict], seed: int) -> list[Path]:
    """One adapter per ``configs`` entry (`peft.LoraConfig` arguments), its non-zero initialisation seeded with
    ``seed + k`` without touching the global RNG, saved as ``root / a<k>``."""
    dirs = []
    for k, cfg in enumerate(configs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            pm = get_peft_model(tiny_model()[0], LoraConfig(init_lora_weights=False, lora_dropout=0.0, **cfg))
        pm.save_pretrained(str(root / f"a{k}"))
        dirs.append(root / f"a{k}")
    return dirs
