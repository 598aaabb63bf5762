"""Dynamic composition of edge adapters: LoraHub-learned fusion weights, and per-input output mixtures served
as mixed-adapter batches.

The names below are imported on first use, so that `edgefuse.compose.schema` (the settings, no torch) can be
read by the study config without loading torch."""

from __future__ import annotations

from importlib import import_module

_WHERE = {
    "LoraHubResult": "lorahub", "lorahub": "lorahub", "save_lorahub": "lorahub",
    "WEIGHTINGS": "schema",
    "LoraMixture": "mixture", "softmax_weights": "mixture", "top_k_weights": "mixture",
    "uniform_weights": "mixture", "weight_matrix": "mixture",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'edgefuse.compose' has no attribute {name!r}")
    return getattr(import_module(f"edgefuse.compose.{_WHERE[name]}"), name)
