"""What crosses the wire, as Flower records: the cloud's training job and the edge's package.

Why one module: the privacy promise ("an edge uploads its adapter and manifest, nothing else") is a
property of exactly two functions here, `package_to_content` and `job_to_content`, so it can be read
and tested in one place.

- Job (cloud → edge), one ``ConfigRecord`` ``"job"``: edge name, domains, seed, round, base-model spec
  and fingerprint, the pruning plan (JSON; it holds kept indices, no data), the pruned model's
  fingerprint, training hyper-parameters and the split settings (and, when the study mixes adapters by
  retrieval, the settings of the vector the edge computes from its own examples). Never any data item. In rounds after
  the first also the start adapter (the fused adapter in this edge's pruned shapes), laid out like a
  package under ``"start"`` / ``"start-files"``. For unstructured / 2:4 plans, which cannot list what
  they zero, the weight masks as packed bits (``"masks"``: one uint8 array per projection; weights
  and data never travel, and 1 bit per weight is 1/32 of the float32 model).
- Package (edge → cloud): ``ArrayRecord`` ``"adapter"`` with the PEFT LoRA tensors of the edge
  package, and ``ConfigRecord`` ``"package"`` with the text of ``adapter_config.json`` and of the
  ``edgefuse.json`` manifest (file hashes, fingerprints, plan hash, training statistics; when the job
  asked for it, the adapter's retrieval vector: one mean embedding of the edge's examples). Only when the job
  asks (``interference.source: edges``): ``"grams"``, the Gram matrix HᵀH of each module input of the base model
  on the edge's own prompts — second moments of private inputs, never the inputs — and ``"grams-meta"``.
The cloud rebuilds the package directory from these and checks it (`edgefuse.federated.verify`)
before anything else reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgefuse.adapters import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, verify_hashes
from edgefuse.errors import EdgefuseError
from edgefuse.interference.grams import GramSet, check_upload, save_grams
from edgefuse.io import load_safetensors, publish, writing

JOB_RECORD = "job"
ADAPTER_RECORD = "adapter"
PACKAGE_RECORD = "package"
IDENTITY_RECORD = "identity"
START_RECORD = "start"
START_FILES_RECORD = "start-files"
MASKS_RECORD = "masks"
# An edge's own Gram matrices (``interference.source: edges``, off by default): one float32 tensor per module input,
# and their layout and counts; sent only when the job asks, checked by the cloud before it keeps them.
GRAMS_RECORD = "grams"
GRAMS_META_RECORD = "grams-meta"
GRAMS_META_KEYS = ("modules", "prompts", "tokens")
# The only keys a package's ConfigRecord may carry.
PACKAGE_KEYS = ("manifest", "adapter_config")
# Message types (Flower routes "<category>.<action>").
MSG_IDENTIFY = "query.identify"
MSG_TRAIN = "train"


def job_to_content(job: dict[str, Any], start_dir: Path | None = None, masks: dict | None = None):
    """A training job as a RecordDict: scalars as they are, nested values as JSON text (+ start adapter, masks)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    rec = {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v) for k, v in job.items()}
    content = RecordDict({JOB_RECORD: ConfigRecord(rec)})
    if start_dir is not None:
        content[START_RECORD], content[START_FILES_RECORD] = _dir_records(start_dir)
    if masks:
        content[MASKS_RECORD] = ArrayRecord({name: Array.from_numpy_ndarray(np.packbits(m.cpu().numpy().ravel()))
                                             for name, m in sorted(masks.items())})
    return content


def content_to_masks(content, shapes: dict[str, tuple[int, int]]) -> dict | None:
    """The job's weight masks unpacked to ``shapes`` (module name → (out, in)), or None when it has none."""
    import numpy as np
    import torch

    if MASKS_RECORD not in content.array_records:
        return None
    out = {}
    for name, arr in content.array_records[MASKS_RECORD].items():
        if name not in shapes:
            raise EdgefuseError(f"mask for unknown module {name}")
        n = shapes[name][0] * shapes[name][1]
        bits = np.unpackbits(arr.numpy().astype(np.uint8))
        if bits.size < n or bits[n:].any():
            raise EdgefuseError(f"mask for {name} does not fit its {shapes[name][0]}×{shapes[name][1]} weight")
        out[name] = torch.from_numpy(bits[:n].reshape(shapes[name]).astype(bool))
    return out


