"""An independent reference for pruning: the full model with the pruned rows/columns/layers zeroed, and the
prompts the pruning tests feed both."""

from __future__ import annotations

import torch

PROMPTS = ["Question: what is two plus two? A. one B. two C. three D. four Answer: D",
           "The following are multiple choice questions (with answers) about science.",
           "abc def 0123 (x) = y; z!", "Answer: B"]


def masked_reference(model, plan):
    """The full model with every pruned head/channel zeroed and every dropped layer made the identity,
    built from the plan's per-layer lists only (independent of the pruner's slicing code)."""
    import copy

    ref = copy.deepcopy(model)
    b = plan["base_config"]
    hd = b["head_dim"]
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            a, m = layer.self_attn, layer.mlp
            if i not in plan["kept_layers"]:
                a.o_proj.weight.zero_()
                m.down_proj.weight.zero_()
                continue
            spec = plan["layers"][str(i)]
            for h in set(range(b["num_attention_heads"])) - set(spec["heads"]):
                a.q_proj.weight[h * hd:(h + 1) * hd] = 0
                a.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            for g in set(range(b["num_key_value_heads"])) - set(spec["kv_heads"]):
                a.k_proj.weight[g * hd:(g + 1) * hd] = 0
                a.v_proj.weight[g * hd:(g + 1) * hd] = 0
            for c in set(range(b["intermediate_size"])) - set(spec["mlp_channels"]):
                m.gate_proj.weight[c] = 0
                m.up_proj.weight[c] = 0
                m.down_proj.weight[:, c] = 0
    return ref
