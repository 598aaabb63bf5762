"""Ship a model: merge an adapter into its base and write a Hugging Face directory or a GGUF file.

Why: a fused adapter is only useful on a device once it is part of a model the device's runtime loads — a
Hugging Face directory for transformers (no edgefuse code needed to read it), or one GGUF file for llama.cpp
and Ollama on phones and laptops. Both formats start from the same merged model (the adapter read by
`edgefuse.adapters.load_adapter` against the loaded base, then `edgefuse.fusion.api.merge_into_model`, as
behind ``edgefuse fuse --merged-out``), and both are written to a temporary path that is renamed into place only when
complete, so an error never leaves a half-written model behind.

GGUF is written with the ``gguf`` package's writer and tensor-name maps. Two conventions of llama.cpp matter:
its ``llama`` architecture rotates adjacent pairs of each query/key head where transformers rotates the two
halves, so Q and K rows are permuted on the way out (transformers' GGUF loader undoes it on the way in); and a
tied output embedding is written by leaving ``output.weight`` out.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgefuse.adapters import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, ModelShapes, load_adapter
from edgefuse.assets import EMBEDDED_MODELS, embedded_gguf
from edgefuse.errors import EdgefuseError
from edgefuse.fusion.api import merge_into_model
from edgefuse.io import publish, sha256_file
from edgefuse.models import cast, load_model, save_model_dir
from edgefuse.precision import resolve
from edgefuse.tokens import bos_prefix

FORMATS = ("hf", "gguf")
QUANTS = ("f32", "f16", "q8_0")
DEFAULT_QUANT = "f16"
EXPORT_FILE = "edgefuse_export.json"


@dataclass(frozen=True)
class GgufLayout:
    """How a transformers family is written as GGUF: llama.cpp's architecture and its rotary convention."""

    arch: str  # name of a gguf.MODEL_ARCH member
    permute_qk: bool  # llama.cpp's "llama" architecture rotates interleaved pairs (see the module docstring)


# Families whose GGUF both llama.cpp and transformers' GGUF loader read with the same meaning. Mistral is
# llama.cpp's "llama" architecture (without a sliding window, which that architecture does not have).
GGUF_LAYOUTS = {
    "llama": GgufLayout("LLAMA", True),
    "mistral": GgufLayout("LLAMA", True),
    "qwen2": GgufLayout("QWEN2", False),
    "qwen3": GgufLayout("QWEN3", False),
}


def gguf_families() -> str:
    """The model types GGUF export supports, for error messages and help."""
    return ", ".join(GGUF_LAYOUTS)


