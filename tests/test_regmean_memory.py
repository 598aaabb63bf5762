"""RegMean's working memory (issue 22): exact in factored form, it allocates d_in × d_in and (Σr) × d_in matrices
but never an m × n one. A tall module (m = 32·d_in) makes one dense ΔW far larger than every d_in × d_in matrix,
so a peak below a quarter of one dense update can only come from the factored path."""

import pytest
import torch

from edgefuse.adapters import LoraAdapter, LoraModule
from edgefuse.fusion import fuse_adapters
from edgefuse.profiling import allocation_peak

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

NAME = "model.layers.0.mlp.up_proj"
SHAPE = (4096, 128)
UNIT = SHAPE[0] * SHAPE[1] * 4  # one dense float32 ΔW


def test_regmean_allocates_no_dense_update():
    g = torch.Generator().manual_seed(0)
    m, n = SHAPE
    K, r = 4, 4
    ads = [LoraAdapter({NAME: LoraModule(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), 2.0)})
           for _ in range(K)]
    grams = []
    for _ in range(K):
        H = torch.randn(64, n, generator=g, dtype=torch.float64)
        grams.append({NAME: H.T @ H})
    (out, _), peak = allocation_peak(lambda: fuse_adapters(ads, "regmean", grams=grams))
    assert peak is not None
    mod = out.modules[NAME]
    working = peak - (mod.A.numel() + mod.B.numel()) * 4
    assert mod.rank == K * r
    assert working < 0.25 * UNIT, f"regmean working peak {working / UNIT:.2f} dense ΔW units"
