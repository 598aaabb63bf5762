"""LoraHub: composition weights for K adapters learned from a few examples without gradients.

Method of Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition"
(2023): one scalar weight per adapter, searched by nevergrad's ``NGOpt`` within [-1.5, 1.5] to minimise
the mean loss on N examples plus 0.05 · mean|w| (an L1 pull towards small weights), 40 evaluations by
default. Each evaluation fuses the adapters with the candidate weights by any fusion method
(``task_arithmetic`` by default) in factored form, so adapters of different ranks (pruned edges) work,
unlike the released LoraHub code, which adds equal-rank factors. The fused ΔW is added to the base
model's weights in place and the touched weights are restored bit for bit after the loss is computed,
so the model is loaded once for the whole search.

Start point: the paper's code starts at 0 for every adapter, which is the base model (ΔW = 0); issue 13
asks both for "start at 0" and that a zero budget "returns the uniform start". We read the acceptance
bullet as the binding one and start by default at the uniform weights 1/K (the plain task-arithmetic
average, a meaningful composition on its own, so a zero budget returns a usable adapter); ``start=
"zeros"`` gives the paper's start and an explicit vector any other. The start is always evaluated
first and the best point seen is returned, so the result's loss never exceeds the start's.

API: `lorahub` (model, tokenizer, adapters, MMLU items → `LoraHubResult`), `lorahub_objective` (one
evaluation), `save_lorahub` (PEFT adapter + ``edgefuse.json`` with weights and trace), `lorahub_dirs`
(directories in, adapter out: ``edgefuse compose lorahub``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgefuse.adapters import CONFIG_FILE, LoraAdapter, ModelShapes, WEIGHTS_FILE, load_adapter, save_adapter
from edgefuse.artifacts import FusedAdapterManifest
from edgefuse.compose.schema import LORAHUB_BOUND as DEFAULT_BOUND
from edgefuse.compose.schema import LORAHUB_BUDGET as DEFAULT_BUDGET
from edgefuse.compose.schema import LORAHUB_EXAMPLES, LORAHUB_METHOD
from edgefuse.compose.schema import LORAHUB_L1 as DEFAULT_L1
from edgefuse.compose.schema import LORAHUB_OBJECTIVES as OBJECTIVES
from edgefuse.data.mmlu import load_mmlu, select
from edgefuse.data.prompts import answer_text
from edgefuse.data.taxonomy import domain_subjects
from edgefuse.edge.batching import encode_cloze_items, encode_items
from edgefuse.edge.train import answer_mask, cloze_loss, letter_loss
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.scoring import continuation_token_ids, lm_parts, make_batch
from edgefuse.fusion.api import fuse_adapters, merge_into_model
from edgefuse.fusion.registry import get_method
from edgefuse.io import jsonable, sha256_file
from edgefuse.models import load_model


@dataclass
class LoraHubResult:
    """Best weights found, their objective and loss, the start's, the trace and the fused adapter."""

    weights: list[float]
    objective: float  # loss + l1 · mean|w| at ``weights``
    loss: float  # mean example loss at ``weights``
    start: list[float]
    start_objective: float
    start_loss: float
    trace: list[dict[str, Any]]  # one entry per evaluation, the start first (step 0)
    adapter: LoraAdapter
    settings: dict[str, Any] = field(default_factory=dict)


def _start_weights(start, k: int, bound: float) -> list[float]:
    if start is None or start == "uniform":
        w = [1.0 / k] * k
    elif start == "zeros":
        w = [0.0] * k
    elif isinstance(start, str):
        raise EdgefuseError(f"unknown LoraHub start {start!r}; use 'uniform', 'zeros' or one weight per adapter")
    else:
        w = [float(x) for x in start]
        if len(w) != k:
            raise EdgefuseError(f"LoraHub start has {len(w)} weights for {k} adapters")
    if not all(math.isfinite(x) and -bound <= x <= bound for x in w):
        raise EdgefuseError(f"LoraHub start weights {w} must lie in [-{bound}, {bound}]")
    return w


class ExampleLoss:
    """Mean loss of a model on encoded examples, with the training objectives of `edgefuse.edge.train`.

    ``letters``: 4-way cross-entropy over the answer letters at the answer position (``letter_loss``);
    ``cloze``: cross-entropy over the answer-text tokens (``cloze_loss``). Batches of ``batch_size``
    items; the mean over items weights each batch by its number of items."""

    def __init__(self, tokenizer, items: Sequence, objective: str = "letters", seq: int = 512,
                 batch_size: int = 8, device="cpu"):
        if objective not in OBJECTIVES:
            raise EdgefuseError(f"unknown LoraHub objective {objective!r}; use one of: {', '.join(OBJECTIVES)}")
        if not items:
            raise EdgefuseError("LoraHub needs at least one example")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise EdgefuseError(f"batch size must be a positive integer, got {batch_size!r}")
        self.objective, self.batch_size, self.device = objective, batch_size, device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if objective == "letters":
            self.seqs = encode_items(tokenizer, items, seq)
            self.n_answer = None
            self.letter_ids = torch.tensor(continuation_token_ids(tokenizer, [answer_text(i) for i in range(4)]),
                                           device=device)
            self.answers = torch.tensor([it.answer for it in items], device=device)
        else:
            self.seqs, self.n_answer = encode_cloze_items(tokenizer, items, seq)

    def __call__(self, model) -> float:
        body, head, softcap = lm_parts(model)
        total, n = 0.0, len(self.seqs)
        with torch.no_grad():
            for lo in range(0, n, self.batch_size):
                idx = list(range(lo, min(n, lo + self.batch_size)))
                b = make_batch([self.seqs[i] for i in idx], self.pad, "right", self.device)
                if self.objective == "letters":
                    loss = letter_loss(body, head, softcap, self.letter_ids, b, self.answers[idx])
                else:
                    loss = cloze_loss(body, head, softcap, b, answer_mask(b, [self.n_answer[i] for i in idx]))
                total += float(loss) * len(idx)
        return total / n


