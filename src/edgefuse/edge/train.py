"""LoRA training on the pruned model with the edge's private multiple-choice items.

Loss: cross-entropy over the four answer-letter logits (`` A`` … `` D``) at the answer position
(the token after ``Answer:``); no other token carries loss. Why: evaluation ranks exactly these four
logits at exactly that position (edgefuse.evaluate.scoring), and the argmax over the four is the
same whether the softmax spans 4 letters or the whole vocabulary, so this is the loss of the task
measured. A language-model loss over the question text would instead spend the adapter on
memorising the edge's private questions (worse for privacy) and needs vocabulary-sized logits at
every position (49k × tokens floats: most of the activation memory on an edge). Only four rows of
the output head are multiplied, at one position per prompt. Known good on SmolLM2: r = 8 on all
seven projections, lr 3e-4, 80 steps of 8 prompts.

``objective`` chooses what is taught, so that an edge learns what the study measures: ``letters`` (the
loss above), ``cloze`` (cross-entropy over the answer *text* after the cloze prompt, the form
`edgefuse.evaluate.cloze` scores; the head runs only at the answer-text positions) or ``both`` (their
mean on the same items).

Mechanics: PEFT LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022),
AdamW, optional gradient accumulation and checkpointing, length-bucketed batches
(edgefuse.edge.batching), checkpoints of adapter + optimizer in safetensors for exact resume,
seeded everything. The package written at the end is the only thing an edge uploads.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgefuse.adapters import LoraAdapter, LoraModule, load_adapter, save_adapter
from edgefuse.artifacts import EdgePackageManifest
from edgefuse.data.mmlu import MMLUItem
from edgefuse.data.prompts import answer_text
from edgefuse.edge.batching import Schedule, encode_cloze_items, encode_items
from edgefuse.edge.families import family_for, resolve_targets
from edgefuse.edge.memory import PeakMemory, TensorPeak, storage_bytes
from edgefuse.edge.plan import load_pruned, plan_hash, read_model_meta
from edgefuse.edge.schema import CHECKPOINT_STATE, TrainConfig
from edgefuse.errors import EdgefuseError
from edgefuse.fusion.lowrank import factored_svd, from_svd
from edgefuse.io import atomic_dir, atomic_write_json, hash_obj, load_safetensors, read_json, sha256_file
from edgefuse.models import continuation_token_ids, fingerprint, lm_parts, make_batch
from edgefuse.precision import resolve
from edgefuse.ui import progress_bar


def lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def checkpoint_dir_for(out_dir: Path) -> Path:
    """Checkpoints live beside the package, never inside it (they are not uploaded)."""
    return out_dir.with_name(out_dir.name + ".ckpt")


def _save_checkpoint(path: Path, peft_model, opt, state: dict) -> None:
    from safetensors.torch import save_file

    lora = {n: p.detach().cpu().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad}
    osd = opt.state_dict()
    opt_t = {f"{k}.{i}": v.detach().cpu().contiguous() for i, s in osd["state"].items() for k, v in s.items()}
    with atomic_dir(path) as tmp:
        save_file(lora, str(tmp / "lora.safetensors"))
        save_file(opt_t or {"empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / CHECKPOINT_STATE, {**state, "param_groups": osd["param_groups"]})


def _load_checkpoint(path: Path, peft_model, opt, identity: dict) -> dict:
    if not (path / CHECKPOINT_STATE).is_file():
        raise EdgefuseError("no checkpoint to resume from", path=path)
    state = read_json(path / CHECKPOINT_STATE)
    if state.get("identity") != identity:
        old, new = state.get("identity") or {}, identity
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise EdgefuseError(f"checkpoint was made with a different configuration (differs in: {', '.join(diff)})",
                            path=path / CHECKPOINT_STATE)
    lora = load_safetensors(path / "lora.safetensors")
    params = dict(peft_model.named_parameters())
    for n, t in lora.items():
        if n not in params or params[n].shape != t.shape:
            raise EdgefuseError(f"checkpoint tensor {n} does not fit the model", path=path / "lora.safetensors")
        with torch.no_grad():
            params[n].copy_(t)
    opt_t = load_safetensors(path / "optimizer.safetensors")
    st: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in opt_t.items():
        if key == "empty":
            continue
        name, i = key.rsplit(".", 1)
        st.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": st, "param_groups": state["param_groups"]})
    return state


def adapter_from_peft(peft_model, scale: float) -> LoraAdapter:
    """Factored form of the trained LoRA, keyed by module names of the (pruned) model."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model)
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        stem, which = key.rsplit(".lora_", 1)
        mods.setdefault(stem.removeprefix("base_model.model."), {})[which.split(".")[0]] = t.detach().float().cpu()
    return LoraAdapter({n: LoraModule(ab["A"], ab["B"], scale) for n, ab in sorted(mods.items())})


