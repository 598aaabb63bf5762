"""An independent reference for Gram matrices (tests/test_edge_grams.py, tests/test_federated.py): every layer's
q_proj input rebuilt from the model's hidden states through the layer's input norm — no forward hooks, unlike
`edgefuse.interference.collect.gram_matrices` — summed as HᵀH over an edge's own training prompts."""

from __future__ import annotations

import torch


def edge_sequences(tok, cfg, domains: list[str], tokens: int, per_prompt: int) -> list[list[int]]:
    """The token sequences an edge of study ``cfg`` collects its Gram matrices on (its training items' prompts)."""
    from edgefuse.data.mmlu import SplitSpec, load_mmlu, select
    from edgefuse.interference.collect import interleaved_prompts, token_sequences

    d = cfg.data
    spec = SplitSpec(seed=d.split_seed, public_per_subject=d.public_per_subject, edge_fraction=d.edge_fraction)
    items = select(load_mmlu(None), "edge", domains, None, None, spec.seed, spec)
    return token_sequences(tok, interleaved_prompts(items), tokens, per_prompt)


@torch.no_grad()
def q_proj_grams(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Σ LN_l(h_l)ᵀ LN_l(h_l) per layer l, float64, over ``seqs`` run one at a time."""
    model.eval()
    d = model.config.hidden_size
    out = [torch.zeros(d, d, dtype=torch.float64) for _ in model.model.layers]
    for ids in seqs:
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for i, layer in enumerate(model.model.layers):
            H = layer.input_layernorm(hs[i])[0].double()
            out[i] += H.T @ H
    return out


def assert_q_grams_match(domain_grams, want: list[torch.Tensor], what: str) -> None:
    for i, W in enumerate(want):
        G = domain_grams[f"model.layers.{i}.self_attn.q_proj"]
        assert torch.allclose(G, W, rtol=1e-5, atol=1e-5 * float(W.abs().max())), (what, i)
