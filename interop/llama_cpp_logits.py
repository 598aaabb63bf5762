"""llama.cpp as a real client of `edgefuse export --format gguf`: same tokens, same logits as transformers.

Run: make interop   (builds llama-cpp-python from its PyPI sdist, installs qwen2.5-coder-0.5b, then this script)
     .venv/bin/python interop/llama_cpp_logits.py [--keep DIR] [--json OUT]

Three models go through the commands a user runs (`edgefuse fuse`, `edgefuse export`), each as a fresh process:
  smollm2   SmolLM2-135M + a TIES fusion of two seeded random rank-8 adapters; GGUF f16 and q8_0
            (the tokenizer is copied from SmolLM2's own GGUF)
  qwen2     Qwen2.5-Coder-0.5B (`edgefuse models install`) + one seeded random adapter; GGUF f16
  tiny-qwen2  a seeded random 2-layer Qwen2 with edgefuse's byte-level BPE test tokenizer + an adapter; GGUF f16
            (the tokenizer is built from tokenizer.json: the `gpt2` model with the `gpt-2` pre-tokenizer)

For every prompt llama.cpp must tokenize exactly as edgefuse does (`edgefuse.tokens.encode_prompt`, its BOS rule
included), and its logits at every position are compared with transformers' float32 forward of the merged model
(`--format hf` export, the reference a user of transformers gets). For SmolLM2 the difference is also split in
two: transformers' GGUF loader reads the same file (its rounded weights, float32 arithmetic), so "weights" is what
the file's format costs and "engine" what llama.cpp's own arithmetic adds. What a difference may be, and why:
  f16   weights rounded to half precision (relative error ≤ 2^-11), and llama.cpp's CPU matmuls round the
        activations to f16 as well: a few hundredths on logits of size ~40 (measured 0.05). Bounds: max KL(ref ‖
        llama.cpp) ≤ 1e-3 nats, the same top-1 token at ≥ 98% of positions (a random model has near-ties), max |Δ logit| ≤ 0.25.
  q8_0  blocks of 32 weights on a 255-level grid with an f16 scale (relative error up to ~1/254), and llama.cpp
        quantizes the activations to 8 bits for its dot products too, which about doubles the error of the
        weights alone (measured: weights max KL 8e-3, engine 1.5e-2). Bounds: max KL ≤ 5e-2, mean KL ≤ 1e-2,
        top-1 ≥ 90%, max |Δ logit| ≤ 4.
Against that, the adapter must move transformers' logits (mean |Δ|) by at least 5× the row's mean |Δ|, and
llama.cpp's logits must be that much further from the base model's than from the merged model's: a file that
lost the adapter fails. Exit status 1 when a bound fails; the table says which.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BIN = Path(sys.executable).parent
PROMPTS = [
    "The following are questions (with answers) about high school biology.\n\nQuestion: What is the powerhouse of "
    "the cell?\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Paris is the capital of France. Berlin is the capital of",
    "Émile Zola wrote 42 novels — naïve café owners read them in 1890.",
]


@dataclass(frozen=True)
class Bounds:
    max_kl: float
    mean_kl: float
    top1: float
    max_abs: float


BOUNDS = {"f16": Bounds(max_kl=1e-3, mean_kl=1e-3, top1=0.98, max_abs=0.25),
          "q8_0": Bounds(max_kl=5e-2, mean_kl=1e-2, top1=0.90, max_abs=4.0)}
ADAPTER_EFFECT = 5.0  # the adapter's own mean |Δ logit| must be at least this many times the row's mean |Δ|


def edgefuse(*args) -> None:
    """One edgefuse command as a fresh process, as a user runs it."""
    t0 = time.perf_counter()
    res = subprocess.run([str(BIN / "edgefuse"), *map(str, args)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"edgefuse {' '.join(map(str, args))} failed:\n{res.stderr.strip()}")
    print(f"  edgefuse {args[0]} ({time.perf_counter() - t0:.0f} s)", flush=True)


def random_adapter(model, out: Path, seed: int, targets: list[str], scale: float, rank: int = 8) -> None:
    """A seeded random PEFT LoRA adapter (A and B both non-zero) saved by PEFT itself."""
    import copy

    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(out)


def hf_logits(model_dir: Path, ids_list: list[list[int]], gguf_file: str | None = None) -> list[torch.Tensor]:
    """transformers' float32 logits at every position; with ``gguf_file``, of that file in ``model_dir`` as
    transformers' GGUF loader dequantizes it (the same weights llama.cpp runs, in float32 arithmetic)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, gguf_file=gguf_file).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].double() for ids in ids_list]


