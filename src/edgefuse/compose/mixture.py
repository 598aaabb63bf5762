"""Output mixing of LoRA adapters at inference, with each row of a batch using its own mixture.

Why: static fusion gives every request one merged adapter; mixing the adapters' *outputs* per input
(each targeted linear layer adds Σᵢ wᵢ·sᵢ·Bᵢ(Aᵢ x) over the adapters chosen for that input) keeps each
adapter's own function intact and lets cross-domain requests use several. The batching follows the
mapping-matrix idea of RAMoLE (Zhao et al. 2024, "Retrieval-Augmented Mixture of LoRA Experts for
Uploadable Machine Learning"): the factors of the batch's adapters are stacked once per module, A's
along the rank axis into (Σr, in) and B's, with their scales folded in, into (out, Σr); a per-row
weight over adapters, expanded to one weight per rank column, selects and mixes them in one pass:
``y = W x + B_cat · ((A_cat x) ⊙ w_row)``. Unlike the released RAMoLE code and PEFT's
``adapter_names=`` (one sub-batch per adapter, no mixing), ranks and scales may differ per adapter
and per module, as pruned edges produce them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from edgefuse.adapters import LoraAdapter
from edgefuse.compose.schema import WEIGHTINGS
from edgefuse.errors import EdgefuseError

_STACK_CACHE = 4  # stacked factor sets kept (one per distinct union of adapters in a batch)


def uniform_weights(k: int) -> torch.Tensor:
    """1/k for each of k adapters (the released RAMoLE code's mixture)."""
    if k < 1:
        raise EdgefuseError(f"a mixture needs at least one adapter, got k = {k}")
    return torch.full((k,), 1.0 / k)


def softmax_weights(similarities, temperature: float = 1.0) -> torch.Tensor:
    """softmax(similarity / temperature) along the last axis: closer adapters weigh more, a lower
    temperature sharpens the mixture towards the closest one."""
    if not temperature > 0:
        raise EdgefuseError(f"softmax temperature must be > 0, got {temperature}")
    sims = torch.as_tensor(similarities, dtype=torch.float32)
    return torch.softmax(sims / temperature, dim=-1)


def top_k_weights(similarities, k: int, weighting: str = "uniform", temperature: float = 1.0) -> torch.Tensor:
    """(rows, n_adapters) mixture weights: each row's k most similar adapters, weighted uniformly or by
    softmax over their similarities; every other adapter gets 0."""
    sims = torch.as_tensor(similarities, dtype=torch.float32)
    sims = sims.unsqueeze(0) if sims.ndim == 1 else sims
    if sims.ndim != 2:
        raise EdgefuseError(f"similarities must be (rows, adapters), got shape {tuple(sims.shape)}")
    if not 1 <= k <= sims.shape[1]:
        raise EdgefuseError(f"k = {k} must be between 1 and the pool size {sims.shape[1]}")
    if weighting not in WEIGHTINGS:
        raise EdgefuseError(f"unknown weighting {weighting!r}; use one of: {', '.join(WEIGHTINGS)}")
    top = sims.topk(k, dim=1)
    if weighting == "uniform":
        w = uniform_weights(k).expand(sims.shape[0], k)
    else:
        w = softmax_weights(top.values, temperature)
    return torch.zeros_like(sims).scatter(1, top.indices, w)


def weight_matrix(mixtures: Sequence[Mapping[int, float]], n_adapters: int) -> torch.Tensor:
    """(rows, n_adapters) weights from one ``{adapter index: weight}`` mapping per row."""
    out = torch.zeros((len(mixtures), n_adapters))
    for row, mix in enumerate(mixtures):
        for j, w in mix.items():
            if not 0 <= j < n_adapters:
                raise EdgefuseError(f"row {row}: adapter index {j} is outside the pool of {n_adapters}")
            out[row, j] = float(w)
    return out


def _resolve_linear(model: nn.Module, name: str, adapter: LoraAdapter, index: int) -> nn.Linear:
    """The model's nn.Linear an adapter module targets, with matching shape, or one clear error."""
    where = adapter.path if adapter.path is not None else f"adapter {index}"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise EdgefuseError(f"the model has no module {name} (adapter made for another model?)", path=where) from None
    if not isinstance(module, nn.Linear):
        raise EdgefuseError(f"module {name} is {type(module).__name__}, not nn.Linear "
                            "(pass the plain transformers model, not a PeftModel)", path=where)
    out_f, in_f = adapter.modules[name].shape
    if (out_f, in_f) != (module.out_features, module.in_features):
        raise EdgefuseError(f"module {name}: adapter update is {out_f}x{in_f}, the model's layer "
                            f"{module.out_features}x{module.in_features}", path=where)
    return module


def _add_product(output: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """output + h·Bᵀ; at inference one GEMM accumulates into the layer's fresh output in place, which
    saves a temporary of the output's size and a pass over it in every adapted layer."""
    if output.requires_grad or not output.is_contiguous():
        return output + F.linear(h, B)
    output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t())
    return output


class LoraMixture:
    """Context manager that adds per-row mixtures of LoRA adapters to a plain transformers model.

    ``with LoraMixture(model, adapters) as mix: mix.set_weights(W); model(...)`` where ``W`` is
    (batch rows, len(adapters)): every position of a row, padding included, uses that row's weights;
    or (batch rows, tokens, len(adapters)): each position uses its own (per-segment routing).
    The model's parameters are never touched: forward hooks add the update, and leaving the context
    removes them, so the model computes exactly what it did before.
    """

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter]):
        if not adapters:
            raise EdgefuseError("a mixture needs at least one adapter")
        self.model, self.n_adapters = model, len(adapters)
        self.linears: dict[str, nn.Linear] = {}
        # per module: [(adapter index, A (r, in), scale·B (out, r))] in the layer's dtype and device
        self.factors: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for j, adapter in enumerate(adapters):
            for name, mod in adapter.modules.items():
                lin = self.linears[name] = _resolve_linear(model, name, adapter, j)
                like = dict(device=lin.weight.device, dtype=lin.weight.dtype)
                folded = mod.folded()
                self.factors.setdefault(name, []).append((j, folded.A.to(**like), folded.B.to(**like)))
        self._stacks: OrderedDict[tuple[int, ...], dict] = OrderedDict()
        self._plans: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._rows = 0
        self._tokens: int | None = None  # set: per-position weights for batches of this many tokens
        self._handles: list = []

    def __enter__(self) -> "LoraMixture":
        if self._handles:
            raise EdgefuseError("this LoraMixture is already active")
        try:
            for name, lin in self.linears.items():
                self._handles.append(lin.register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks and forget the weights and stacked factors."""
        for h in self._handles:
            h.remove()
        self._handles, self._plans, self._rows, self._tokens = [], None, 0, None
        self._stacks.clear()

    def set_weights(self, weights) -> None:
        """Set the mixture weights for the next forward passes: (rows, n_adapters), one mixture per row,
        or (rows, tokens, n_adapters), one per position (e.g. per question segment of a prompt); the
        per-position form then needs batches of exactly that many tokens."""
        w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
        if w.ndim not in (2, 3) or w.shape[-1] != self.n_adapters:
            raise EdgefuseError(f"mixture weights must be (rows, {self.n_adapters}) or (rows, tokens, "
                                f"{self.n_adapters}) for {self.n_adapters} adapters, got shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise EdgefuseError("mixture weights contain NaN or Inf")
        union = tuple(int(j) for j in torch.nonzero(w.abs().reshape(-1, self.n_adapters).sum(0)).flatten())
        expanded: dict[tuple, torch.Tensor] = {}
        plans = {}
        for name, (A, B, cols) in self._stacked(union).items():
            lin = self.linears[name]
            key = (tuple(cols.tolist()), lin.weight.device, lin.weight.dtype)
            if key not in expanded:  # modules with the same adapters and ranks share one expansion
                expanded[key] = w[..., cols].to(device=lin.weight.device, dtype=lin.weight.dtype)
            plans[name] = (A, B, expanded[key])
        self._plans, self._rows = plans, w.shape[0]
        self._tokens = w.shape[1] if w.ndim == 3 else None

    def _stacked(self, union: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per module: A_cat (Σr, in), B_cat (out, Σr) over the union's adapters, and each rank
        column's adapter index; modules no adapter of the union targets are left out."""
        if union in self._stacks:
            self._stacks.move_to_end(union)
            return self._stacks[union]
        chosen = set(union)
        stacks = {}
        for name, parts in self.factors.items():
            parts = [p for p in parts if p[0] in chosen]
            if parts:
                cols = torch.cat([torch.full((A.shape[0],), j, dtype=torch.long) for j, A, _ in parts])
                stacks[name] = (torch.cat([A for _, A, _ in parts]), torch.cat([B for _, _, B in parts], 1), cols)
        self._stacks[union] = stacks
        if len(self._stacks) > _STACK_CACHE:
            self._stacks.popitem(last=False)
        return stacks

    def _hook(self, name: str):
        def add_mixture(module, args, output):
            if self._plans is None:
                raise EdgefuseError("LoraMixture: call set_weights(...) before running the model")
            plan = self._plans.get(name)
            if plan is None:
                return output
            x = args[0]
            if x.ndim < 2 or x.shape[0] != self._rows:
                raise EdgefuseError(f"mixture weights were set for {self._rows} rows, the batch has "
                                    f"{x.shape[0] if x.ndim else 0}")
            A, B, w = plan
            if self._tokens is None:
                w = w.view(self._rows, *([1] * (x.ndim - 2)), w.shape[1])
            elif x.ndim != 3 or x.shape[1] != self._tokens:
                raise EdgefuseError(f"per-token mixture weights were set for {self._tokens} tokens, the batch has "
                                    f"{x.shape[1] if x.ndim == 3 else 'no token axis'}")
            h = F.linear(x, A) * w
            return _add_product(output, h, B)

        return add_mixture
