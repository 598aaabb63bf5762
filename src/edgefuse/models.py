"""Load any causal LM and fingerprint it; the helpers every layer shares over a loaded model.

Specs: ``smollm2-135m`` (the default) and ``gemma3-270m`` (embedded GGUFs, see `edgefuse.assets`),
``tiny-llama`` (a seeded random tiny Llama with a small byte-level tokenizer, for tests), a local HF
directory, a ``.gguf`` file, or a hub id.
GGUF weights are dequantized once and cached as safetensors so later loads take a second, not 20.

The fingerprint (config + tensor names, shapes, content digest) lets every later stage refuse an
artifact made for another base model.

Shared helpers (`unwrap`, `lm_parts`, `make_batch`, `continuation_token_ids`) live here rather than in
the evaluation code because training (`edgefuse.edge`) runs the model the same way scoring does, and the
edge layer must not depend on evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edgefuse.artifacts import PrunedModelMeta
from edgefuse.assets import EMBEDDED_MODELS, cache_dir, embedded_gguf, gguf_location, mmlu_jsonl
from edgefuse.errors import EdgefuseError
from edgefuse.gguf_tokenizer import spm_as_bpe
from edgefuse.io import atomic_dir, exclusive, refuse_pickles
from edgefuse.precision import default_device as _default_device
from edgefuse.precision import resolve
from edgefuse.tokens import encode_bare

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-llama"
_FP_ATTR = "_edgefuse_fingerprint"


def default_device() -> str:
    return _default_device()


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tokenizer_corpus(every: int = 40) -> list[str]:
    """Every 40th line of the embedded MMLU file (fixed): words the tests will see, so prompts stay short."""
    try:
        with open(mmlu_jsonl(), encoding="utf-8") as f:
            return [line for i, line in enumerate(f) if i % every == 0]
    except (EdgefuseError, OSError):
        return []


def tiny_tokenizer():
    """A deterministic byte-level BPE tokenizer trained on a fixed text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The following are multiple choice questions (with answers) about science, law and medicine.",
        "Question: what is the answer? A. one B. two C. three D. four Answer: A B C D",
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?()[]{}'\"-+*/=<>_\n",
    ] * 4 + _tokenizer_corpus()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_config(tok, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 96):
    """The tiny Llama's (GQA) config for the tokenizer ``tok``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False, rope_theta=10000.0,
    )


def tiny_model(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 96):
    """A randomly initialised tiny Llama (GQA) and its tokenizer, identical for the same seed."""
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(tok, layers, hidden, heads, kv_heads, intermediate)
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.config.name_or_path = TINY_MODEL
    model.eval()
    return model, tok


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a GGUF's dequantized safetensors live: keyed by its path, size and mtime, so a changed file is redone."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def attention_kwargs(source: str) -> dict:
    """``attn_implementation="eager"`` for models with attention soft-capping (Gemma 2), else nothing.

    Why: transformers' SDPA and flash kernels silently skip ``attn_logit_softcapping``, so a Gemma 2
    loaded with its default attention computes another function than the one it was trained as; only
    the eager path applies the cap. Pruned Gemma 2 models reload the same way, so prune, train and
    evaluate all see one model.
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source)
    return {"attn_implementation": "eager"} if getattr(cfg, "attn_logit_softcapping", None) else {}


def _load_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    refuse_pickles(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                 **attention_kwargs(str(path)))
    return model, tok


@contextlib.contextmanager
def shared_gguf_reader() -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader(path)`` of the same file is one reader, parsed once.

    Why: converting a GGUF, transformers 4.57 parses the file's metadata once per step (config, tokenizer
    twice, weights) and `spm_as_bpe` once more; for Gemma 3's 262k-piece vocabulary each parse takes ~16 s of
    the first load's ~80 s (BENCHMARKS.md). transformers imports the reader class inside its loader, so the
    package attribute is swapped for the block and restored after it. The reader is read-only (memory-mapped).
    """
    import gguf

    original, readers = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _load_gguf(gguf: Path, dtype: torch.dtype, name: str):
    """Dequantize a GGUF once, cache it as a safetensors HF directory, load from the cache.

    The conversion holds a lock beside the cache entry, so processes loading the same GGUF at once convert it
    once. The cached tokenizer is the one transformers reads from the GGUF, except that a SentencePiece
    vocabulary is segmented as llama.cpp segments it (`spm_as_bpe`)."""
    cached = gguf_cache_dir(gguf)
    with exclusive(cached.with_name(cached.name + ".lock")):
        if not (cached / "config.json").is_file():
            _convert_gguf(gguf, cached, name)
    model, tok = _load_dir(cached, dtype)
    model.config.name_or_path = name
    return model, tok


def _convert_gguf(gguf: Path, cached: Path, name: str) -> None:
    """Dequantize ``gguf`` with transformers (float32), parsing it once, and write it as an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with shared_gguf_reader():
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # transformers raises many types for bad GGUF files
            raise EdgefuseError(f"cannot load GGUF ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})", path=gguf) from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.config.name_or_path = name
        with atomic_dir(cached) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            spm_as_bpe(tmp / "tokenizer.json", gguf)  # Gemma: segment as llama.cpp does (edgefuse.gguf_tokenizer)
            (tmp / "edgefuse_source.json").write_text(json.dumps({"gguf": str(gguf), "name": name}))


