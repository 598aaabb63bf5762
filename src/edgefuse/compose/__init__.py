"""Dynamic composition of edge adapters: per-input output mixtures, served as mixed-adapter batches."""

from edgefuse.compose.mixture import (
    WEIGHTINGS,
    LoraMixture,
    softmax_weights,
    top_k_weights,
    uniform_weights,
    weight_matrix,
)

__all__ = ["WEIGHTINGS", "LoraMixture", "softmax_weights", "top_k_weights", "uniform_weights", "weight_matrix"]
