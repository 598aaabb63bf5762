"""Cloud-side fusion of K LoRA adapters: classic merges, LoRA-LEGO, KnOTS, Core Space, and LoRA-CR.

Everything works in factored form (ΔW = B·A); element-wise methods stream one module at a time.
"""

from edgefuse.fusion.api import fuse_adapters, fuse_dirs, merge_into_model
from edgefuse.fusion.conflict import analyze_conflicts, resolve_conflicts
from edgefuse.fusion.registry import list_cr_strategies, list_methods
from edgefuse.fusion.request import FusionRequest

__all__ = [
    "FusionRequest",
    "analyze_conflicts",
    "fuse_adapters",
    "fuse_dirs",
    "list_cr_strategies",
    "list_methods",
    "merge_into_model",
    "resolve_conflicts",
]