class MergedModel:
    """Adds an adapter's ΔW to a model's weights and puts the original weights back exactly on exit."""

    def __init__(self, model, adapter: LoraAdapter):
        self.model, self.adapter, self.saved = model, adapter, {}

    def __enter__(self):
        for name in self.adapter.modules:
            try:
                W = self.model.get_submodule(name).weight
            except AttributeError:
                raise EdgefuseError(f"module {name} of the adapter is not in the model") from None
            self.saved[name] = W.detach().clone()
        try:
            merge_into_model(self.model, self.adapter)
        except BaseException:
            self._restore()
            raise
        return self.model

    def _restore(self):
        with torch.no_grad():
            for name, W0 in self.saved.items():
                self.model.get_submodule(name).weight.copy_(W0)
        self.saved = {}

    def __exit__(self, *exc):
        self._restore()
        return False


def lorahub_objective(model, adapters: Sequence[LoraAdapter], weights: Sequence[float], loss_fn, *,
                      method: str = LORAHUB_METHOD, l1: float = DEFAULT_L1, seed: int = 0,
                      fusion_params: dict | None = None) -> tuple[float, float, LoraAdapter]:
    """(objective, example loss, fused adapter) at ``weights``: fuse, merge into ``model``, score, restore."""
    fused, _ = fuse_adapters(list(adapters), method, [float(w) for w in weights], seed=seed,
                             **(fusion_params or {}))
    with MergedModel(model, fused) as merged:
        loss = loss_fn(merged)
    penalty = l1 * sum(abs(float(w)) for w in weights) / len(weights)
    return loss + penalty, loss, fused


def lorahub(model, tokenizer, adapters: Sequence[LoraAdapter], items: Sequence, *, objective: str = "letters",
            budget: int = DEFAULT_BUDGET, method: str = LORAHUB_METHOD, start=None,
            bound: float = DEFAULT_BOUND, l1: float = DEFAULT_L1, seed: int = 0, seq: int = 512,
            batch_size: int = 8, fusion_params: dict | None = None, device="cpu",
            progress: Callable[[int], None] | None = None) -> LoraHubResult:
    """Learn one weight per adapter on ``items`` (MMLU items) with nevergrad's NGOpt; see the module doc.

    ``start``: None / ``"uniform"`` (1/K each, the default), ``"zeros"`` (the paper's) or K numbers.
    ``budget``: optimiser evaluations after the start's (0 returns the start and its loss).
    ``progress(1)`` after each evaluation (budget + 1 in all)."""
    adapters = list(adapters)
    if not adapters:
        raise EdgefuseError("LoraHub needs at least one adapter")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise EdgefuseError(f"LoraHub budget must be an integer >= 0, got {budget!r}")
    if not (isinstance(bound, (int, float)) and bound > 0):
        raise EdgefuseError(f"LoraHub weight bound must be > 0, got {bound!r}")
    if not (isinstance(l1, (int, float)) and l1 >= 0):
        raise EdgefuseError(f"LoraHub L1 coefficient must be >= 0, got {l1!r}")

    get_method(method)
    k = len(adapters)
    w0 = _start_weights(start, k, float(bound))
    loss_fn = ExampleLoss(tokenizer, items, objective, seq, batch_size, device)
    trace: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def evaluate(w: list[float]) -> tuple[float, float, LoraAdapter]:
        obj, loss, fused = lorahub_objective(model, adapters, w, loss_fn, method=method, l1=l1, seed=seed,
                                             fusion_params=fusion_params)
        trace.append({"step": len(trace), "weights": list(w), "loss": loss, "objective": obj,
                      "wall_s": round(time.perf_counter() - t0, 4)})
        if progress is not None:
            progress(1)
        return obj, loss, fused

    start_obj, start_loss, fused0 = evaluate(w0)
    best = (start_obj, start_loss, list(w0), fused0)
    if budget > 0:
        import nevergrad as ng
        import numpy as np

        param = ng.p.Array(init=np.asarray(w0, dtype=float)).set_bounds(-float(bound), float(bound))
        param.random_state = np.random.RandomState(seed)
        opt = ng.optimizers.NGOpt(parametrization=param, budget=budget, num_workers=1)
        for _ in range(budget):
            with warnings.catch_warnings():  # scipy's COBYLA, inside NGOpt, warns on its own tolerances
                warnings.filterwarnings("ignore", message="COBYLA", category=UserWarning)
                cand = opt.ask()
            w = [min(float(bound), max(-float(bound), float(x))) for x in cand.value]
            obj, loss, fused = evaluate(w)
            opt.tell(cand, obj)
            if obj < best[0]:
                best = (obj, loss, w, fused)
    return LoraHubResult(
        weights=best[2], objective=best[0], loss=best[1], start=w0, start_objective=start_obj,
        start_loss=start_loss, trace=trace, adapter=best[3],
        settings={"objective": objective, "budget": budget, "method": method, "bound": float(bound),
                  "l1": float(l1), "seed": seed, "examples": len(items), "seq": seq,
                  "fusion_params": dict(fusion_params or {}), "optimizer": "nevergrad NGOpt"},
    )


