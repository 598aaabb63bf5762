"""Importance scores for pruning: weight magnitude, Wanda, first-order Taylor, random; block influence.

Element scores of a weight W (out × in):
- ``magnitude``: |W|.
- ``wanda``: |W_ij|·‖x_j‖₂, x the layer's input over calibration tokens (Sun et al., "A Simple and
  Effective Pruning Approach for Large Language Models", ICLR 2024).
- ``taylor``: |W_ij·∂L/∂W_ij|, the first-order Taylor estimate of the loss change when the weight
  is removed, L the next-token loss on calibration prompts (Ma et al., "LLM-Pruner: On the
  Structural Pruning of Large Language Models", NeurIPS 2023).
- ``random``: seeded uniform noise, the ablation baseline.

Structured groups score as the sum of their elements' scores: an MLP channel owns a row of gate and
up and a column of down; a KV group owns its k/v rows plus the q rows and o columns of every query
head that shares it (grouped-query attention keeps them together). Fused projections (Phi-3's
``qkv_proj``, ``gate_up_proj``) give each of their row segments to its group the same way
(`edgefuse.edge.families`).

Layers (depth pruning) score by block influence, 1 − mean cos(h_in, h_out) over calibration tokens
(Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", 2024);
``taylor`` uses the layer's summed Taylor score instead and ``random`` noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgefuse.edge.families import (
    CHANNELS,
    HEADS,
    HIDDEN,
    KV,
    base_dims,
    family_for,
    part_of,
    segment_size,
    segments,
)
from edgefuse.errors import EdgefuseError
from edgefuse.models import make_batch, unwrap
from edgefuse.tokens import bos_prefix, encode_prompts, keep_end

CALIB_MAX_TOKENS = 256


def decoder_layers(model):
    return unwrap(model).model.layers


def projection_names(model) -> tuple[str, ...]:
    """The model's family's projections, in layer order (refuses unsupported families)."""
    return family_for(unwrap(model).config).names


def projection(layer, proj: str):
    return getattr(getattr(layer, part_of(proj)), proj)


@dataclass
class CalibStats:
    """What one pass over the calibration prompts measured."""

    in_sq: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # Σ x_j² per input feature
    grads: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # ∂L/∂W summed over prompts
    influence: torch.Tensor | None = None  # (layers,) block influence
    tokens: int = 0


def needs_calibration(method: str, structure: str) -> bool:
    return method in ("wanda", "taylor") or (structure == "depth" and method != "random")


def collect_stats(model, tokenizer, prompts: list[str], *, inputs: bool = False, grads: bool = False,
                  influence: bool = False, batch_size: int = 4) -> CalibStats:
    """Run the calibration prompts once and gather input norms, gradients and/or block influence."""
    if not prompts:
        raise EdgefuseError("this pruning method needs calibration prompts (--calib N with N ≥ 1)")
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    stats = CalibStats()
    state: dict[str, torch.Tensor] = {}
    hooks = []
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)

    def input_hook(key):
        def hook(mod, args):
            x = args[0].detach().float()
            m = state["mask"].unsqueeze(-1).to(x.dtype)
            s = ((x * x) * m).sum(dim=(0, 1)).cpu()
            stats.in_sq[key] = stats.in_sq.get(key, 0) + s
        return hook

    def layer_pre(i):
        def hook(mod, args, kwargs):
            state[f"in{i}"] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def layer_post(i):
        def hook(mod, args, kwargs, out):
            h_out = (out[0] if isinstance(out, tuple) else out).detach().float()
            h_in = state.pop(f"in{i}").float()
            c = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            cos_sum[i] += float((c * state["mask"]).sum())
        return hook

    names = projection_names(model)
    for i, layer in enumerate(layers):
        if inputs:
            for p in names:
                hooks.append(projection(layer, p).register_forward_pre_hook(input_hook((i, p))))
        if influence:
            hooks.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
            hooks.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
    head = bos_prefix(tokenizer)  # calibration prompts start as the model sees them: with its default BOS
    enc = [keep_end(e, CALIB_MAX_TOKENS, head) for e in encode_prompts(tokenizer, prompts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(grads and ".layers." in n)
            p.grad = None
        for start in range(0, len(enc), batch_size):
            b = make_batch(enc[start:start + batch_size], pad, "right", device)
            state["mask"] = b.attention_mask.float()
            stats.tokens += int(b.attention_mask.sum())
            with torch.set_grad_enabled(grads):
                out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                            use_cache=False)
                if grads:
                    logits = out.logits[:, :-1].float()
                    target = b.input_ids[:, 1:].masked_fill(b.attention_mask[:, 1:] == 0, -100)
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                             ignore_index=-100, reduction="sum")
                    loss.backward()
                    _accumulate_grads(stats.grads, layers, names)
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
            p.grad = None
        model.train(was_training)
    if influence:
        stats.influence = (1.0 - cos_sum / max(stats.tokens, 1)).float()
    return stats


def _accumulate_grads(acc: dict[tuple[int, str], torch.Tensor], layers, names) -> None:
    """Add each projection's weight gradient to ``acc`` in float32 and clear it.

    Why per batch: a bfloat16 model's ``.grad`` is bfloat16, and summing the batches there would round
    every partial sum to 8 bits of mantissa; in float32 this is the very sum autograd would have formed."""
    for i, layer in enumerate(layers):
        for p in names:
            w = projection(layer, p).weight
            g = torch.zeros_like(w, dtype=torch.float32) if w.grad is None else w.grad.detach().float()
            acc[(i, p)] = g if (i, p) not in acc else acc[(i, p)].add_(g)
            w.grad = None


def element_scores(model, method: str, stats: CalibStats | None, seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    """Score of every weight of every decoder projection (higher = more important)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[tuple[int, str], torch.Tensor] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for p in projection_names(model):
            w = projection(layer, p).weight.detach().float()
            if method == "magnitude":
                s = w.abs()
            elif method == "wanda":
                s = w.abs() * stats.in_sq[(i, p)].to(w.device).sqrt().unsqueeze(0)
            elif method == "taylor":
                s = (w * stats.grads[(i, p)].float()).abs()
            elif method == "random":
                s = torch.rand(w.shape, generator=gen).to(w.device)
            else:
                raise EdgefuseError(f"unknown pruning method {method!r}")
            out[(i, p)] = s
    return out


