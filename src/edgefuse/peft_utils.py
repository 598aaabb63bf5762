"""Applying PEFT adapters to a loaded model, after edgefuse's reader has checked them.

Why: PEFT itself loads NaN tensors, a LoRA labelled IA3 and ranks that contradict the config, and a truncated
file becomes a long traceback; `edgefuse.adapters.load_adapter` refuses all of these with one line.
"""

from __future__ import annotations

from pathlib import Path

from edgefuse.adapters import load_adapter
from edgefuse.errors import EdgefuseError


def apply_adapter(model, adapter: str | Path, force: bool = False):
    """PeftModel with the adapter loaded (inference mode), once the reader accepted it for this ``model``.

    ``force`` applies an adapter whose manifest names another base model; every other check still holds.
    """
    from peft import PeftModel

    load_adapter(adapter, model, force=force)
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as e:
        raise EdgefuseError(f"cannot apply adapter ({str(e).splitlines()[0]})", path=adapter) from None
