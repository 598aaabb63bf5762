"""One fusion as a frozen value (issue 23, item 5): the method, the adapters' weights, rank, density, seed, the
method's parameters, and LoRA-CR's strategy and threshold.

Why: `fuse_dirs` took fifteen keyword arguments that the CLI and a study's fuse stages each assembled on their own,
and a study's config checked its fusion parameters with its own copy of the rules. A request is built once (from
the CLI's options, or by `edgefuse.config.FusionConfig.request` from a study's config), checked against the
registry by `check` (a study's config does so when it loads, so a misspelt or out-of-range parameter fails before
any edge trains), and handed whole to `edgefuse.fusion.fuse_dirs` / `fuse_adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from edgefuse.errors import EdgefuseError
from edgefuse.fusion.registry import CR_THRESHOLD, MethodSpec, get_cr_strategy, get_method, resolve_params


@dataclass(frozen=True)
class FusionRequest:
    """What to fuse with; the adapters and where the result goes are the call's. ``weights`` None: 1 per adapter;
    ``rank``/``density`` None: the method's choice; ``cr`` None: no conflict resolution; ``params``: the method's
    hyper-parameters and the common ones (`edgefuse.fusion.registry.COMMON_PARAMS`)."""

    method: str
    weights: tuple[float, ...] | None = None
    rank: int | None = None
    density: float | None = None
    seed: int = 0
    cr: str | None = None
    cr_threshold: float = CR_THRESHOLD.default
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # frozen all the way down: a tuple of floats, a read-only mapping
        if self.weights is not None:
            try:
                weights = tuple(float(w) for w in self.weights)
            except (TypeError, ValueError):
                raise EdgefuseError(f"weights must be numbers, got {list(self.weights)}") from None
            object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def check(self) -> tuple[MethodSpec, float, dict[str, Any]]:
        """The request against the registry: (the method's spec, the density to use, every parameter with its
        default filled in). Raises `EdgefuseError` (one line) on an unknown method, parameter or strategy, a value
        out of range, or a rank the method cannot take."""
        spec = get_method(self.method)
        density, resolved = resolve_params(spec, self.density, dict(self.params))
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise EdgefuseError(f"rank must be a positive integer, got {self.rank}")
        if self.rank is not None and spec.exact_rank:
            raise EdgefuseError(
                f"{self.method} keeps the exact concatenated rank; use svd or task_arithmetic to choose a rank"
            )
        if self.cr is not None:
            get_cr_strategy(self.cr)
            CR_THRESHOLD.check(self.cr_threshold)
        return spec, density, resolved


def as_request(method: str | FusionRequest, weights=None, rank: int | None = None, density: float | None = None,
               seed: int = 0, cr: str | None = None, cr_threshold: float = CR_THRESHOLD.default,
               params: Mapping[str, Any] | None = None) -> FusionRequest:
    """A request as given, or built from the keyword form (``fuse_adapters(ads, "ties", density=0.5)``); settings
    beside a request would be a second source, so they are refused."""
    if not isinstance(method, FusionRequest):
        return FusionRequest(method, weights, rank, density, seed, cr, cr_threshold, params or {})
    beside = (weights, rank, density, seed, cr, cr_threshold, dict(params or {}))
    if beside != (None, None, None, 0, None, CR_THRESHOLD.default, {}):
        raise EdgefuseError("pass the fusion's settings inside its FusionRequest, not beside it")
    return method