_LOADING = threading.RLock()


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None):
    """Load ``(model, tokenizer)`` for a spec; the model is in eval mode on ``device``, in ``dtype``
    (defaults and checks: `edgefuse.precision.resolve`).

    Weights are read in float32 and fingerprinted before the cast, so a model has one fingerprint whatever
    dtype it runs in, and adapters made in bfloat16 apply to the float32 model and back.

    Loads take turns within a process: transformers' from_pretrained swaps process-wide state while it builds
    a model (meta-device initialisation), so two loads on threads of one process broke each other ("Cannot copy
    out of meta tensor", seen with two trainings on threads; building a LoRA beside a load is unsafe too).
    """
    with _LOADING:
        return _load_model(spec, device, dtype)


def _load_model(spec: str, device: str | None, dtype: str | torch.dtype | None):
    precision = resolve(device, dtype)
    _quiet_transformers()
    spec = spec or DEFAULT_MODEL
    dtype = torch.float32  # every source is read in float32; the cast to ``precision`` comes last
    if spec == TINY_MODEL:
        model, tok = tiny_model()
    elif spec in EMBEDDED_MODELS:
        model, tok = _load_gguf(embedded_gguf(spec), dtype, spec)
    elif spec.endswith(".gguf"):
        p = Path(spec)
        if not p.is_file():
            raise EdgefuseError("GGUF file not found", path=p)
        model, tok = _load_gguf(p, dtype, p.name)
    elif Path(spec).is_dir():
        p = Path(spec)
        if not (p / "config.json").is_file():
            raise EdgefuseError("not a Hugging Face model directory (no config.json)", path=p)
        model, tok = _load_dir(p, dtype)
        edgefuse_meta = p / "edgefuse_model.json"  # edgefuse.edge.schema.MODEL_META (models sits below edge)
        if edgefuse_meta.is_file():
            model.config.name_or_path = PrunedModelMeta.read(edgefuse_meta).name
    elif "/" in spec and not Path(spec).exists() and not spec.startswith((".", "/")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, use_safetensors=True,
                                                         **attention_kwargs(spec))
        except OSError as e:
            raise EdgefuseError(f"cannot load hub model {spec!r} ({str(e).splitlines()[0]})") from None
    else:
        raise EdgefuseError(
            f"unknown model spec {spec!r}: use {', '.join(EMBEDDED_MODELS)}, {TINY_MODEL}, a local HF directory, "
            "a .gguf file or a hub id"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    fingerprint(model)  # cached on the model: the float32 weights' fingerprint
    cast(model, precision.device, precision.torch_dtype)
    model.eval()
    return model, tok


def model_config(spec: str):
    """The transformers config of a model spec, read without its weights; `EdgefuseError` (one line) when it is
    not at hand offline.

    Why: a check that needs only the architecture (which layers exist, `fuse` without ``--model``) should not
    load, dequantize or download weights. Sources, as `load_model` resolves specs: the tiny model's config; an
    embedded or ``.gguf`` model's cached conversion (its config.json), else the GGUF's metadata; a local HF
    directory's config.json; a hub id from the local hub cache only (no network).
    """
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        if spec == TINY_MODEL:
            return tiny_config(tiny_tokenizer())
        path = _config_file(spec)
        if path is not None:
            if not path.is_file():
                raise EdgefuseError(f"{path} does not exist")
            if path.name == "config.json":
                return AutoConfig.from_pretrained(str(path.parent))
            with shared_gguf_reader():  # metadata only: no tensor is dequantized
                return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if "/" in spec and not spec.startswith((".", "/")):
            return AutoConfig.from_pretrained(spec, local_files_only=True)
    except EdgefuseError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types for missing or unreadable configs
        raise EdgefuseError(f"no config for model {spec!r} offline ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    raise EdgefuseError(f"model {spec!r} is none of {', '.join(EMBEDDED_MODELS)}, {TINY_MODEL}, a local directory, "
                        "a .gguf file or a hub id")


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer by name: nn.Linear, or GPT-2's Conv1D whose weight is stored (in, out)."""
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[name] = (mod.out_features, mod.in_features)
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None:
            shapes[name] = (mod.weight.shape[1], mod.weight.shape[0])
    return shapes


def _config_file(spec: str) -> Path | None:
    """The local file a spec's config is read from: an embedded or ``.gguf`` model's cached conversion's config.json,
    else the GGUF itself (its metadata); a directory's config.json; None for the tiny model and hub ids. A cached
    architecture is keyed by it and its modification time, so a new conversion or ``EDGEFUSE_CACHE`` is read afresh."""
    if spec in EMBEDDED_MODELS or spec.endswith(".gguf"):
        gguf = gguf_location(spec) if spec in EMBEDDED_MODELS else Path(spec)
        converted = gguf_cache_dir(gguf) / "config.json" if gguf.is_file() else None
        return converted if converted is not None and converted.is_file() else gguf
    return Path(spec) / "config.json" if Path(spec).is_dir() else None


def _stamp(spec: str) -> tuple[str, int] | None:
    p = _config_file(spec)
    return (str(p.resolve()), p.stat().st_mtime_ns) if p is not None and p.is_file() else None


@functools.lru_cache(maxsize=16)
def _architecture(spec: str, stamp: tuple[str, int] | None) -> tuple[tuple[str, tuple[int, int]], ...]:
    from transformers import AutoModelForCausalLM

    cfg = model_config(spec)
    try:
        with torch.device("meta"):  # shapes without storage: no weights read or allocated
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - an architecture this transformers does not know
        raise EdgefuseError(f"cannot build model {spec!r} from its config ({type(e).__name__})") from None
    return tuple(linear_shapes(model).items())


def architecture_shapes(spec: str) -> dict[str, tuple[int, int]]:
    """The linear layers of a model spec, (out, in) by name, from its config alone (`model_config`), built on the
    meta device and cached per spec; `EdgefuseError` when its config is not at hand offline."""
    return dict(_architecture(spec, _stamp(spec)))


def cast(model, device, dtype: torch.dtype):
    """Move ``model`` to ``device`` and its weights to ``dtype``, as ``from_pretrained(dtype=...)`` would.

    Why not ``model.to(dtype)`` alone: it also rounds buffers the model computes rather than stores (the
    rotary ``inv_freq``), which transformers keeps in float32; those keep their dtype here.
    """
    persistent = set(model.state_dict())
    computed = {name: buf for name, buf in model.named_buffers() if name not in persistent}
    model.to(device=device, dtype=dtype)
    for name, buf in computed.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attr, buf.to(device), persistent=False)
    return model