def content_to_start(content, directory: Path) -> Path | None:
    """Write the job's start adapter (if any) into ``directory`` and check its hashes; returns it or None."""
    if START_RECORD not in content.array_records:
        return None
    if START_FILES_RECORD not in content.config_records:
        raise EdgefuseError(f"job carries start tensors without the {START_FILES_RECORD!r} record")
    _write_dir(content.array_records[START_RECORD], content.config_records[START_FILES_RECORD], Path(directory))
    verify_hashes(directory)
    return Path(directory)


JSON_FIELDS = ("domains", "plan", "train", "split", "embedding", "grams")


def content_to_job(content) -> dict[str, Any]:
    if JOB_RECORD not in content.config_records:
        raise EdgefuseError("message carries no training job")
    job = dict(content.config_records[JOB_RECORD])
    for k in JSON_FIELDS:
        if isinstance(job.get(k), str):
            job[k] = json.loads(job[k])
    return job


def _dir_records(adapter_dir: Path):
    """An adapter directory as (tensors, JSON texts of its PEFT config and manifest)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    adapter_dir = Path(adapter_dir)
    tensors = load_safetensors(adapter_dir / WEIGHTS_FILE)
    arrays = ArrayRecord()
    for name in sorted(tensors):
        arrays[name] = Array.from_numpy_ndarray(tensors[name].detach().cpu().contiguous().numpy())
    cfg = ConfigRecord({"manifest": (adapter_dir / MANIFEST_FILE).read_text(encoding="utf-8"),
                        "adapter_config": (adapter_dir / CONFIG_FILE).read_text(encoding="utf-8")})
    return arrays, cfg


def package_to_content(package_dir: Path, grams_dir: Path | None = None):
    """The edge's upload: the adapter tensors and the two JSON texts of its package, nothing else — plus its own
    Gram matrices (``grams_dir``, a one-domain Gram directory) when the job asked for them."""
    from flwr.app import RecordDict

    arrays, cfg = _dir_records(package_dir)
    content = RecordDict({ADAPTER_RECORD: arrays, PACKAGE_RECORD: cfg})
    if grams_dir is not None:
        content[GRAMS_RECORD], content[GRAMS_META_RECORD] = _grams_records(Path(grams_dir))
    return content


def _grams_records(grams_dir: Path):
    """A one-domain Gram directory as (tensors, its module layout and token/prompt counts)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    gs = GramSet(grams_dir)
    if len(gs.domains) != 1:
        raise EdgefuseError(f"an edge sends one domain's Gram matrices, this directory has {len(gs.domains)}",
                            path=grams_dir)
    entry = gs.manifest.domains[gs.domains[0]]
    tensors = load_safetensors(grams_dir / entry.file)
    arrays = ArrayRecord({k: Array.from_numpy_ndarray(tensors[k].float().contiguous().numpy()) for k in sorted(tensors)})
    meta = ConfigRecord({"modules": json.dumps(gs.manifest.modules, sort_keys=True), "tokens": entry.tokens,
                         "prompts": entry.prompts})
    return arrays, meta