def check_options(fmt: str, quant: str | None) -> str | None:
    """Validate ``--format`` / ``--quant`` before anything is loaded; returns the quantisation to use."""
    if fmt not in FORMATS:
        raise EdgefuseError(f"unknown --format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "hf":
        if quant is not None:
            raise EdgefuseError("--quant applies to --format gguf only (a Hugging Face export keeps the model's dtype)")
        return None
    quant = quant or DEFAULT_QUANT
    if quant not in QUANTS:
        raise EdgefuseError(f"unknown --quant {quant!r}; valid: {', '.join(QUANTS)}")
    if quant == "q8_0" and not _q8_0_available():
        from importlib.metadata import version

        raise EdgefuseError(f"--quant q8_0 needs gguf's Q8_0 quantizer, which the installed gguf {version('gguf')} "
                            "lacks; use f16 or f32")
    return quant


def _q8_0_available() -> bool:
    """Whether the installed gguf package can quantize to Q8_0 (older releases only dequantize)."""
    import numpy as np

    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        quantize(np.zeros((1, 32), dtype=np.float32), GGMLQuantizationType.Q8_0)
    except (ImportError, NotImplementedError):
        return False
    return True


# ---------------------------------------------------------------- the merged model (one mechanism for every output)

def _adapter_fingerprints(adapter: LoraAdapter) -> set[str]:
    return {adapter.base_fingerprint} if adapter.base_fingerprint else set()


def export(adapter_dir: str | Path, out: str | Path, model: str | None = None, fmt: str = "hf",
           quant: str | None = None, force: bool = False, device: str | None = None,
           dtype: str | None = None) -> dict[str, Any]:
    """Merge the adapter at ``adapter_dir`` into its base model and write ``out`` as ``fmt``; returns a summary.

    ``model`` defaults to the base model the adapter records. The merge runs in float32 on ``device``;
    ``dtype`` is that of the written Hugging Face weights (a GGUF's are set by ``quant``). Every check
    (options, output path, fingerprint, shapes, GGUF family and tokenizer) runs before the output appears.
    """
    quant = check_options(fmt, quant)
    precision = resolve(device, dtype)
    if fmt == "gguf" and precision.reduced:
        raise EdgefuseError(f"--dtype {precision.dtype} applies to --format hf; a GGUF's weights are set by --quant")
    out = Path(out)
    if fmt == "gguf" and out.is_dir():
        raise EdgefuseError("--out of a GGUF export is a file (e.g. model.gguf), not a directory", path=out)
    if out.exists() and not force:
        raise EdgefuseError("output already exists (pass --force to overwrite)", path=out)
    spec = model or load_adapter(adapter_dir).base_model  # the base it records, when --model is not given
    if not spec:
        raise EdgefuseError("the adapter records no base model; pass --model", path=adapter_dir)
    merged, tok = load_model(spec, device=precision.device)  # float32: the merge adds ΔW without rounding
    # the one reader, now against this model: recorded fingerprint (unless forced), targets, shapes
    adapter = load_adapter(adapter_dir, ModelShapes.of(merged), force=force)
    merge_into_model(merged, adapter)
    provenance = {
        "adapter": str(adapter_dir), "base_model": spec, "base_fingerprint": next(iter(_adapter_fingerprints(adapter)), None),
        "adapter_sha256": {f: sha256_file(Path(adapter_dir) / f) for f in (CONFIG_FILE, WEIGHTS_FILE)},
        "format": fmt, "quant": quant, "dtype": precision.dtype if fmt == "hf" else None,
    }
    if fmt == "hf":
        save_model_dir(cast(merged, precision.device, precision.torch_dtype), tok, out, {EXPORT_FILE: provenance})
        return {**provenance, "out": str(out), "notes": []}
    name = Path(spec).name if Path(spec).exists() else spec  # general.name: a directory's name, not its path
    notes = write_gguf(merged, tok, out, quant, name=name, source_gguf=source_gguf(spec))
    return {**provenance, "out": str(out), "notes": notes}


# ---------------------------------------------------------------- GGUF

def source_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec was loaded from, if any: its tokenizer metadata is copied as is."""
    if spec in EMBEDDED_MODELS:
        return embedded_gguf(spec)
    if spec.endswith(".gguf") and Path(spec).is_file():
        return Path(spec)
    return None


def gguf_layout(config) -> GgufLayout:
    """The family's GGUF layout; refuses families and features GGUF export does not write faithfully."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_LAYOUTS:
        raise EdgefuseError(f"GGUF export does not support model_type {model_type!r}; supported: {gguf_families()} "
                            "(use --format hf for the others)")
    if getattr(config, "rope_scaling", None):
        raise EdgefuseError(f"GGUF export does not write rope scaling ({config.rope_scaling}); use --format hf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise EdgefuseError(f"GGUF export does not support {model_type} models with attention or MLP biases "
                            "(transformers' GGUF loader drops them); use --format hf")
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise EdgefuseError("GGUF export writes Mistral as llama.cpp's llama architecture, which has no sliding "
                            f"window (this model's is {config.sliding_window}); use --format hf")
    if getattr(config, "use_sliding_window", False):
        raise EdgefuseError(f"GGUF export does not support {model_type} with a sliding window; use --format hf")
    return GGUF_LAYOUTS[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotate_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' rotary layout (halves) to llama.cpp's (adjacent pairs).

    Row ``j·(d/2) + i`` of a head (half j, frequency i) becomes row ``2·i + j``; a 1-D bias moves the same way.
    """
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, layout: GgufLayout) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) of every weight, named by gguf's map and permuted where llama.cpp expects it."""
    import gguf

    cfg = model.config
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch), cfg.num_hidden_layers)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    out = []
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a GGUF without output.weight is read as tied
        base, suffix = hf_name.rsplit(".", 1)
        name = name_map.get_name(base)
        if name is None:
            raise EdgefuseError(f"tensor {hf_name} has no GGUF name in gguf's {layout.arch.lower()} map")
        t = t.detach().float().cpu()
        kind = name.rsplit(".", 1)[-1]
        if layout.permute_qk and kind in heads:
            t = rotate_pairs(t, heads[kind])
        out.append((f"{name}.{suffix}", t))
    return out


