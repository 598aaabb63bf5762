"""Module inputs captured by forward hooks: the independent reference for Gram matrices and interference figures."""

from __future__ import annotations

import torch

from edgefuse.interference.collect import adapted_linears


@torch.no_grad()
def hooked_inputs(model, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Each adapted linear layer's inputs H (tokens × d_in, float64) over ``seqs``, one sequence per forward pass."""
    H: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: H.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1])))
             for n, m in adapted_linears(model).items()]
    try:
        for s in seqs:
            model(input_ids=torch.tensor([s]))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v).double() for n, v in H.items()}
