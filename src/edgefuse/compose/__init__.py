"""Dynamic composition of edge adapters: LoraHub-learned fusion weights, and per-input output mixtures served
as mixed-adapter batches."""

from edgefuse.compose.lorahub import LoraHubResult, lorahub, save_lorahub
from edgefuse.compose.mixture import (
    WEIGHTINGS,
    LoraMixture,
    softmax_weights,
    top_k_weights,
    uniform_weights,
    weight_matrix,
)

__all__ = [
    "WEIGHTINGS",
    "LoraHubResult",
    "LoraMixture",
    "lorahub",
    "save_lorahub",
    "softmax_weights",
    "top_k_weights",
    "uniform_weights",
    "weight_matrix",
]
