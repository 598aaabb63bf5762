"""Collect, in the cloud, the Gram matrix G = HᵀH of every adapted module's inputs on a domain's public prompts.

Why: adapters that look orthogonal as weight updates still interfere through the inputs they act on — ΔW_j
applied to domain i's activations is not zero (Zhang et al., "Unraveling LoRA Interference: Orthogonal
Subspaces for Robust Model Merging" (OSRM), ACL 2025, arXiv 2505.22934) — and RegMean merges by least squares
on those inputs (Jin et al., ICLR 2023, arXiv 2212.09849). Both need only G, d_in × d_in per module, never the
activations. The cloud has only the base model and the public split, so G comes from there (never edge data).
"""

from __future__ import annotations

import torch

from edgefuse.data.mmlu import SplitSpec, select
from edgefuse.data.prompts import mc_prompt
from edgefuse.edge.families import ALL_PROJECTIONS
from edgefuse.errors import EdgefuseError
from edgefuse.interference.spec import GramSpec

__all__ = ["GramSpec", "adapted_linears", "collect", "edge_grams", "gram_layout", "gram_matrices", "interleaved_prompts",
           "public_prompts", "token_sequences", "write_edge_grams", "manifest_fields"]


def adapted_linears(model) -> dict[str, torch.nn.Module]:
    """Every linear projection a LoRA may adapt (any family's projection names), by module name."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ALL_PROJECTIONS
    }


def public_prompts(dataset, domain: str | list[str], spec: GramSpec = GramSpec(), split_spec=None) -> list[str]:
    """The domain's (or domains': a study's edge may have several) public-split prompts, subjects interleaved (one
    of each in turn) so that a small token budget still covers every subject. ``split_spec`` (a
    `edgefuse.data.mmlu.SplitSpec`, a study's) replaces the default split with ``spec.split_seed``."""
    domains = [domain] if isinstance(domain, str) else list(domain)
    items = select(dataset, spec.split, domains=domains, split_spec=split_spec or SplitSpec(seed=spec.split_seed))
    if not items:
        what = f"domain {domains[0]!r}" if len(domains) == 1 else f"domains {', '.join(domains)}"
        raise EdgefuseError(f"{what} {'has' if len(domains) == 1 else 'have'} no {spec.split}-split prompts in "
                            "this MMLU source")
    return interleaved_prompts(items)


def interleaved_prompts(items) -> list[str]:
    """The items' question prompts (no answer), subjects interleaved — one of each in turn, each subject's items by
    id — so that the first few hundred tokens already span every subject."""
    by_subject: dict[str, list] = {}
    for it in sorted(items, key=lambda it: it.id):
        by_subject.setdefault(it.subject, []).append(it)
    rounds = max((len(v) for v in by_subject.values()), default=0)
    return [mc_prompt(v[r]) for r in range(rounds) for _, v in sorted(by_subject.items()) if r < len(v)]


def token_sequences(tokenizer, prompts: list[str], tokens: int, per_prompt: int | None = None) -> list[list[int]]:
    """The prompts' first ``per_prompt`` tokens (all when None), in order, until ``tokens`` tokens; the last one cut
    to fit (a prefix is a valid causal input). Fewer tokens when the prompts run out (the count is recorded)."""
    out, left = [], tokens
    for p in prompts:
        if left <= 0:
            break
        ids = tokenizer(p)["input_ids"][: min(left, per_prompt or left)]
        out.append(ids)
        left -= len(ids)
    return out


@torch.no_grad()
def gram_matrices(model, sequences: list[list[int]], names: list[str] | None = None):
    """Run ``model`` on each sequence alone (no padding) and sum HᵀH in float64 per module input.

    Returns (grams: key → d_in × d_in, aliases: module name → key, tokens). Modules fed the same tensor (q, k, v
    after one norm; gate and up) share one key: the first such module's name.
    """
    linears = adapted_linears(model)
    if names is not None:
        linears = {n: linears[n] for n in names}
    aliases: dict[str, str] = {}
    grams: dict[str, torch.Tensor] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this forward's input tensors (kept alive: ids stay unique)

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0]
            if name not in aliases:
                hit = seen.get(id(x))
                aliases[name] = hit[1] if hit is not None and hit[0] is x else name
            seen.setdefault(id(x), (x, name))
            if aliases[name] != name:
                return
            H = x.reshape(-1, x.shape[-1]).double()
            if name not in grams:
                grams[name] = torch.zeros(H.shape[1], H.shape[1], dtype=torch.float64)
            grams[name].addmm_(H.T, H)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    device = next(model.parameters()).device
    total = 0
    try:
        for ids in sequences:
            seen.clear()
            model(input_ids=torch.tensor([ids], device=device))
            total += len(ids)
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    return {k: G.cpu() for k, G in grams.items()}, aliases, total


