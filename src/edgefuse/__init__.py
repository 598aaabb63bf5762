"""edgefuse: cloud-edge LoRA collaboration (prune -> train -> recover -> fuse -> evaluate)."""

__version__ = "0.1.0"
