"""Per-module fusion context: resolved hyper-parameters and deterministic random streams."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from edgefuse.adapters import LoraModule, module_names  # noqa: F401 - re-exported: fusion modules import it here


@dataclass
class Ctx:
    """What a method needs to fuse one module (name, target rank, hyper-parameters, RNG)."""

    name: str
    rank: int | None
    density: float = 1.0
    gamma: float = 0.0
    majority: str = "total"
    svd_solver: str = "gram"
    seed: int = 0
    rng: str = "module"  # module: a stream per (seed, module, adapter) | sequential: one shared stream (PEFT order)
    shared_generator: torch.Generator | None = None
    params: dict[str, Any] = field(default_factory=dict)
    recipe: Any = None  # the `elementwise.Recipe` the method (or an aligned method's ``inner``) runs, if any
    grams: list[Any] | None = None  # each adapter's domain Gram matrix of this module's inputs (methods that need data)

    def generator(self, adapter: int) -> torch.Generator:
        """Adapter ``adapter``'s random stream for this module: a function of (seed, module name, adapter index)
        only — so independent of module order, of ``workers`` and of the other adapters — unless
        ``rng='sequential'``, where every adapter and module draws from one shared stream in turn (PEFT)."""
        if self.rng == "sequential" and self.shared_generator is not None:
            return self.shared_generator
        digest = hashlib.sha256(f"{self.seed}:{self.name}:{adapter}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    def generators(self, K: int) -> list[torch.Generator]:
        return [self.generator(k) for k in range(K)]


def present(mods: list[LoraModule | None]) -> list[tuple[int, LoraModule]]:
    """(index, module) of the adapters that have this module."""
    return [(k, m) for k, m in enumerate(mods) if m is not None]


@contextlib.contextmanager
def single_threaded_ops():
    """One intra-op thread while fusing (restored after).

    Why: fusion is thousands of small or medium ops; with two intra-op threads every op synchronises, and
    when the cores are shared (other jobs) each sync can wait a whole scheduler slice — measured 100× slower
    for ``svd`` on a loaded 2-core machine. Parallelism comes from ``workers`` (modules fused concurrently,
    each op single-threaded), which costs ``workers`` modules' memory instead of one.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
