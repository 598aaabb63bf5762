"""Memory of LoRA training on a (pruned) decoder: an a-priori estimate and a measured peak.

Why: ``--memory-budget`` must choose the pruning ratio *before* anything is trained, so the estimate
is a closed formula over the architecture and the training shape; the measured peak (recorded in
every package) shows how far off it is. The estimate counts, in float32:
- frozen weights: embeddings (once when tied) and every decoder/norm parameter;
- LoRA: parameters, gradients and AdamW's two moments (4 copies);
- activations kept for backward, per token and layer: ~6 hidden-size tensors (norm inputs/outputs,
  residual sums), 3 of each attention width (q, its RoPE output, the attention output) and of the
  KV width, 4 of the MLP width (gate, up, SiLU, product) and the rank-r LoRA intermediates. The
  training loss uses the head at one position per prompt (edgefuse.edge.train), so no vocabulary-
  sized logits are stored;
- a fixed runtime overhead (allocator, autograd bookkeeping).
The tensor count above undercounts what autograd, SDPA and the allocator really hold: on CPU
(float32, SDPA, glibc) the measured peaks of bench/edge_memory.py at ratios 0/0.25/0.5 were 1.46–1.55×
the raw total, so activations are multiplied by ``ACTIVATION_FACTOR`` = 1.75, fitted to those three
measurements (within ±4% of each; see BENCHMARKS.md). The estimate is for the configured ``seq``;
real batches are only as long as their longest prompt, so it is an upper bound in that respect.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgefuse.edge.families import family_of, projection_shape, resolve_targets

GIB = 1024 ** 3
RUNTIME_OVERHEAD = 64 * 1024 ** 2
ACTIVATION_FACTOR = 1.75


def estimate_training_bytes(dims: dict, *, batch: int, seq: int, rank: int, targets: list[str],
                            vocab: int, tied: bool, grad_checkpointing: bool = False) -> dict:
    """Estimated peak bytes of LoRA training; ``dims`` gives layers/hidden/widths of the model trained."""
    L, h = dims["num_hidden_layers"], dims["hidden_size"]
    hd = dims["head_dim"]
    width = {"h": h, "q": dims["num_attention_heads"] * hd, "kv": dims["num_key_value_heads"] * hd,
             "i": dims["intermediate_size"]}
    per_layer = 2 * width["q"] * h + 2 * width["kv"] * h + 3 * width["i"] * h + 2 * h
    weights = 4 * (vocab * h * (1 if tied else 2) + L * per_layer + h)
    family = family_of(dims)
    adapted = [family.projection(t) for t in resolve_targets(family, targets)]
    lora_params = L * sum(rank * sum(projection_shape(dims, p)) for p in adapted)
    lora = 4 * 4 * lora_params
    tokens = batch * seq
    act_token_layer = 6 * h + 3 * width["q"] + 3 * width["kv"] + 4 * width["i"] + len(adapted) * rank
    if grad_checkpointing:
        activations = 4 * tokens * (L * h + act_token_layer)
    else:
        activations = 4 * tokens * L * act_token_layer
    activations += 4 * tokens * h * 2
    activations *= ACTIVATION_FACTOR
    total = weights + lora + activations + RUNTIME_OVERHEAD
    return {"total_bytes": int(total), "weights_bytes": int(weights), "lora_bytes": int(lora),
            "activations_bytes": int(activations), "overhead_bytes": RUNTIME_OVERHEAD,
            "total_gib": round(total / GIB, 4), "batch": batch, "seq": seq, "rank": rank}


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; falls back to the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """The *process's* peak memory while a block runs: CUDA allocator peak on GPU, sampled RSS above the
    start on CPU. True for the block only when nothing else runs in the process and the allocator held no
    free memory at the start (a fresh process, as in bench/edge_memory.py); otherwise see `TensorPeak`."""

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.01):
        self.cuda = str(device).startswith("cuda")
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss())

    @property
    def used_bytes(self) -> int:
        """Peak above the level at entry."""
        return max(0, self.peak - self.start)


def _storage(t: torch.Tensor):
    """The tensor's storage, or None for layouts without one (sparse, nested)."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view or a tied weight is counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = _storage(t)
        if st is not None:
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensors the ops of *this thread* create while the block runs (and keep alive).

    Why: RSS and ``torch.cuda.max_memory_allocated`` are per process / per device, so they cannot say what
    one edge used when anything else shares the process: work on other threads, or edges trained one
    after another, where the allocator hands an edge memory an earlier edge freed and the RSS rise hides
    it (the CPU study read 380 MiB for one of four edges of the same shape, ~2,300 MiB for the others). A
    dispatch mode is thread-local (autograd's backward threads inherit it), so this figure is the block's
    own on any device. Each new storage counts its size at creation until it is freed (views once); the
    allocator's rounding, caches and fragmentation and memory outside torch are not in it. Cost: a
    Python call per op, which is why training measures one step with it (edgefuse.edge.train)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()
        self._lock = threading.Lock()  # a storage may be freed on another thread

    def _freed(self, key: int, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes
            self._seen.discard(key)

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        st = _storage(t)
        if st is None or st._cdata in self._seen or st._cdata in inputs:
            return  # no storage, already counted, or an in-place result / view of an argument
        key, nbytes = st._cdata, st.nbytes()
        with self._lock:
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._freed, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {st._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and (st := _storage(t)) is not None}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out


@contextlib.contextmanager
def measure_peak(device="cpu") -> Iterator[PeakMemory]:
    with PeakMemory(device) as pm:
        yield pm