def save_lorahub(result: LoraHubResult, out: str | Path, *, base_model: str | None = None,
                 inputs: Sequence[dict] | None = None, base_fingerprint: str | None = None) -> Path:
    """Write the fused adapter as a normal PEFT adapter; ``edgefuse.json`` holds the weights and the trace."""
    manifest = FusedAdapterManifest(
        base_fingerprint=base_fingerprint,
        base_model=base_model,
        method=result.settings.get("method"),
        composition="lorahub",
        lorahub=jsonable({
            "reference": "Huang et al., LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA "
                         "Composition, 2023",
            "weights": result.weights,
            "objective": result.objective,
            "loss": result.loss,
            "start": result.start,
            "start_objective": result.start_objective,
            "start_loss": result.start_loss,
            "settings": result.settings,
            "trace": result.trace,
        }),
        inputs=jsonable(list(inputs or [])),
        output_rank=max((m.rank for m in result.adapter.modules.values()), default=0),
    )
    return save_adapter(result.adapter, out, manifest, base_model=base_model)


def lorahub_dirs(adapter_dirs: Sequence[str | Path], out: str | Path, domains: Sequence[str], *,
                 examples: int = LORAHUB_EXAMPLES, budget: int = DEFAULT_BUDGET, method: str = LORAHUB_METHOD,
                 objective: str = "letters", model: str | None = None, mmlu: str | None = None,
                 start=None, seed: int = 0, force: bool = False, device: str | None = None) -> dict:
    """Load the adapters and the base model, learn LoraHub weights on ``examples`` items of the MMLU
    ``public`` split of ``domains``, write the adapter (`save_lorahub`). Every check runs before the
    model loads; nothing is written unless the search succeeds."""
    out = Path(out)
    if not adapter_dirs:
        raise EdgefuseError("LoraHub needs at least one adapter (--adapters DIR DIR ...)")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise EdgefuseError(f"LoraHub budget must be an integer >= 0, got {budget!r}")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise EdgefuseError(f"--examples must be a positive integer, got {examples!r}")
    if objective not in OBJECTIVES:
        raise EdgefuseError(f"unknown LoraHub objective {objective!r}; use one of: {', '.join(OBJECTIVES)}")
    if not domains:
        raise EdgefuseError("LoraHub needs --domains (the MMLU domains its examples come from)")
    for d in domains:
        if not domain_subjects(d):
            raise EdgefuseError(f"unknown MMLU domain {d!r}")
    get_method(method)
    if out.exists() and not force:
        raise EdgefuseError("output already exists (pass --force to overwrite)", path=out)
    raw = [load_adapter(d) for d in adapter_dirs]
    names = {a.base_model for a in raw if a.base_model}
    if model is None:
        if len(names) != 1:
            raise EdgefuseError("pass --model: the adapters do not name one base model")
        model = next(iter(names))
    items = select(load_mmlu(mmlu), "public", domains=list(domains), limit=examples, seed=seed)
    if not items:
        raise EdgefuseError(f"no public-split MMLU items for domains {', '.join(domains)}")
    base, tok = load_model(model, device=device, dtype="float32")
    shapes = ModelShapes.of(base)
    adapters = [load_adapter(d, shapes, force=force) for d in adapter_dirs]
    res = lorahub(base, tok, adapters, items, objective=objective, budget=budget, method=method, start=start,
                  seed=seed, device=next(base.parameters()).device)
    inputs = [{"path": str(Path(d)), "domain": a.domain,
               "sha256": {f: sha256_file(Path(d) / f) for f in (CONFIG_FILE, WEIGHTS_FILE)}}
              for d, a in zip(adapter_dirs, adapters)]
    res.settings.update({"domains": list(domains), "model": model})
    fps = {a.base_fingerprint for a in adapters if a.base_fingerprint}
    save_lorahub(res, out, base_model=next(iter(names)) if len(names) == 1 else None, inputs=inputs,
                 base_fingerprint=next(iter(fps)) if len(fps) == 1 else None)
    return {"weights": res.weights, "loss": res.loss, "objective": res.objective, "start_loss": res.start_loss,
            "start_objective": res.start_objective, "evaluations": len(res.trace), "out": str(out)}
