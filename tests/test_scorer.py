"""The one scoring interface (`edgefuse.evaluate.scorer`, issue 23 item 4): loose lm-eval requests and rows with
different numbers of continuations, against one unbatched forward per (context, continuation); a retrieval mixture
that puts all weight on one adapter, against PEFT applying that adapter."""

from __future__ import annotations

import pytest
import torch
from helpers.cloze_reference import ref_pair

from edgefuse.adapters import load_adapter
from edgefuse.compose.retrieval import AdapterPool, RetrievalSettings
from edgefuse.evaluate.retrieval import RetrievalScorer
from edgefuse.evaluate.scorer import PackedScorer
from edgefuse.models import tiny_model
from edgefuse.peft_utils import apply_adapter

peft = pytest.importorskip("peft")
from helpers.peft_adapters import save_random_adapters  # noqa: E402 - imports peft

pytestmark = pytest.mark.unit

TOL = 1e-4  # packed (4-D mask, restarted positions) vs one unbatched sequence, float32 on the tiny model

CONTEXTS = ["Question: what is law?\nAnswer:", "Question: 2 + 2 =\nAnswer:", "The capital of France is",
            "Question: which gas do plants take in?\nAnswer:"]
CONTINUATIONS = [[" the rules", " a river"], [" 4"], [" Paris", " Rome", " a very long answer text"],
                 [" carbon dioxide", " oxygen", " nitrogen", " helium"]]


def naive(model, tok, context, continuation):
    """(summed log-likelihood, greedy) of one pair from one plain forward."""
    ctx, tail = ref_pair(tok, context, continuation)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + tail])).logits[0, len(ctx) - 1: len(ctx) - 1 + len(tail)]
    lp = torch.log_softmax(logits.float(), -1)
    return float(sum(lp[t, x] for t, x in enumerate(tail))), bool((logits.argmax(-1) == torch.tensor(tail)).all())


def test_loglikelihood_of_loose_requests_equals_one_forward_per_pair():
    """Requests in an order that interleaves contexts with 1 to 4 continuations each, one context repeated far
    apart: every answer, in request order, is that pair's own forward (log-likelihood and greedy flag)."""
    model, tok = tiny_model()
    pairs = [(c, x) for c, xs in zip(CONTEXTS, CONTINUATIONS) for x in xs]
    order = [5, 0, 8, 3, 1, 9, 4, 6, 2, 7]
    requests = [pairs[i] for i in order]
    got = PackedScorer(model, tok, batch_size=2, greedy=True).loglikelihood(requests)
    assert len(got) == len(requests)
    for (context, cont), (ll, greedy) in zip(requests, got):
        ref_ll, ref_greedy = naive(model, tok, context, cont)
        assert ll == pytest.approx(ref_ll, abs=TOL), (context, cont)
        assert greedy == ref_greedy


def test_rows_with_different_choice_counts_are_each_their_own_reference():
    model, tok = tiny_model()
    s = PackedScorer(model, tok, batch_size=3).score(CONTEXTS, CONTINUATIONS)
    assert s.greedy is None and s.weights is None
    for context, conts, row in zip(CONTEXTS, CONTINUATIONS, s.loglik):
        assert len(row) == len(conts)
        for cont, ll in zip(conts, row):
            assert ll == pytest.approx(naive(model, tok, context, cont)[0], abs=TOL)


class KeywordEncoder:
    """A stand-in sentence encoder: a query about plants points at the second adapter, any other at the first."""

    def encode(self, texts, **kwargs):
        return torch.tensor([[0.0, 1.0] if "plant" in t else [1.0, 0.0] for t in texts])


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    return save_random_adapters(tmp_path_factory.mktemp("scorer"),
                                [dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                 dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"])], seed=300)


def test_a_retrieval_mixture_routes_each_row_and_scores_as_its_adapter(two_adapters):
    """top_k = 1: each row's whole weight is on the adapter its query retrieves, so each row's scores are those of
    the model with that adapter applied by PEFT; the rows' weights come back with the scores. Queries other than the
    contexts route the rows (the `choices` task routes by question and choices)."""
    model, tok = tiny_model()
    pool = AdapterPool([load_adapter(d, model) for d in two_adapters], ["a0", "a1"], [None, None],
                       torch.eye(2))
    scorer = RetrievalScorer(model, tok, pool, RetrievalSettings(top_k=1, weighting="uniform"), KeywordEncoder(),
                             batch_size=2)
    queries = ["plant" if i % 2 else "law" for i in range(len(CONTEXTS))]
    s = scorer.score(CONTEXTS, CONTINUATIONS, queries=queries)
    assert [w.tolist() for w in s.weights] == [[0.0, 1.0] if q == "plant" else [1.0, 0.0] for q in queries]
    for k, d in enumerate(two_adapters):
        with_adapter = apply_adapter(tiny_model()[0], d)
        for i, (context, conts) in enumerate(zip(CONTEXTS, CONTINUATIONS)):
            if (queries[i] == "plant") == bool(k):
                for cont, ll in zip(conts, s.loglik[i]):
                    assert ll == pytest.approx(naive(with_adapter, tok, context, cont)[0], abs=TOL), (k, context)
