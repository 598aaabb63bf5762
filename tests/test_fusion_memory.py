"""Working memory of one module's element-wise merge, measured by tracking torch's allocations (issue 4:
never more than one module's dense ΔW per adapter, i.e. below K dense units for K adapters)."""

import pytest
import torch

from edgefuse.adapters import LoraAdapter, LoraModule
from edgefuse.fusion import fuse_adapters
from edgefuse.profiling import allocation_peak as profiled_peak

NAME = "model.layers.0.mlp.up_proj"
SHAPE = (1536, 576)  # SmolLM2-135M's largest module
UNIT = SHAPE[0] * SHAPE[1] * 4  # one dense float32 ΔW of it


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


def allocation_peak(fn):
    res, peak = profiled_peak(fn)
    assert peak is not None, "the profiler reported no allocations"
    return res, peak


def _adapters(K, seed=0, opposing=False):
    g = torch.Generator().manual_seed(seed)
    m, n = SHAPE
    mods = [
        LoraModule(0.02 * torch.randn(16, n, generator=g), 0.01 * torch.randn(m, 16, generator=g), 2.0)
        for _ in range(K)
    ]
    if opposing:  # adapter 1 pulls against adapter 0: LoRA-CR flags the module and edits it densely
        mods[1] = LoraModule(mods[0].A.clone(), -0.6 * mods[0].B, 2.0)
    return [LoraAdapter({NAME: x}) for x in mods]


def _working_units(ads, method, **kw):
    (out, stats), peak = allocation_peak(lambda: fuse_adapters(ads, method, rank=16, **kw))
    m = out.modules[NAME]
    return (peak - (m.A.numel() + m.B.numel()) * m.A.element_size()) / UNIT, stats


def test_instrument_sees_transient_workspace():
    """The measure is not vacuous: a dense temporary inside one expression is counted."""
    _, peak = allocation_peak(lambda: float(torch.ones(SHAPE).sum()))
    assert peak / UNIT == pytest.approx(1.0, abs=0.01)
    # and a LAPACK workspace allocated inside torch.linalg.eigh (2c² + 6c + 1 floats beyond the output copy)
    G = torch.eye(576)
    _, peak = allocation_peak(lambda: torch.linalg.eigh(G))
    assert peak >= (2 * 576 * 576) * 4


@pytest.mark.parametrize(
    "method,kw",
    [
        ("ties", {}),
        ("dare_linear", {}),
        ("dare_ties", {}),
        ("magnitude_prune", {}),
        ("breadcrumbs", {}),
        ("breadcrumbs_ties", {}),
        ("ties", {"svd_solver": "exact"}),
    ],
)
def test_elementwise_working_peak_below_one_dense_update_per_adapter(method, kw):
    K = 4
    units, _ = _working_units(_adapters(K), method, density=0.5, **kw)
    assert units < K, f"{method}: working peak {units:.2f} dense ΔW units for K = {K}"


def test_working_peak_grows_by_blocks_not_dense_updates_with_K():
    """Row blocks: each further adapter adds one row block (≈ 0.07 units here), not a dense update, so 8
    adapters stay under the K = 4 budget."""
    units4, _ = _working_units(_adapters(4), "ties", density=0.5)
    units8, _ = _working_units(_adapters(8, seed=1), "ties", density=0.5)
    assert units8 < 4 and (units8 - units4) / 4 < 0.25, (units4, units8)


def test_lora_cr_element_working_peak():
    K = 4
    units, stats = _working_units(_adapters(K, opposing=True), "ties", density=0.5, cr="element")
    assert stats["cr"]["modules_flagged"] == 1 and stats["cr"]["params_changed"] > 0
    assert units < K, f"ties+cr:element: working peak {units:.2f} dense ΔW units for K = {K}"
