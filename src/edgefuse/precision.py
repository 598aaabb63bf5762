"""Device and dtype: the one place that names them, picks their defaults and refuses what cannot run.

Why one place: every command (``--device``, ``--dtype``), the study config (``device``, ``dtype``) and the
library (`edgefuse.models.load_model`, `edgefuse.edge.train.train_edge`) take the same two settings; each
leaves them ``None`` and `resolve` decides — the device is ``cuda`` when torch sees a GPU, else ``cpu``;
the dtype is ``float32``. `resolve` also refuses, as one line and before any model is loaded, an unknown
dtype or device, a device torch cannot reach, and a dtype the device cannot compute in (it runs a tiny
forward and backward there once, so the answer is torch's, not a table of ours).

What the dtype means: the base weights are held and run in it (scoring, pruning's forward and backward,
training's frozen weights); LoRA weights and optimizer state stay float32 and training runs its forward
under autocast; scores, losses and pruning importance are accumulated in float32.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from edgefuse.errors import EdgefuseError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = "float32"
DEVICE_TYPES = ("cpu", "cuda", "mps")


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_name(dtype: str | torch.dtype | None) -> str:
    """The canonical name of a dtype given by name or as a torch dtype (``None``: the default)."""
    if dtype is None:
        return DEFAULT_DTYPE
    for name, t in DTYPES.items():
        if dtype == t or dtype == name:
            return name
    raise EdgefuseError(f"unknown dtype {str(dtype)!r}; valid: {', '.join(DTYPES)}")


def parse_device(device: str) -> torch.device:
    """A device name torch understands and edgefuse runs on (syntax only: cpu, cuda, cuda:N, mps)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise EdgefuseError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps")
    return dev


def _check_reachable(dev: torch.device, name: str) -> None:
    """Refuse a device this torch build or machine does not have."""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EdgefuseError(f"device {name!r}: torch {torch.__version__} sees no CUDA GPU on this machine; "
                                "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EdgefuseError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise EdgefuseError(f"device {name!r}: MPS is not available on this machine; use --device cpu")


def _probe(device: str, dtype: torch.dtype) -> None:
    """A tiny forward and backward in ``dtype`` on ``device`` (matmul, softmax, attention, autocast); raises
    whatever torch raises where the build lacks a kernel."""
    x = torch.randn(2, 4, 8, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 8, device=device, dtype=dtype)
    h = torch.nn.functional.linear(x, w).softmax(-1)
    a = torch.nn.functional.scaled_dot_product_attention(h[None], h[None], h[None], is_causal=True)
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        y = torch.nn.functional.linear(a.float(), w.float())
    y.float().sum().backward()


@functools.lru_cache(maxsize=None)
def _unsupported(device: str, name: str) -> str | None:
    """Why ``name`` cannot run on ``device`` (None when it can); probed once per process."""
    dev = torch.device(device)
    if dev.type == "cuda" and name == "bfloat16":
        with contextlib.suppress(TypeError):  # older torch: no including_emulation argument
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                return f"{torch.cuda.get_device_name(dev)} has no native bfloat16"
    try:
        _probe(device, DTYPES[name])
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


@dataclass(frozen=True)
class Precision:
    """Where the model runs and in which dtype (names, so they serialise as they are written)."""

    device: str
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def reduced(self) -> bool:
        """Whether compute runs below float32 (bfloat16, float16)."""
        return self.dtype != "float32"

    def autocast(self):
        """Autocast to the dtype on this device (a no-op in float32): training's forward."""
        return torch.autocast(torch.device(self.device).type, dtype=self.torch_dtype, enabled=self.reduced)

    def grad_scaler(self):
        """Loss scaling for float16 training (its gradients underflow without it); disabled otherwise."""
        return torch.amp.GradScaler(torch.device(self.device).type, enabled=self.dtype == "float16")

    def non_default(self) -> dict[str, str]:
        """The settings that differ from the defaults: what a cache key adds, so that a default run's keys
        are those it had before these settings existed."""
        default = {"device": default_device(), "dtype": DEFAULT_DTYPE}
        return {k: v for k, v in (("device", self.device), ("dtype", self.dtype)) if v != default[k]}

    def as_dict(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype}


def resolve(device: str | None = None, dtype: str | torch.dtype | None = None) -> Precision:
    """The precision to run in (defaults for ``None``), checked: the device exists and computes in the dtype."""
    name = dtype_name(dtype)
    device = device or default_device()
    dev = parse_device(device)
    _check_reachable(dev, device)
    why = _unsupported(str(dev), name)
    if why is not None:
        raise EdgefuseError(f"dtype {name} cannot run on {device} with torch {torch.__version__} ({why}); "
                            f"use another --dtype (float32 runs everywhere)")
    return Precision(str(dev), name)
