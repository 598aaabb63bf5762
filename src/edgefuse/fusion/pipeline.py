"""The shared element-wise merge mechanism: sparsify → weight → sign consensus → combine.

Why: TIES, DARE (linear and TIES), magnitude pruning, Model Breadcrumbs and task arithmetic differ only in
which step they switch on (as mergekit frames them). One `Recipe` names the configuration and one function,
`merge_stack`, runs it on a stack of K task tensors — dense ΔW of one module, KnOTS' aligned V blocks, or
Core Space's core matrices. Work is in place on the stack, so peak memory is the stack plus ~2 buffers.

Conventions (each explicit, and documented where PEFT differs):
- counts use ``int(density · numel)`` like PEFT/mergekit;
- sparsification acts on unweighted tensors (rankings are scale-invariant), then weights multiply;
- the sign is elected on the *weighted* tensors (mergekit; a negative weight flips what the adapter
  contributes). PEFT elects on unweighted tensors: identical whenever the weights are equal and positive;
- TIES' disjoint merge divides by the number of agreeing non-zero entries (paper, PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Recipe:
    """A configuration of the shared steps."""

    sparsify: str = "none"  # none | magnitude | random | breadcrumbs
    rescale: bool = False  # DARE: divide survivors by density to keep the expectation
    consensus: bool = False  # TIES: elect a sign per element, drop disagreeing entries
    combine: str = "sum"  # sum | disjoint_mean

    @property
    def is_linear(self) -> bool:
        """Linear recipes are exact in factored form; no dense ΔW is ever needed."""
        return self.sparsify == "none" and not self.consensus and self.combine == "sum"


def _kth_largest(absx: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(absx.reshape(-1), absx.numel() - k + 1).values


def sparsify_(x: torch.Tensor, recipe: Recipe, density: float, gamma: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Sparsify one task tensor in place and return it."""
    n = x.numel()
    if recipe.sparsify == "magnitude":
        k = int(density * n)
        if k >= n:
            return x
        if k <= 0:
            return x.zero_()
        absx = x.abs()
        x.mul_(absx >= _kth_largest(absx, k))
    elif recipe.sparsify == "random":
        if density >= 1:
            return x
        mask = torch.bernoulli(torch.full_like(x, density), generator=generator)
        x.mul_(mask)
        if recipe.rescale:
            x.div_(density)
    elif recipe.sparsify == "breadcrumbs":
        top = int(gamma * n)
        keep = min(int(density * n), n - top)
        if keep <= 0:
            return x.zero_()
        absx = x.abs()
        mask = absx >= _kth_largest(absx, top + keep) if top + keep < n else torch.ones_like(absx, dtype=torch.bool)
        if top > 0:
            mask &= absx < _kth_largest(absx, top)
        x.mul_(mask)
    elif recipe.sparsify != "none":
        raise ValueError(f"unknown sparsifier {recipe.sparsify!r}")
    return x


def merge_stack(T: torch.Tensor, weights: list[float], recipe: Recipe, *, density: float = 1.0, gamma: float = 0.0,
                majority: str = "total", generators: list[torch.Generator | None] | None = None,
                present: list[bool] | None = None) -> torch.Tensor:
    """Run ``recipe`` on the stack ``T`` (K × …), consuming it; returns the merged tensor (a view of T[0]).

    ``present[k]`` False marks an adapter that lacks this module (a zero slot): it is neither sparsified
    nor drawn for, so random streams match a merge of only the present adapters.
    """
    K = T.shape[0]
    present = present or [True] * K
    generators = generators or [None] * K
    for k in range(K):
        if present[k] and recipe.sparsify != "none":
            sparsify_(T[k], recipe, density, gamma, generators[k])
        T[k].mul_(weights[k])
    count = None
    if recipe.consensus:
        if majority == "total":
            elected = T.sum(0)
        elif majority == "frequency":
            elected = T[0].sign()
            for k in range(1, K):
                elected.add_(T[k].sign())
        else:
            raise ValueError(f"majority must be 'total' or 'frequency', not {majority!r}")
        elected = torch.where(elected >= 0, 1.0, -1.0).to(T.dtype)
        count = torch.zeros_like(elected)
        for k in range(K):
            agree = (T[k] * elected) > 0
            T[k].mul_(agree)
            count.add_(agree)
        del elected
    if recipe.combine == "disjoint_mean" and count is None:
        count = (T != 0).sum(0).to(T.dtype)
    out = T[0]
    for k in range(1, K):
        out.add_(T[k])
    if recipe.combine == "disjoint_mean":
        out.div_(count.clamp_min_(1.0))
    return out


# Named configurations of the shared steps (also the inner merges of KnOTS and Core Space).
RECIPES: dict[str, Recipe] = {
    "task_arithmetic": Recipe(),
    "ties": Recipe(sparsify="magnitude", consensus=True, combine="disjoint_mean"),
    "dare_linear": Recipe(sparsify="random", rescale=True),
    "dare_ties": Recipe(sparsify="random", rescale=True, consensus=True, combine="disjoint_mean"),
    "magnitude_prune": Recipe(sparsify="magnitude"),
    "breadcrumbs": Recipe(sparsify="breadcrumbs"),
    "breadcrumbs_ties": Recipe(sparsify="breadcrumbs", consensus=True, combine="disjoint_mean"),
}