def ggml_type(t: torch.Tensor, quant: str):
    """The GGML type a tensor is stored as: 1-D tensors (norms, biases) stay f32, as llama.cpp keeps them.

    Q8_0 needs rows in blocks of 32; a matrix whose rows are not falls back to f16.
    """
    from gguf import GGMLQuantizationType as T

    if quant == "f32" or t.ndim == 1:
        return T.F32
    if quant == "q8_0" and t.shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16


def _tensor_info(t: torch.Tensor, qtype) -> tuple:
    """(stored shape, numpy dtype, bytes, raw type) of a tensor before it is encoded, for the file's header."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quant_shape_to_byte_shape

    shape = tuple(t.shape)
    if qtype == T.Q8_0:
        stored = quant_shape_to_byte_shape(shape, qtype)
        return stored, np.dtype(np.uint8), int(np.prod(stored)), qtype
    dtype = np.dtype(np.float32 if qtype == T.F32 else np.float16)
    return shape, dtype, t.numel() * dtype.itemsize, None


def _encode(t: torch.Tensor, qtype):
    """The bytes of one tensor as ``qtype`` (gguf's own Q8_0 quantizer for q8_0)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    a = t.numpy().astype(np.float32)
    if qtype == T.Q8_0:
        return quantize(a, qtype)
    return a if qtype == T.F32 else a.astype(np.float16)


def _write_hparams(writer, config, name: str, quant: str) -> None:
    """The hyper-parameters llama.cpp and transformers' GGUF loader read, under the architecture's keys."""
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(file_type))
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model, tok, out: str | Path, quant: str = DEFAULT_QUANT, name: str | None = None,
               source_gguf: Path | None = None) -> list[str]:
    """Write ``model`` and its tokenizer as one GGUF file at ``out`` (atomically); returns notes for the user."""
    import gguf

    quant = check_options("gguf", quant)
    layout = gguf_layout(model.config)
    tensors = gguf_tensors(model, layout)  # checks every name before anything is written
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, layout.arch)])
        _write_hparams(writer, model.config, name or str(model.config.name_or_path or "model"), quant)
        notes = write_tokenizer(writer, tok, model.config.vocab_size, source_gguf) + _reader_notes(model.config)
        types = [ggml_type(t, quant) for _, t in tensors]
        for (tname, t), qtype in zip(tensors, types):
            writer.add_tensor_info(tname, *_tensor_info(t, qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (_, t), qtype in zip(tensors, types):  # one tensor encoded at a time: memory stays at the model's
            writer.write_tensor_data(_encode(t, qtype))
        writer.close()
        publish(tmp)  # mkstemp made it 0600; a GGUF handed to Ollama (its own user) must be readable
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return notes


def _reader_notes(config) -> list[str]:
    """Where transformers' GGUF loader, unlike llama.cpp, would misread a correct file (it ignores Qwen3's key length)."""
    from transformers import Qwen3Config

    if config.model_type == "qwen3" and head_dim(config) != Qwen3Config().head_dim:
        return [f"head_dim {head_dim(config)}: llama.cpp reads it from attention.key_length, but transformers' GGUF "
                f"loader assumes Qwen3's default {Qwen3Config().head_dim} and cannot load this file"]
    return []


# ---------------------------------------------------------------- GGUF tokenizer metadata

def write_tokenizer(writer, tok, vocab_size: int, source: Path | None = None) -> list[str]:
    """Write ``tokenizer.ggml.*``: copied from the model's own GGUF when it came from one, else built from ``tok``."""
    if source is not None:
        return copy_tokenizer(writer, source, vocab_size)
    return bpe_tokenizer(writer, tok, vocab_size)


def copy_tokenizer(writer, source: Path, vocab_size: int) -> list[str]:
    """Copy every ``tokenizer.*`` field of ``source`` unchanged: exactly what llama.cpp already ran this model with."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        n = 0 if tokens is None else len(tokens.data)
        raise EdgefuseError(f"its tokenizer has {n} tokens, the model {vocab_size}", path=source)
    for key, f in fields.items():
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
    return []


def bpe_tokenizer(writer, tok, vocab_size: int) -> list[str]:
    """Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM style) as GGUF's ``gpt2`` tokenizer model, with merges.

    Other tokenizer models are refused: a SentencePiece vocabulary needs its piece scores, which a
    ``tokenizer.json`` does not carry.
    """
    from gguf import SpecialVocab

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        tj_path = Path(d) / "tokenizer.json"
        if not tj_path.is_file():
            raise EdgefuseError("GGUF export needs a fast tokenizer (tokenizer.json); this model has none")
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        model = tj.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or not _is_byte_level(tj.get("decoder")):
            raise EdgefuseError(f"GGUF export supports byte-level BPE tokenizers only; this one is {model.get('type')}"
                                f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}")
        special = SpecialVocab(d, load_merges=True, n_vocab=vocab_size)
        pre, notes = _pre_tokenizer(tj.get("pre_tokenizer"))
    for kind, adds in _adds_special(tok).items():  # what the tokenizer does, where its config does not say
        special.add_special_token.setdefault(kind, adds)
    tokens, types = bpe_tokens(tok, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    special.add_to_gguf(writer, quiet=True)
    return notes


def bpe_tokens(tok, vocab_size: int) -> tuple[list[str], list]:
    """Every id's token string and GGUF token type; ids past the tokenizer (padded embeddings) become unused."""
    from gguf import TokenType

    added = {i: a for i, a in tok.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        piece = tok.convert_ids_to_tokens(i) if i < len(tok) else None
        if piece is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(piece)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(piece)
            types.append(TokenType.NORMAL)
    return tokens, types


def _adds_special(tok) -> dict[str, bool]:
    """Whether encoding text adds BOS / EOS (llama.cpp's ``add_bos_token`` / ``add_eos_token``). BOS is what
    edgefuse itself scores and trains with (`edgefuse.tokens.bos_prefix`), so the exported model starts its
    sequences the way the adapter was trained."""
    ids = tok("a").input_ids
    return {"bos": bool(bos_prefix(tok)),
            "eos": tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]}


def _is_byte_level(decoder: dict | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return decoder.get("type") == "Sequence" and any(_is_byte_level(d) for d in decoder.get("decoders", []))


def _pre_tokenizer(pre: dict | None) -> tuple[str, list[str]]:
    """llama.cpp's name for the pre-tokenizer when it can be told from its structure, else its default + a note.

    A plain byte-level pre-tokenizer with its built-in regex is GPT-2's (``gpt-2``); custom split regexes
    (Llama 3, Qwen, …) are not guessed.
    """
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2", []
    return "default", ["tokenizer pre-tokenizer not identified: llama.cpp will split text with its default rules "
                       "(check a few prompts' tokens against transformers)"]