def group_scores(model, scores: dict[tuple[int, str], torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per layer: ``mlp`` (intermediate,) channel scores and ``kv`` (kv heads,) group scores.

    Each projection's row scores go, segment by segment, to the heads / KV groups / channels the rows
    belong to, and its column scores likewise; a query head's total then joins its KV group's.
    """
    cfg = unwrap(model).config
    base, family = base_dims(cfg), family_for(cfg)
    nq, nkv, hd = base["num_attention_heads"], base["num_key_value_heads"], base["head_dim"]
    res = []
    for i in range(len(decoder_layers(model))):
        acc = {k: torch.zeros(segment_size(base, k)) for k in (HEADS, KV, CHANNELS)}
        for p in family.projections:
            s = scores[(i, p.name)]
            rows = s.sum(1).cpu()
            for kind, start, size in segments(base, p.rows):
                if kind != HIDDEN:
                    acc[kind] += rows[start:start + size]
            if p.cols != HIDDEN:
                acc[p.cols] += s.sum(0).cpu()
        q_head = acc[HEADS].reshape(nq, hd).sum(1)
        kv = acc[KV].reshape(nkv, hd).sum(1) + q_head.reshape(nkv, nq // nkv).sum(1)
        res.append({"mlp": acc[CHANNELS], "kv": kv})
    return res


def layer_scores(model, method: str, stats: CalibStats | None, seed: int = 0) -> torch.Tensor:
    """One score per decoder layer (higher = keep)."""
    n = len(decoder_layers(model))
    if method == "random":
        return torch.rand(n, generator=torch.Generator().manual_seed(seed))
    if method == "taylor":
        el = element_scores(model, "taylor", stats, seed)
        return torch.tensor([float(sum(el[(i, p)].sum() for p in projection_names(model))) for i in range(n)])
    return stats.influence


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, ascending (ties broken by lower index)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])
