"""Applying PEFT adapters to a loaded model, with edgefuse's safety checks."""

from __future__ import annotations

from pathlib import Path

from edgefuse.adapters import CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE
from edgefuse.errors import EdgefuseError
from edgefuse.io import read_json, refuse_pickles


def check_adapter_dir(adapter: str | Path) -> Path:
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise EdgefuseError("adapter directory not found", path=adapter)
    refuse_pickles(adapter)
    if not (adapter / CONFIG_FILE).is_file() or not (adapter / WEIGHTS_FILE).is_file():
        raise EdgefuseError(f"no adapter files ({CONFIG_FILE} and {WEIGHTS_FILE} are required)", path=adapter)
    return adapter


def check_fingerprint(adapter: Path, model, force: bool = False) -> None:
    """Refuse an adapter whose manifest names another base model."""
    from edgefuse.models import fingerprint

    man_path = adapter / MANIFEST_FILE
    if force or not man_path.is_file():
        return
    want = read_json(man_path).get("base_fingerprint")
    if want and want != fingerprint(model):
        raise EdgefuseError(f"adapter was made for base model {want}, not {fingerprint(model)}", path=man_path)


def apply_adapter(model, adapter: str | Path, force: bool = False):
    """PeftModel with the adapter loaded (inference mode)."""
    from peft import PeftModel

    adapter = check_adapter_dir(adapter)
    check_fingerprint(adapter, model, force)
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as e:
        raise EdgefuseError(f"cannot apply adapter ({str(e).splitlines()[0]})", path=adapter) from None