def fingerprint(model) -> str:
    """Stable digest of a model's architecture and weights (config, tensor names, shapes, content).

    The content digest samples a fixed strided subset of each tensor so it costs milliseconds while
    still telling apart two checkpoints of the same architecture. Half-precision tensors are hashed as
    their exact float32 values, so saving a bfloat16 model and loading it in float32 keeps its fingerprint.
    """
    cached = getattr(model, _FP_ATTR, None)
    if cached:
        return cached
    cfg = model.config.to_dict()
    keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in keep}, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        dtype = torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype
        h.update(f"{name}:{tuple(t.shape)}:{dtype}".encode())
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(flat[::step][:64].float().cpu().numpy().tobytes())
    fp = h.hexdigest()[:32]
    try:
        object.__setattr__(model, _FP_ATTR, fp)
    except Exception:  # noqa: BLE001 - caching is an optimisation only
        pass
    return fp


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model_dir(model, tokenizer, out, extra_json: dict | None = None):
    """Write a Hugging Face directory (safetensors, config, generation config, tokenizer, and any ``extra_json``
    files) atomically: transformers loads it with no edgefuse code, and an error leaves nothing behind."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return out


def unwrap(model):
    """The underlying transformers causal LM (PEFT wrappers inject LoRA in place, so this keeps it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def lm_parts(model):
    """(decoder body, output head, final logit soft-cap or None) of a causal LM."""
    lm = unwrap(model)
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return body, head, softcap


def continuation_token_ids(tokenizer, continuations: Sequence[str]) -> list[int]:
    """Token id of each single-token continuation (e.g. ' A'), checked in context.

    A tokenizer may merge the space with the preceding text; we encode ``'Answer:' + cont`` and take
    the tokens added after ``'Answer:'``, and insist on exactly one.
    """
    ctx, *fulls = encode_bare(tokenizer, ["Answer:", *("Answer:" + c for c in continuations)])
    ids = []
    for c, full in zip(continuations, fulls):
        extra = full[len(ctx):]
        if full[: len(ctx)] != ctx or len(extra) != 1:
            raise EdgefuseError(f"continuation {c!r} is not a single token for this tokenizer")
        ids.append(extra[0])
    if len(set(ids)) != len(ids):
        raise EdgefuseError("answer continuations map to the same token")
    return ids


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    last_index: torch.Tensor  # position of each row's last real token


def make_batch(seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str, device) -> Batch:
    """Pad token sequences; positions count real tokens only, so padding cannot shift RoPE."""
    n, width = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    last = torch.empty(n, dtype=torch.long)
    for i, s in enumerate(seqs):
        if padding_side == "left":
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
            last[i] = width - 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            last[i] = len(s) - 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), pos.to(device), last.to(device))