def llama_cpp_run(gguf: Path, prompts: list[str]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """llama.cpp's own tokens (BOS by the GGUF's add_bos_token) and logits at every position."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, logits_all=True, n_threads=os.cpu_count() or 1, verbose=False)
    ids_list, logits = [], []
    for text in prompts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        ids_list.append(list(ids))
        logits.append(torch.from_numpy(llm.scores[: len(ids)].copy()).double())
    del llm
    return ids_list, logits


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    r, g = torch.cat(ref), torch.cat(got)
    lp_r, lp_g = r.log_softmax(-1), g.log_softmax(-1)
    kl = (lp_r.exp() * (lp_r - lp_g)).sum(-1)
    top5 = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(r.topk(5).indices, g.topk(5).indices)]
    return {"positions": int(r.shape[0]), "max_abs": float((r - g).abs().max()), "mean_abs": float((r - g).abs().mean()),
            "max_kl": float(kl.max()), "mean_kl": float(kl.mean()), "top1": float((r.argmax(-1) == g.argmax(-1)).double().mean()),
            "top5_overlap": sum(top5) / len(top5), "logit_scale": float(r.abs().max())}


def check_case(name: str, base_spec: str, adapter: Path, work: Path, quants: list[str],
               same_file: bool = False) -> list[dict]:
    """Export ``adapter`` merged into ``base_spec`` (hf and gguf), then compare llama.cpp with transformers."""
    from transformers import AutoTokenizer

    from edgefuse.tokens import encode_prompt

    hf_dir = work / f"{name}-hf"
    edgefuse("export", "--adapter", adapter, "--model", base_spec, "--format", "hf", "--out", hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ours = [encode_prompt(tok, p) for p in PROMPTS]
    ref = hf_logits(hf_dir, ours)
    base_dir = work / f"{name}-base-hf"
    base_ref = None
    rows = []
    for quant in quants:
        gguf = work / f"{name}-{quant}.gguf"
        edgefuse("export", "--adapter", adapter, "--model", base_spec, "--format", "gguf", "--quant", quant, "--out", gguf)
        theirs, got = llama_cpp_run(gguf, PROMPTS)
        if theirs != ours:
            bad = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
            rows.append({"case": name, "quant": quant, "ok": False,
                         "failed": [f"tokens of prompt {bad}: llama.cpp {theirs[bad][:12]}… edgefuse {ours[bad][:12]}…"]})
            continue
        if base_ref is None:  # the base model alone, to show that the file carries the adapter
            if not base_dir.exists():
                base_model_dir(base_spec, base_dir)
            base_ref = hf_logits(base_dir, ours)
        row = {"case": name, "quant": quant, "tokens": sum(map(len, ours)), "file_mb": round(gguf.stat().st_size / 2**20, 1),
               **compare(ref, got)}
        row["adapter_effect"] = compare(ref, base_ref)["max_abs"]
        if same_file:  # the error split into the file's rounded weights and llama.cpp's own arithmetic
            dequant = hf_logits(work, ours, gguf.name)
            row["weights_only"] = compare(ref, dequant)
            row["engine_only"] = compare(dequant, got)
        row["llama_cpp_vs_base"] = compare(base_ref, got)["max_abs"]
        rows.append({**row, "failed": failures(row, BOUNDS[quant])})
        rows[-1]["ok"] = not rows[-1]["failed"]
    return rows


def failures(row: dict, b: Bounds) -> list[str]:
    """Each bound the row breaks, in words (module docstring)."""
    margin = ADAPTER_EFFECT * row["mean_abs"]
    checks = [(row["max_kl"] <= b.max_kl, f"max KL {row['max_kl']:.2e} > {b.max_kl}"),
              (row["mean_kl"] <= b.mean_kl, f"mean KL {row['mean_kl']:.2e} > {b.mean_kl}"),
              (row["top1"] >= b.top1, f"top-1 agreement {row['top1']:.3f} < {b.top1}"),
              (row["max_abs"] <= b.max_abs, f"max |Δ logit| {row['max_abs']:.3f} > {b.max_abs}"),
              (row["adapter_effect"] >= margin, f"the adapter moves logits by {row['adapter_effect']:.3f} < {margin:.3f}"),
              (row["llama_cpp_vs_base"] >= margin,
               f"llama.cpp is {row['llama_cpp_vs_base']:.3f} from the base model, < {margin:.3f}")]
    return [why for ok, why in checks if not ok]


def base_model_dir(spec: str, out: Path) -> None:
    """The base model alone as a Hugging Face directory (the reference without the adapter)."""
    from edgefuse.models import load_model, save_model_dir

    model, tok = load_model(spec)
    save_model_dir(model, tok, out)


def tiny_qwen2(out: Path) -> None:
    """A seeded random 2-layer Qwen2 with edgefuse's byte-level BPE test tokenizer, as a Hugging Face directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from edgefuse.models import save_model_dir, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init gives logits of ~0.1; larger weights give a sharper, more telling model
        model.lm_head.weight.mul_(20)
    save_model_dir(model, tok, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, help="work in this directory and keep its files (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--cases", default="smollm2,qwen2,tiny-qwen2")
    args = ap.parse_args()
    cases = args.cases.split(",")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return report(run(cases, args.keep), args.json)
    with tempfile.TemporaryDirectory(prefix="edgefuse-interop-") as d:  # about 2 GB of exports, removed after
        return report(run(cases, Path(d)), args.json)


def run(cases: list[str], work: Path) -> list[dict]:
    import llama_cpp

    from edgefuse.models import load_model

    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, work dir {work}", flush=True)
    rows = []
    all_proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if "smollm2" in cases:
        print("smollm2: two random adapters, TIES fusion, export", flush=True)
        model, _ = load_model("smollm2-135m")
        for seed in (1, 2):
            random_adapter(model, work / f"smollm2-edge{seed}", seed, all_proj, scale=0.05)
        del model
        edgefuse("fuse", "--method", "ties", "--density", "0.5", "--model", "smollm2-135m", "--adapters",
                 work / "smollm2-edge1", work / "smollm2-edge2", "--out", work / "smollm2-fused")
        rows += check_case("smollm2", "smollm2-135m", work / "smollm2-fused", work, ["f16", "q8_0"], same_file=True)
    if "qwen2" in cases:
        print("qwen2: qwen2.5-coder-0.5b + a random adapter, export", flush=True)
        model, _ = load_model("qwen2.5-coder-0.5b")
        random_adapter(model, work / "qwen2-adapter", 3, ["q_proj", "v_proj", "down_proj"], scale=0.03)
        del model
        rows += check_case("qwen2", "qwen2.5-coder-0.5b", work / "qwen2-adapter", work, ["f16"])
    if "tiny-qwen2" in cases:
        print("tiny-qwen2: built tokenizer, export", flush=True)
        tiny_qwen2(work / "tiny-qwen2-base")
        model, _ = load_model(str(work / "tiny-qwen2-base"))
        random_adapter(model, work / "tiny-qwen2-adapter", 4, all_proj, scale=0.1)
        del model
        rows += check_case("tiny-qwen2", str(work / "tiny-qwen2-base"), work / "tiny-qwen2-adapter", work, ["f16"],
                          same_file=True)
    return rows


def report(rows: list[dict], json_out: Path | None) -> int:
    """The table (and the rows as JSON); 0 when every bound holds."""
    print(f"\n{'case':<11} {'quant':<5} {'pos':>4} {'max|Δ|':>7} {'mean|Δ|':>8} {'max KL':>8} {'mean KL':>8} {'top-1':>6} "
          f"{'top-5':>6} {'|logit|':>7} {'adapter':>7} {'MB':>7}  result")
    for r in rows:
        if "max_abs" not in r:
            print(f"{r['case']:<11} {r['quant']:<5} FAIL: {'; '.join(r['failed'])}")
            continue
        print(f"{r['case']:<11} {r['quant']:<5} {r['positions']:>4} {r['max_abs']:>7.3f} {r['mean_abs']:>8.4f} "
              f"{r['max_kl']:>8.1e} {r['mean_kl']:>8.1e} {r['top1']:>6.3f} {r['top5_overlap']:>6.3f} {r['logit_scale']:>7.1f} "
              f"{r['adapter_effect']:>7.2f} {r['file_mb']:>7.1f}  {'ok' if r['ok'] else 'FAIL: ' + '; '.join(r['failed'])}")
        for part in ("weights_only", "engine_only"):
            if part in r:
                p = r[part]
                print(f"  {part.split('_')[0]:<15} {p['positions']:>4} {p['max_abs']:>7.3f} {p['mean_abs']:>8.4f} "
                      f"{p['max_kl']:>8.1e} {p['mean_kl']:>8.1e} {p['top1']:>6.3f} {p['top5_overlap']:>6.3f}")
    print("max|Δ|, mean|Δ|: llama.cpp vs transformers logits (float32 merged model); KL(transformers ‖ llama.cpp) per "
          "position; |logit|: the largest reference logit; adapter: how far the adapter moves transformers' logits "
          "(mean |Δ|); weights: transformers on the GGUF's own weights vs float32; engine: llama.cpp vs transformers "
          "on the same GGUF")
    if json_out:
        json_out.write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
