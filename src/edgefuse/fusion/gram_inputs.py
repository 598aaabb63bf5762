"""Gram matrices as an input of the fusion API, for the methods that fuse with data (``MethodSpec.needs_grams``).

Why apart: the API stays one loop over modules; this module checks once, before anything is fused, that every
domain has a matrix for every module it must weigh, and hands each kernel its module's K matrices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from edgefuse.errors import EdgefuseError


def check_coverage(method: str, needs: bool, grams: list[Mapping] | None, adapters, names: list[str],
                   what: str | None = None) -> None:
    """One `EdgefuseError` when a method that needs Gram matrices lacks them for some adapter or module (or one
    that does not need them is given some). ``what`` names who needs them in the message (default: the method;
    a LoRA-CR strategy such as ``activation`` needs them too)."""
    what = what or f"method {method}"
    if not needs:
        if grams is not None:
            raise EdgefuseError(f"method {method} takes no Gram matrices (only data-aware methods such as regmean, "
                                "or LoRA-CR activation)")
        return
    if grams is None:
        raise EdgefuseError(f"{what} needs Gram matrices of each domain's module inputs "
                            "(make them with edgefuse grams; pass --activations GRAMS_DIR)")
    if len(grams) != len(adapters):
        raise EdgefuseError(f"{what}: {len(grams)} domains of Gram matrices for {len(adapters)} adapters")
    for k, g in enumerate(grams):
        missing = [n for n in names if n not in g]
        if missing:
            where = getattr(g, "path", None)
            domain = getattr(g, "domain", None) or f"of adapter {k}"
            raise EdgefuseError(f"{what}: no Gram matrix for module {missing[0]} (domain {domain}; "
                                f"{len(missing)} of {len(names)} modules missing)", path=where)
    for name in names:  # every matrix checked (shape, finite, symmetric PSD) before any module is fused
        module_grams(grams, name, input_width(adapters, name))


def input_width(adapters, name: str) -> int:
    """d_in of module ``name``: its Gram matrices are d_in × d_in (the first adapter that has the module)."""
    return next(a.modules[name].shape[1] for a in adapters if name in a.modules)


class CheckedOnce(Mapping):
    """An in-memory mapping of Gram matrices whose every distinct tensor is fully checked once per fusion call
    (`check_gram`); later reads of the same tensor (a second pass, or q/k/v sharing one input's matrix) re-check
    only its shape. `edgefuse.interference.grams.DomainGrams` does the same for matrices read from disk."""

    def __init__(self, grams: Mapping, label: str):
        self._grams, self._label = grams, label
        self._checked: dict[int, torch.Tensor] = {}  # id → the tensor itself, so that its id cannot be reused

    def get_checked(self, name: str, d_in: int | None) -> torch.Tensor:
        from edgefuse.interference.grams import check_gram  # local: tests/test_interference.py patches grams.check_gram

        G = self._grams[name]
        if self._checked.get(id(G)) is not G:
            out = check_gram(G, d_in, f"module {name}", self._label)
            self._checked[id(G)] = G
            return out
        if d_in is not None and G.shape != (d_in, d_in):
            check_gram(G, d_in, f"module {name}", self._label)
        return G.double()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get_checked(name, None)

    def __iter__(self):
        return iter(self._grams)

    def __len__(self) -> int:
        return len(self._grams)

    def __contains__(self, name: object) -> bool:
        return name in self._grams


def checked_once(grams: list[Mapping] | None) -> list[Mapping] | None:
    """``grams`` with each in-memory mapping wrapped in `CheckedOnce` (mappings that check themselves, such as
    `DomainGrams`, as they are)."""
    if grams is None:
        return None
    return [g if hasattr(g, "get_checked") else CheckedOnce(g, f"Gram matrices of adapter {k}")
            for k, g in enumerate(grams)]


def module_grams(grams: list[Mapping], name: str, d_in: int) -> list[torch.Tensor]:
    """Each domain's checked Gram matrix of module ``name`` (d_in × d_in, float64)."""
    from edgefuse.interference.grams import check_gram  # local: tests/test_interference.py patches grams.check_gram

    out = []
    for k, g in enumerate(grams):
        get = getattr(g, "get_checked", None)
        out.append(get(name, d_in) if get is not None
                   else check_gram(g[name], d_in, f"module {name}", f"Gram matrices of adapter {k}"))
    return out