def lora_float32(peft_model):
    """The model with its trainable (LoRA) weights in float32 whatever the frozen weights' dtype.

    Why: AdamW's updates are far below a bfloat16 weight's resolution (8 bits of mantissa), so LoRA
    weights held in bfloat16 would mostly not move; autocast runs their matmuls in the low dtype anyway."""
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def answer_mask(batch, n_answer: list[int]) -> torch.Tensor:
    """True at each row's last ``n_answer`` real tokens (right padding: they end at ``last_index``)."""
    pos = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)[None]
    n = torch.tensor(n_answer, device=pos.device)[:, None]
    return (pos <= batch.last_index[:, None]) & (pos > batch.last_index[:, None] - n)


def letter_loss(body, head, softcap, letter_ids: torch.Tensor, batch, answers: torch.Tensor) -> torch.Tensor:
    """Mean 4-way cross-entropy at each prompt's last position, multiplying only the letters' head rows."""
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False).last_hidden_state
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.last_index]
    logits = torch.nn.functional.linear(h, head.weight[letter_ids],
                                        head.bias[letter_ids] if head.bias is not None else None).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, answers)


def cloze_loss(body, head, softcap, batch, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer-text tokens (``targets``: True where a token is answer text).

    The head runs only at the positions that predict an answer token, as in ``letter_loss``."""
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False).last_hidden_state
    sel = targets[:, 1:]
    logits = head(hidden[:, :-1][sel]).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, batch.input_ids[:, 1:][sel])


# Why one step: the meter costs a Python call per op (SmolLM2-135M: ~17,000 ops a step at ~17 µs, ~0.3 s on the
# step it measures, which is in that step's wall time), and the step with the most padded tokens holds the most.
TENSOR_PEAK_NOTE = ("this edge's own: bytes of its weights, buffers and optimizer state plus the peak of the tensors "
                    "its heaviest step (tensor_peak_step, 1-based) created (TensorPeak, per thread; no allocator "
                    "overhead); that step's wall time includes the meter's")


def heaviest_step(sched: Schedule, steps: range, accum: int, lengths: list[list[int]]) -> int | None:
    """The step (of ``steps``) whose largest micro-batch pads to the most tokens, summed over the objective's
    batches (``lengths``: one list per encoding): where activations peak, so the one `TensorPeak` measures."""
    def padded(idx: list[int]) -> int:
        return len(idx) * sum(max(ls[i] for i in idx) for ls in lengths)

    return max(steps, key=lambda s: max(padded(idx) for idx in sched.step(s, accum)), default=None)


def held_tensors(model, opt) -> list[torch.Tensor]:
    """What training holds between steps once gradients are cleared: weights, buffers, optimizer state."""
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return [*model.parameters(), *model.buffers(), *state]


OBJECTIVE_TEXT = {
    "letters": "4-way cross-entropy over the answer letters at the answer position",
    "cloze": "cross-entropy over the answer-text tokens after the cloze prompt",
    "both": "mean of the letter loss and the answer-text (cloze) loss on the same items",
}


def start_from(peft_model, init: LoraAdapter, scale: float) -> dict[str, Any]:
    """Set the fresh LoRA to ``init`` (an adapter in the pruned model's shapes): the next round's start.

    Each module's update is written as its best rank-r approximation (truncated SVD in factored form,
    balanced factors; exact when init's rank ≤ r, as after fusing at ``fusion.rank`` = r). Factors of
    a lower-rank init fill the first rows of A and columns of B; the remaining B columns stay zero and
    the remaining A rows keep PEFT's random init, so those directions can still learn. Modules init
    lacks keep the usual start (B = 0). Returns how much of init's update the rank limit dropped.
    """
    lora = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    unknown = sorted(set(init.modules) - set(lora))
    if unknown:
        raise EdgefuseError(f"the start adapter has modules the pruned model does not train: {', '.join(unknown[:3])}")
    lost, total, ranks = 0.0, 0.0, set()
    for name, mod in init.modules.items():
        A, B = lora[name].lora_A["default"].weight, lora[name].lora_B["default"].weight
        if mod.shape != (B.shape[0], A.shape[1]):
            raise EdgefuseError(f"start adapter module {name} is {mod.shape[0]}×{mod.shape[1]}, the pruned model's is "
                                f"{B.shape[0]}×{A.shape[1]}")
        U, S, Vh = factored_svd(mod.B.double() * mod.scale, mod.A.double())
        k = min(A.shape[0], S.shape[0])
        best = from_svd(U, S, Vh, k)
        with torch.no_grad():
            A[:k] = best.A.to(A.dtype)
            B.zero_()
            B[:, :k] = (best.B / scale).to(B.dtype)
        lost += float((S[k:] ** 2).sum())
        total += float((S ** 2).sum())
        ranks.add(mod.rank)
    return {"modules": len(init.modules), "ranks": sorted(ranks),
            "dropped_energy": round(lost / total, 6) if total else 0.0}


def train_edge(pruned_dir: Path, domain: str, items: list[MMLUItem], config: TrainConfig, out_dir: Path,
               progress: Callable[..., None] | None = None, resume: bool = False, device: str | None = None,
               checkpoint_dir: Path | None = None, stop_after: int | None = None, init_dir: Path | None = None,
               dtype: str | None = None) -> Path:
    """Train a LoRA on the pruned model and write the edge package; returns the package directory.

    ``device``/``dtype`` (defaults: `edgefuse.precision.resolve`): the frozen pruned weights are held in
    ``dtype`` and the forward runs under autocast to it; the LoRA weights and AdamW's state stay float32
    (`lora_float32`), and float16 scales the loss against underflow.

    ``progress(k, **fields)`` advances an external bar by k steps; without it a rich bar is drawn.
    ``stop_after`` ends the run after that many steps *without* writing the package (a simulated
    interruption, for resume tests); the last checkpoint is written first. ``init_dir`` holds an
    adapter in the pruned shapes to start from instead of zero (`start_from`; multi-round studies).
    """
    from peft import LoraConfig, get_peft_model

    pruned_dir, out_dir = Path(pruned_dir), Path(out_dir)
    precision = resolve(device, dtype)
    if not items:
        raise EdgefuseError(f"no training items for domain {domain!r}")
    wide = next((it for it in items if len(it.choices) > 4), None)
    if wide is not None and config.objective != "cloze":  # the letters loss is over the answer letters A-D
        raise EdgefuseError(f"edge {domain}: question {wide.id} has {len(wide.choices)} choices; the "
                            f"{config.objective!r} objective scores the letters A-D only: use training.objective: "
                            f"cloze")
    ckpt = Path(checkpoint_dir) if checkpoint_dir else checkpoint_dir_for(out_dir)
    meter = PeakMemory(precision.device)
    meter.__enter__()
    try:
        model, tok, plan = load_pruned(pruned_dir, device=precision.device, dtype=precision.dtype)
        dev = next(model.parameters()).device
        pruned_fp = fingerprint(model)
        letter_ids = torch.tensor(continuation_token_ids(tok, [answer_text(i) for i in range(4)]), device=dev)
        seqs = encode_items(tok, items, config.seq) if config.objective != "cloze" else None
        cloze = encode_cloze_items(tok, items, config.seq) if config.objective != "letters" else None
        answers = [it.answer for it in items]
        lengths = [len(s) for s in (cloze[0] if cloze else seqs)]
        sched = Schedule(lengths, config.batch, config.seed, config.bucket)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        torch.manual_seed(config.seed)
        lcfg = LoraConfig(r=config.rank, lora_alpha=config.alpha,
                          target_modules=resolve_targets(family_for(model.config), config.targets),
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        peft_model = lora_float32(get_peft_model(model, lcfg))
        init_info = None
        if init_dir is not None:
            init_info = {"sha256": sha256_file(Path(init_dir) / "adapter_model.safetensors"),
                         **start_from(peft_model, load_adapter(init_dir), config.alpha / config.rank)}
        if config.grad_checkpointing:
            peft_model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.train()
        body, head, softcap = lm_parts(peft_model)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scaler = precision.grad_scaler()
        identity = {**config.identity(), "pruned_fingerprint": pruned_fp, "domain": domain,
                    "items_sha256": hash_obj(sorted(it.id for it in items)),
                    "init_sha256": init_info["sha256"] if init_info else None,
                    **({"dtype": precision.dtype} if precision.reduced else {})}
        state = {"identity": identity, "step": 0, "loss_curve": [], "tokens": 0, "padded_tokens": 0, "wall_s": 0.0,
                 "step_wall_s": [], "step_tokens": []}
        if resume:
            state = _load_checkpoint(ckpt, peft_model, opt, identity)
            if state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])
        start = state["step"]
        end = config.steps if stop_after is None else min(config.steps, start + stop_after)
        encodings = [enc for enc in (seqs, cloze[0] if cloze else None) if enc is not None]
        probe = heaviest_step(sched, range(start, end), config.grad_accum, [[len(x) for x in e] for e in encodings])
        bar = None
        if progress is None:
            bar = progress_bar(f"train {domain}", config.steps)
            progress = bar.__enter__()
            progress(start)
        try:
            t_run = time.perf_counter()
            for step in range(start, end):
                t0 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = lr_at(config, step)
                opt.zero_grad(set_to_none=True)
                held = storage_bytes(held_tensors(peft_model, opt)) if step == probe else 0
                with TensorPeak() if step == probe else contextlib.nullcontext() as meter_step:
                    micro = sched.step(step, config.grad_accum)
                    n_step = sum(len(m) for m in micro)
                    loss_sum, tokens = 0.0, 0
                    for idx in micro:
                        losses = []
                        with precision.autocast():
                            if seqs is not None:
                                b = make_batch([seqs[i] for i in idx], pad, "right", dev)
                                y = torch.tensor([answers[i] for i in idx], device=dev)
                                losses.append(letter_loss(body, head, softcap, letter_ids, b, y))
                                tokens += int(b.attention_mask.sum())
                                state["padded_tokens"] += int(b.attention_mask.numel())
                            if cloze is not None:
                                b = make_batch([cloze[0][i] for i in idx], pad, "right", dev)
                                losses.append(cloze_loss(body, head, softcap, b,
                                                         answer_mask(b, [cloze[1][i] for i in idx])))
                                tokens += int(b.attention_mask.sum())
                                state["padded_tokens"] += int(b.attention_mask.numel())
                        loss = sum(losses) / len(losses)
                        scaler.scale(loss * (len(idx) / n_step)).backward()
                        loss_sum += float(loss.detach()) * len(idx)
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    scaler.step(opt)
                    scaler.update()
                if meter_step is not None:  # this edge's own peak, whatever else runs in the process
                    if held + meter_step.peak >= (state.get("tensor_peak_bytes") or 0):
                        state["tensor_peak_bytes"], state["tensor_peak_step"] = held + meter_step.peak, step + 1
                dt = time.perf_counter() - t0
                state["step"] = step + 1
                state["loss_curve"].append(round(loss_sum / n_step, 6))
                state["tokens"] += tokens
                state["wall_s"] += dt
                state["step_wall_s"].append(round(dt, 4))
                state["step_tokens"].append(tokens)
                if not math.isfinite(state["loss_curve"][-1]):
                    raise EdgefuseError(f"training diverged at step {step + 1} (loss is not finite); lower --lr")
                progress(1, loss=f"{state['loss_curve'][-1]:.3f}", tok_s=f"{tokens / dt:.0f}")
                if (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0) or step + 1 == end:
                    if scaler.is_enabled():  # float16: resume with the loss scale reached
                        state["grad_scaler"] = scaler.state_dict()
                    _save_checkpoint(ckpt, peft_model, opt, state)
            run_wall = time.perf_counter() - t_run
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        if state["step"] < config.steps:
            return ckpt
    finally:
        meter.__exit__(None, None, None)
    adapter = adapter_from_peft(peft_model, config.alpha / config.rank)
    stats = {
        "steps": state["step"], "prompts": state["step"] * config.batch * config.grad_accum,
        "tokens": state["tokens"], "padded_tokens": state["padded_tokens"], "loss_curve": state["loss_curve"],
        "step_wall_s": state["step_wall_s"], "step_tokens": state["step_tokens"],
        "wall_s": round(state["wall_s"], 3), "tokens_per_s": round(state["tokens"] / max(state["wall_s"], 1e-9), 1),
        "tensor_peak_bytes": state.get("tensor_peak_bytes"), "tensor_peak_step": state.get("tensor_peak_step"),
        "tensor_peak_note": TENSOR_PEAK_NOTE,
        "peak_memory_bytes": meter.used_bytes,
        "peak_memory_note": ("the process's CUDA allocator peak above its level at the start" if meter.cuda else
                             "the process's peak resident memory above its level before the pruned model was loaded")
                            + "; everything in the process counts, so not this edge's own when other work shares it",
        "memory_estimate_bytes": (plan.get("estimate") or {}).get("total_bytes"),
        "last_session_wall_s": round(run_wall, 3), "resumed": bool(resume),
        "device": str(dev), "dtype": precision.dtype, "torch_threads": torch.get_num_threads(),
    }
    pruned_name = getattr(read_model_meta(pruned_dir), "name", None)
    manifest = EdgePackageManifest(
        base_model=plan.get("base_model"), base_fingerprint=plan["base_fingerprint"],
        pruned_model=pruned_name, pruned_fingerprint=pruned_fp,
        domain=domain, n_items=len(items), plan_hash=plan_hash(plan),
        plan={k: plan[k] for k in ("method", "structure", "ratio")},
        train=config.model_dump(), loss=OBJECTIVE_TEXT[config.objective], init=init_info, stats=stats,
    )
    return save_adapter(adapter, out_dir, manifest=manifest, base_model=pruned_name or str(pruned_dir))
