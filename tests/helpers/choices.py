"""Comparing the choices two scorers make, where their scores agree only to a tolerance.

Two computations of the same log-likelihoods (batched vs unbatched, packed vs naive, left vs right padding) agree
to about 1e-5 on the CPU, and their last bits depend on the CPU's vector kernels and thread count (issue 21). So
the argmax of two such score rows may differ where the best two choices are nearly tied; anywhere else it must be
the same. A tie is a gap of at most twice the scores' tolerance: within it either pick is consistent with both.
"""

from __future__ import annotations

import torch


def clear_rows(ref: torch.Tensor, margin: float) -> torch.Tensor:
    """Rows whose best score beats the second best by more than ``margin``."""
    top2 = ref.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) > margin


def assert_same_choices(got: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """Same argmax as ``ref`` in every row that is not a near tie (gap ≤ 2·atol), and at least one such row so
    the check says something."""
    clear = clear_rows(ref, 2 * atol)
    assert clear.any(), "every row is a near tie: the comparison would check nothing"
    diff = (got.argmax(-1) != ref.argmax(-1)) & clear
    assert not diff.any(), f"choices differ in rows {diff.nonzero().flatten().tolist()} (gap > {2 * atol})"