def content_to_grams(content, directory: Path, layout, fields: dict[str, Any], domain: str, what: str):
    """Check the Gram matrices of an edge's reply against the base model's ``layout``
    (`edgefuse.interference.collect.gram_layout`) and write them as a one-domain Gram directory (all or nothing);
    one `EdgefuseError` naming ``what`` on a missing, malformed, wrongly shaped, non-finite or non-PSD matrix."""
    import numpy as np
    import torch

    if GRAMS_RECORD not in content.array_records or GRAMS_META_RECORD not in content.config_records:
        raise EdgefuseError("reply lacks the Gram matrices the job asked for", path=what)
    meta = content.config_records[GRAMS_META_RECORD]
    if sorted(meta) != sorted(GRAMS_META_KEYS):
        raise EdgefuseError(f"{GRAMS_META_RECORD} must hold exactly {', '.join(GRAMS_META_KEYS)} "
                            f"(got {', '.join(sorted(meta))})", path=what)
    try:
        aliases = json.loads(meta["modules"])
    except (TypeError, ValueError):
        aliases = None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise EdgefuseError("Gram module layout is not a JSON object of module → key", path=what)
    mats = {}
    for key, arr in content.array_records[GRAMS_RECORD].items():
        a = arr.numpy()
        if a.dtype != np.float32:
            raise EdgefuseError(f"Gram matrix {key} has dtype {a.dtype}; edges send float32", path=what)
        mats[key] = torch.from_numpy(np.ascontiguousarray(a))
    check_upload(mats, aliases, {"token": meta["tokens"], "prompt": meta["prompts"]}, layout, what)
    return save_grams(directory, fields, {domain: mats}, {domain: meta["tokens"]}, {domain: meta["prompts"]}, aliases)


def content_to_files(content, directory: Path, grams: bool = False) -> None:
    """Write a received package into ``directory`` (PEFT files + manifest) exactly as the edge wrote them.

    The safetensors file is re-serialised from the received tensors the way `save_adapter` writes it, so
    its sha256 matches the manifest only if the tensors arrived unchanged. Raises on a malformed upload, and on
    any record beyond the package (the Gram records only where the job asked for them: ``grams``).
    """
    if ADAPTER_RECORD not in content.array_records or PACKAGE_RECORD not in content.config_records:
        raise EdgefuseError(f"reply lacks the {ADAPTER_RECORD!r} tensors or the {PACKAGE_RECORD!r} record")
    arrays = {ADAPTER_RECORD} | ({GRAMS_RECORD} if grams else set())
    configs = {PACKAGE_RECORD} | ({GRAMS_META_RECORD} if grams else set())
    extra = sorted(set(content.array_records) - arrays) + sorted(
        set(content.config_records) - configs) + sorted(content.metric_records)
    if extra:
        raise EdgefuseError(f"reply carries records beyond the package: {', '.join(extra)}")
    _write_dir(content.array_records[ADAPTER_RECORD], content.config_records[PACKAGE_RECORD], Path(directory))


def _write_dir(arrays, cfg, directory: Path) -> None:
    """Inverse of `_dir_records`: float32 tensors → safetensors as `save_adapter` writes it, texts → files."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    if sorted(cfg) != sorted(PACKAGE_KEYS):
        raise EdgefuseError(f"package record must hold exactly {', '.join(PACKAGE_KEYS)} (got {', '.join(sorted(cfg))})")
    tensors: dict[str, torch.Tensor] = {}
    for name, arr in arrays.items():
        a = arr.numpy()
        if a.dtype != np.float32:
            raise EdgefuseError(f"tensor {name} has dtype {a.dtype}; packages hold float32")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(a))
    for key in PACKAGE_KEYS:
        try:
            json.loads(cfg[key])
        except (TypeError, ValueError):
            raise EdgefuseError(f"package {key} is not JSON text") from None
    with writing(directory, always=True):
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        publish(directory / WEIGHTS_FILE)  # safetensors >= 0.8 leaves it 0600 (its own temporary file)
        (directory / CONFIG_FILE).write_text(cfg["adapter_config"], encoding="utf-8")
        (directory / MANIFEST_FILE).write_text(cfg["manifest"], encoding="utf-8")


def identity_content(node_config: dict[str, Any]):
    """An edge's answer to "who are you": its name (and domains, memory budget) from its node config, or its
    simulation slot."""
    from flwr.app import ConfigRecord, RecordDict

    keys = ("edge", "domains", "memory-budget-gib", "partition-id", "num-partitions")
    keep = {k: node_config[k] for k in keys if k in node_config}
    return RecordDict({IDENTITY_RECORD: ConfigRecord(keep)})
