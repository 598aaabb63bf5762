"""edgefuse as an lm-eval-harness model (``--model edgefuse``): any lm-eval log-likelihood task, scored with a
fused adapter or with a retrieval mixture over a pool of adapters, by edgefuse's packed scorer.

Why: lm-eval's own ``hf`` backend loads one PEFT adapter, but it cannot mix a pool per request
(`edgefuse.compose`), and it runs each (context, continuation) pair as its own sequence; here the requests that
share a context run it once, with their continuations packed after it (`edgefuse.evaluate.scorer`, the one scoring
interface the study's tasks use too).

Arguments (``--model_args`` as ``key=value,…``): ``model`` (any edgefuse model spec, default SmolLM2),
``adapter`` (a PEFT adapter directory) or ``pool`` (adapter directories joined by ``:``, each with its embedding:
`edgefuse compose embed`) with ``top_k``, ``weighting`` and ``temperature`` (defaults: `edgefuse.compose.schema`),
and ``dtype`` (`edgefuse.precision`). The device is lm-eval's own ``--device`` (lm-eval passes it to every
model, so it cannot also be a model argument). A pool request's query is its context text, embedded with the
embedded MiniLM; its mixture serves the context and every continuation.

lm-eval 0.4.13 looks up models in its own registry only (no plugin discovery), so the model is registered when
this module is imported: the console script ``edgefuse-lm-eval ARGS`` is lm-eval's own command line after that
import (`main`), and Python users import this module before ``lm_eval.simple_evaluate(model="edgefuse", …)``.
Tokenization and BOS follow edgefuse (`edgefuse.tokens`), so results equal ``edgefuse eval``'s. Only
log-likelihood requests are served: rolling perplexity and generation raise one clear error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from edgefuse.compose.embedding import load_encoder
from edgefuse.compose.retrieval import RetrievalSettings, load_pool
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.retrieval import RetrievalScorer
from edgefuse.evaluate.scorer import PackedScorer, Scorer
from edgefuse.models import DEFAULT_MODEL, load_model
from edgefuse.peft_utils import apply_adapter
from edgefuse.precision import resolve

MODEL_NAME = "edgefuse"


@register_model(MODEL_NAME)
class EdgefuseLM(LM):
    """An edgefuse model (+ adapter, or + retrieval pool) behind lm-eval's request API."""

    def __init__(self, model: str = DEFAULT_MODEL, adapter: str | None = None, pool: str | None = None,
                 top_k: int | None = None, weighting: str | None = None, temperature: float | None = None,
                 batch_size: int | str = 8, max_batch_size: int | None = None, device: str | None = None,
                 dtype: str | None = None):
        super().__init__()
        if adapter and pool:
            raise EdgefuseError("adapter= and pool= exclude each other (one adapter, or a retrieval mixture)")
        if not pool and any(v is not None for v in (top_k, weighting, temperature)):
            raise EdgefuseError("top_k, weighting and temperature only apply to a retrieval mixture (pool=DIR:DIR…)")
        if isinstance(batch_size, str):  # lm-eval passes "auto" or a number as text
            if not batch_size.isdigit():
                raise EdgefuseError(f"batch_size must be a positive integer for edgefuse, got {batch_size!r}")
            batch_size = int(batch_size)
        self.batch_size_per_gpu = batch_size
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes its default "cuda:0" when --device is not given; its hf backend then falls back too
            print(f"edgefuse: device {device} is not available; using edgefuse's default", file=sys.stderr)
            device = None
        precision = resolve(device, dtype)
        self.model, self.tokenizer = load_model(str(model), **precision.as_dict())
        if adapter:
            self.model = apply_adapter(self.model, Path(adapter))
        if pool:
            dirs = [Path(d) for d in str(pool).split(":") if d]
            settings = RetrievalSettings.given(top_k=top_k, weighting=weighting, temperature=temperature)
            settings.check(len(dirs))
            self.scorer: Scorer = RetrievalScorer(self.model, self.tokenizer, load_pool(dirs, self.model), settings,
                                                  load_encoder("cpu"), batch_size, greedy=True)
        else:
            self.scorer = PackedScorer(self.model, self.tokenizer, batch_size, greedy=True)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request, in the requests' order (`Scorer.loglikelihood`:
        the requests that share a context run it once)."""
        return self.scorer.loglikelihood([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise EdgefuseError("edgefuse serves log-likelihood requests of a context and its continuations; "
                            "rolling perplexity is not supported (use lm-eval's hf backend with peft=)")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise EdgefuseError("edgefuse scores continuations and does not generate text (use lm-eval's hf backend "
                            "with peft=, or `edgefuse export` and any runtime)")


def main() -> None:
    """``edgefuse-lm-eval``: lm-eval's command line (``lm_eval``'s arguments, unchanged) with ``--model edgefuse``."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