def collect(model, tokenizer, dataset, domains: list[str], spec: GramSpec = GramSpec()):
    """Every domain's Gram matrices: (grams per domain, aliases, tokens per domain, prompts per domain).
    All domains' prompts are checked before the model runs."""
    prompts = {d: public_prompts(dataset, d, spec) for d in domains}
    grams, tokens, used, aliases = {}, {}, {}, {}
    for d in domains:
        seqs = token_sequences(tokenizer, prompts[d], spec.tokens, spec.per_prompt)
        grams[d], aliases, tokens[d] = gram_matrices(model, seqs)
        used[d] = len(seqs)
    return grams, aliases, tokens, used


def edge_grams(model, tokenizer, items, spec: GramSpec = GramSpec()):
    """An edge's own Gram matrices: ``model`` (the base model) over its private training items' question prompts,
    with the token budget of ``spec``; (matrices, aliases, tokens, prompts). Only for a study that asks its edges for
    them (``interference.source: edges``): G holds the second moments of private inputs (docs/interference.md)."""
    prompts = interleaved_prompts(items)
    if not prompts:
        raise EdgefuseError("this edge has no training items to collect Gram matrices on")
    seqs = token_sequences(tokenizer, prompts, spec.tokens, spec.per_prompt)
    grams, aliases, tokens = gram_matrices(model, seqs)
    return grams, aliases, tokens, len(seqs)


def write_edge_grams(model, tokenizer, items, spec: GramSpec, out, edge: str, base_model: str,
                     split_seed: int):
    """`edge_grams` as a one-domain Gram directory named by the edge (all or nothing): what an edge keeps beside its
    package and sends with it (`edgefuse.federated.records.package_to_content`)."""
    from edgefuse.interference.grams import save_grams  # local: torch-backed, kept off the CLI start-up path (+3 ms on `edgefuse --help`, measured)
    from edgefuse.models import fingerprint  # local: torch-backed, kept off the CLI start-up path (+7 ms on `edgefuse --help`, measured)

    mats, aliases, tokens, prompts = edge_grams(model, tokenizer, items, spec)
    fields = manifest_fields(base_model, fingerprint(model), "edge", split_seed, spec.per_prompt)
    return save_grams(out, fields, {edge: mats}, {edge: tokens}, {edge: prompts}, aliases, force=True)


def manifest_fields(base_model: str, base_fingerprint: str, split: str, split_seed: int, per_prompt: int) -> dict:
    """The ``grams.json`` fields of a Gram directory: the cloud's on a public split (`runner.interference`), an
    edge's own on split ``edge``, written alike by the edge and by the cloud that checks them."""
    return {"base_model": base_model, "base_fingerprint": base_fingerprint, "split": split, "split_seed": split_seed,
            "per_prompt": per_prompt}


def gram_layout(model) -> tuple[dict[str, str], dict[str, int]]:
    """What a complete set of ``model``'s Gram matrices looks like — (module name → key, key → d_in) — from one
    one-token forward: what the cloud checks a Gram upload against."""
    linears = adapted_linears(model)
    _, aliases, _ = gram_matrices(model, [[0]])
    return aliases, {key: linears[key].in_features for key in set(aliases.values())}
