"""One scoring interface (issue 23, item 4): the summed log-likelihood of each continuation after its context,
for fixed-choice questions (`Scorer.score`) and for lm-eval's loose (context, continuation) requests
(`Scorer.loglikelihood`), whatever model runs behind it: the base model or one adapter (`PackedScorer`), or a
retrieval mixture over a pool of adapters whose weights are set per row
(`edgefuse.evaluate.retrieval.RetrievalScorer`, beside the retrieval evaluations, so that this module depends on the
packed scorer alone and every benchmark can use it).

Why: MMLU in cloze form, the lm-eval backend, the ``choices`` task and their mixture variants each grouped their
requests and wrapped the packed scorers on their own. Here the grouping is written once: the packed
implementation (`edgefuse.evaluate.cloze.ClozeScorer`: the context once, its continuations packed beside it) takes
one number of continuations per call, so `score` groups rows by that number, and `loglikelihood` groups requests by
context first. The batches are those each caller formed before, so the scores are the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.cloze import ClozeScorer


@dataclass
class Scores:
    """Per row, each continuation's summed log-likelihood and (when asked) whether it is the greedy one; a mixture
    also gives each row's adapter weights (pool order)."""

    loglik: list[list[float]]
    greedy: list[list[bool]] | None = None
    weights: list[torch.Tensor] | None = None
    tokens: int = 0  # tokens run through the decoder (contexts once, continuations; no padding)


class Scorer(ABC):
    """Summed log-likelihoods of continuations after contexts; subclasses score one group of rows that have the same
    number of continuations (`score_group`)."""

    def __init__(self, greedy: bool = False):
        self.greedy = greedy  # also report whether each continuation is the greedy one (lm-eval's is_greedy)
        self.tokens = 0  # tokens run through the decoder by every call so far

    def route(self, queries: Sequence[str]) -> torch.Tensor | None:
        """Each row's adapter weights (n, pool) from its query, all rows at once; None: no mixture."""
        return None

    @abstractmethod
    def score_group(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]],
                    weights: torch.Tensor | None, progress: Callable[[int], None] | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loglik (n, k), greedy (n, k) or None) for rows of k continuations each (``weights``: theirs, or None)."""

    def score(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]],
              progress: Callable[[int], None] | None = None, queries: Sequence[str] | None = None,
              weights: torch.Tensor | None = None) -> Scores:
        """Each row's continuations scored after its context; rows may have different numbers of continuations.
        ``queries``: the text a mixture routes each row by (default: its context); ``weights``: each row's mixture
        when the caller has routed already (`route` is then not called)."""
        if len(contexts) != len(continuations) or (queries is not None and len(queries) != len(contexts)):
            raise EdgefuseError("scoring needs one list of continuations (and one query) per context")
        tokens_before = self.tokens
        if weights is None:
            weights = self.route(list(contexts) if queries is None else list(queries))
        groups: dict[int, list[int]] = defaultdict(list)
        for i, conts in enumerate(continuations):
            groups[len(conts)].append(i)
        out = Scores([[] for _ in contexts], [[] for _ in contexts] if self.greedy else None,
                     None if weights is None else list(weights))
        for idx in groups.values():
            ll, greedy = self.score_group([contexts[i] for i in idx], [continuations[i] for i in idx],
                                          None if weights is None else weights[idx], progress)
            for r, i in enumerate(idx):
                out.loglik[i] = ll[r].tolist()
                if out.greedy is not None:
                    out.greedy[i] = [bool(g) for g in greedy[r]]
        out.tokens = self.tokens - tokens_before
        return out

    def loglikelihood(self, requests: Sequence[tuple[str, str]],
                      progress: Callable[[int], None] | None = None) -> list[tuple[float, bool | None]]:
        """(log p(continuation | context), is greedy) per request, in the requests' order: the requests that share a
        context are scored as one row, the context run once."""
        by_context: dict[str, list[int]] = defaultdict(list)
        for i, (context, _) in enumerate(requests):
            if not context:
                raise EdgefuseError("edgefuse scores continuations of a non-empty context; this request has an "
                                    "empty one (rolling perplexity is not supported)")
            by_context[context].append(i)
        contexts = list(by_context)
        s = self.score(contexts, [[requests[i][1] for i in by_context[c]] for c in contexts], progress)
        out: list[tuple[float, bool | None]] = [(0.0, None)] * len(requests)
        for row, context in enumerate(contexts):
            for j, i in enumerate(by_context[context]):
                out[i] = (s.loglik[row][j], None if s.greedy is None else s.greedy[row][j])
        return out


class PackedScorer(Scorer):
    """The model as it is (the base model, or with an adapter applied), through the packed cloze scorer."""

    def __init__(self, model, tokenizer, batch_size: int = 8, greedy: bool = False):
        super().__init__(greedy)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def score_group(self, contexts, continuations, weights, progress):
        scorer = ClozeScorer(self.model, self.tokenizer, self.batch_size, greedy=self.greedy)
        ll = scorer.score(contexts, continuations, progress)
        self.tokens += scorer.tokens_scored
        return ll, scorer.greedy
