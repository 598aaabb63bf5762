"""The per-edge memory meter (`TensorPeak`) against allocations of known byte sizes, alone and with another thread
allocating at the same time, and the report's smoothed loss against hand-computed means."""

from __future__ import annotations

import threading

import pytest
import torch

from edgefuse.edge.memory import TensorPeak, storage_bytes
from edgefuse.edge.train import heaviest_step
from edgefuse.report.tables import LOSS_TAIL_STEPS, edges_table, tail_loss

pytestmark = pytest.mark.unit

MB = 1_000_000


def test_tensor_peak_counts_a_known_allocation_once_and_frees_it():
    before = torch.zeros(1000)  # 4,000 bytes that exist before: in-place ops and views on it are not new memory
    with TensorPeak() as meter:
        kept = torch.empty(MB, dtype=torch.float32)  # 4,000,000 bytes
        tmp = torch.empty(MB // 4, dtype=torch.float64)  # 2,000,000 bytes, freed below
        del tmp
        view = kept.view(1000, 1000)  # same storage: no new bytes
        before.add_(1).mul_(2)
        small = before + 1  # 4,000 new bytes
    assert meter.peak == 4 * MB + 2 * MB
    assert meter.live == 4 * MB + 4000
    del kept, view, small
    assert meter.live == 0


def test_backward_and_optimizer_allocations_are_counted():
    layer, x = torch.nn.Linear(100, 100), torch.randn(8, 100)
    opt = torch.optim.AdamW(layer.parameters())
    param_bytes = 4 * (100 * 100 + 100)  # float32 weight and bias
    assert storage_bytes([layer.weight, layer.weight.T, layer.bias]) == param_bytes  # a view counts once
    with TensorPeak() as meter:
        layer(x).sum().backward()
        opt.step()
    # left alive: the gradients and AdamW's two moments (plus at most its two scalar step counters)
    assert 0 <= meter.live - 3 * param_bytes <= 16
    assert meter.peak >= meter.live + 8 * 100 * 4  # the forward's output existed too


def test_each_thread_sees_only_its_own_allocations():
    """Two edges side by side in one process: each meter reports its own allocation, not the process's."""
    sizes, got = {"a": 8 * MB, "b": 3 * MB}, {}
    both_hold = threading.Barrier(2)

    def edge(name: str) -> None:
        with TensorPeak() as meter:
            t = torch.empty(sizes[name], dtype=torch.uint8)
            both_hold.wait()  # both allocations are alive at the same time
            del t
        got[name] = meter.peak

    threads = [threading.Thread(target=edge, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == sizes


class _Steps:
    """A schedule stand-in: fixed micro-batches per step."""

    def __init__(self, steps):
        self.steps = steps

    def step(self, s, accum):
        return self.steps[s]


def test_heaviest_step_is_the_most_padded_tokens():
    sched = _Steps([[[0, 1]], [[2, 3]], [[4]]])
    lengths = [5, 5, 10, 3, 30]  # padded: 2×5 = 10, 2×10 = 20, 1×30 = 30
    assert heaviest_step(sched, range(3), 1, [lengths]) == 2
    assert heaviest_step(sched, range(2), 1, [lengths]) == 1  # a resumed session measures its own steps
    # two encodings (objective "both") pad separately and are held together: 2×(5+100) = 210 wins
    assert heaviest_step(sched, range(3), 1, [lengths, [100, 100, 1, 1, 1]]) == 0
    assert heaviest_step(sched, range(0), 1, [lengths]) is None


def test_tail_loss_is_the_mean_of_the_last_n_steps():
    curve = [7.0] * 5 + [float(i) for i in range(LOSS_TAIL_STEPS)]
    assert LOSS_TAIL_STEPS == 20
    assert tail_loss(curve) == pytest.approx(9.5)  # (0 + 1 + … + 19) / 20; the five 7.0 are left out
    assert tail_loss([0.3, 7.0, 2.0]) == pytest.approx(3.1)  # fewer steps than N: all of them
    assert tail_loss([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}], n=1) == 2.0
    assert tail_loss([[1, 4.0], [2, 6.0]]) == 5.0


def test_edges_table_reports_both_memory_figures_and_the_smoothed_loss():
    train = {"loss_curve": [4.0] * 60 + [1.0, 3.0] * 10, "tensor_peak_bytes": 300 * 2**20,
             "memory_estimate_bytes": 512 * 2**20, "peak_memory_bytes": 2 * 2**20, "tokens_per_s": 10, "wall_s": 5}
    doc = {"base": {}, "seeds": [{"edges": [{"edge": "e", "domains": [], "seed": 0, "train": train}]}]}
    header, _, row = edges_table(doc).splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["edge tensor peak MiB (estimate)"] == "300 (est. 512)"
    assert cells["process memory rise MiB"] == "2"
    assert cells["loss, mean of last 20 steps"] == "2.000"  # the last step alone would read 3.000
