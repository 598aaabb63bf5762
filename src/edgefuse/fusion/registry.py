"""Method and LoRA-CR strategy names → implementations, defaults and one-line descriptions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from edgefuse.errors import EdgefuseError
from edgefuse.fusion import core_space, knots, lego, methods


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    summary: str
    density: float | None = None  # default density; None = the method takes no density
    params: dict[str, Any] = field(default_factory=dict)  # other hyper-parameters and defaults
    exact_rank: bool = False  # output rank is Σ r_k (cat), a rank cannot be chosen
    default_rank: str = "max"  # "max": largest input rank | "exact": keep Σ r_k unless --rank


_INNER = {"inner": "ties", "majority": "total", "gamma": 0.01, "rng": "module"}
METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in [
        MethodSpec(
            "linear",
            methods.linear,
            "weighted average Σ w̄ΔW (weights normalised), exact in factored form",
            params={"normalize": True},
            default_rank="exact",
        ),
        MethodSpec(
            "cat",
            methods.cat,
            "exact weighted sum by concatenating factors (rank Σ r_k)",
            exact_rank=True,
            default_rank="exact",
        ),
        MethodSpec(
            "task_arithmetic",
            methods.task_arithmetic,
            "λ·Σ wΔW (Ilharco et al. 2023), exact",
            params={"scaling": 1.0},
            default_rank="exact",
        ),
        MethodSpec(
            "svd", methods.svd, "exact truncated SVD of Σ wΔW via QR of stacked factors (no m×n matrix)"
        ),
        MethodSpec(
            "ties",
            methods.ties,
            "TIES: trim by magnitude, elect sign, disjoint mean, re-factorise",
            density=0.2,
            params={"majority": "total"},
        ),
        MethodSpec(
            "dare_linear",
            methods.dare_linear,
            "DARE: random drop + 1/density rescale, weighted sum",
            density=0.5,
            params={"rng": "module"},
        ),
        MethodSpec(
            "dare_ties",
            methods.dare_ties,
            "DARE drop/rescale, then TIES sign election and disjoint mean",
            density=0.5,
            params={"majority": "total", "rng": "module"},
        ),
        MethodSpec(
            "magnitude_prune",
            methods.magnitude_prune,
            "keep top-density magnitudes per adapter, weighted sum",
            density=0.2,
        ),
        MethodSpec(
            "breadcrumbs",
            methods.breadcrumbs,
            "Model Breadcrumbs: drop top-gamma outliers and small tail",
            density=0.9,
            params={"gamma": 0.01},
        ),
        MethodSpec(
            "breadcrumbs_ties",
            methods.breadcrumbs_ties,
            "Breadcrumbs mask + TIES sign election",
            density=0.9,
            params={"gamma": 0.01, "majority": "total"},
        ),
        MethodSpec(
            "lora_lego",
            lego.lora_lego,
            "LoRA-LEGO: k-means of rank-one units + dual reweighting",
            params={"reweight": "dual", "iters": 50},
        ),
        MethodSpec(
            "knots",
            knots.knots,
            "KnOTS: joint-SVD alignment, inner merge (ties) of aligned V's",
            density=0.2,
            params=dict(_INNER),
        ),
        MethodSpec(
            "core_space",
            core_space.core_space,
            "Core Space: merge (ties) in the core of the stacked bases",
            density=0.2,
            params=dict(_INNER),
        ),
    ]
}

CR_STRATEGIES: dict[str, str] = {
    "element": "per element in conflicting modules: keep the dominant sign's mass, drop the opposing minority",
    "direction": "per module: remove a weaker adapter's opposing component along the dominant one's singular directions",
    "hybrid": "direction first, then element on what still conflicts",
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise EdgefuseError(f"unknown fusion method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def list_methods() -> dict[str, str]:
    """Method name → one-line description."""
    return {n: s.summary for n, s in METHODS.items()}


def list_cr_strategies() -> dict[str, str]:
    """LoRA-CR strategy name → one-line description."""
    return dict(CR_STRATEGIES)
