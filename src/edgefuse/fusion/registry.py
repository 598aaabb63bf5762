"""Every fusion method and LoRA-CR strategy as data: the one place that names them.

A method is a `MethodSpec`: a family, the kernel that family runs, its configuration (an element-wise
`Recipe` where it has one), its parameters with defaults and bounds, how the output rank is chosen, and the
paper it comes from. Several methods share a kernel and differ only in configuration (the idea of mergekit's
generalized task arithmetic, registered under several names). Validation (`resolve_params`), the API, the
CLI's ``--list`` and the study config all read these specs, so adding a method is one entry in `METHODS`
(plus its kernel if no existing one fits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from edgefuse.errors import EdgefuseError
from edgefuse.fusion import aligned, elementwise, factored, lego, regmean
from edgefuse.fusion.elementwise import Recipe
from edgefuse.fusion.lowrank import SOLVERS


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: its default and the values it accepts (numbers within bounds, or choices)."""

    name: str
    default: Any
    help: str
    kind: type = float  # float | int | bool | str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False  # None is accepted (the feature is off)

    def allowed(self) -> str:
        """What the parameter accepts, in words: ``in (0, 1]``, ``one of total, frequency``, ``an integer ≥ 1``."""
        if self.choices is not None:
            return f"one of {', '.join(self.choices)}"
        if self.kind is bool:
            return "true or false"
        noun = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '≤'} {self.high:g}"
        return noun

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.choices is not None:
            return value in self.choices
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def check(self, value: Any) -> None:
        """Raise `EdgefuseError` with one line naming the parameter, what it accepts and what it got."""
        if not self.accepts(value):
            raise EdgefuseError(f"{self.name} must be {self.allowed()}, got {value!r}")


@dataclass(frozen=True)
class MethodSpec:
    """One fusion method."""

    name: str
    family: str  # a key of FAMILIES
    kernel: Callable  # kernel(mods, weights, ctx) -> LoraModule, one module of the K adapters
    summary: str
    paper: str
    url: str
    recipe: Recipe | None = None  # the element-wise configuration (also what ``inner`` selects)
    params: tuple[Param, ...] = ()  # hyper-parameters, ``density`` included when the method takes one
    rank: str = "max"  # a key of RANK_POLICIES
    notes: str = ""  # how the method relates to PEFT's / mergekit's of the same name
    needs_grams: bool = False  # fuses with Gram matrices of each domain's module inputs (``grams=``)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def density(self) -> float | None:
        """Default density; None when the method takes no density."""
        p = self.param("density")
        return None if p is None else p.default

    @property
    def exact_rank(self) -> bool:
        """The output rank is Σ r_k and cannot be chosen."""
        return self.rank == "concat"

    @property
    def defaults(self) -> dict[str, Any]:
        """The hyper-parameters other than density (passed as ``params``), with their defaults, in order."""
        return {p.name: p.default for p in self.params if p.name != "density"}


FAMILIES = {
    "factored": "exact on the LoRA factors (concatenation; truncation by the exact SVD of the stacked factors)",
    "element-wise": "sparsify/elect/combine each ΔW entry by entry, one module and one row block at a time, "
                    "then re-factorise exactly",
    "clustering": "cluster the rank-one units of all adapters",
    "aligned": "express the adapters in one shared basis, merge the aligned parts with an element-wise recipe",
    "data-aware": "least squares on the domains' module inputs (Gram matrices from public prompts), exact in "
                  "factored form",
}
RANK_POLICIES = {
    "exact": "Σ r_k (exact) unless --rank",
    "concat": "always Σ r_k (--rank refused)",
    "max": "largest input rank unless --rank",
}

# Parameters every method accepts: the re-factorisation solver, LoRA-CR's settings, parallel modules.
COMMON_PARAMS: tuple[Param, ...] = (
    Param("svd_solver", "gram", "dense re-factorisation solver", kind=str, choices=SOLVERS),
    Param("cr_element_threshold", 0.1, "LoRA-CR element: min(P, N) ≥ this·max(P, N) is a conflict", low=0),
    Param("cr_direction_threshold", 0.05, "LoRA-CR direction: |c_l| ≥ this·σ_l is removed", low=0),
    Param("cr_share", None, "LoRA-CR: edit this share of the modules, most conflicting first (instead of "
          "the threshold)", low=0, high=1, low_open=True, nullable=True),
    Param("workers", 1, "modules fused concurrently", kind=int, low=1),
)


CR_THRESHOLD = Param("cr_threshold", 0.1, "module conflict score above which LoRA-CR acts (element/direction/"
                     "hybrid: −cosine of two adapters' ΔW; activation: fused deviation on an edge's inputs)", low=0)


def common_default(name: str) -> Any:
    """The default of one of `COMMON_PARAMS`."""
    return next(p.default for p in COMMON_PARAMS if p.name == name)


def _density(default: float) -> Param:
    return Param("density", default, "fraction of entries kept", low=0, high=1, low_open=True)


_MAJORITY = Param("majority", "total", "TIES sign election by total mass or by count", kind=str,
                  choices=("total", "frequency"))
_RNG = Param("rng", "module", "random stream per (seed, module, adapter), or one shared stream in PEFT's "
             "order", kind=str, choices=("module", "sequential"))
_GAMMA = Param("gamma", 0.01, "share of largest-magnitude outliers dropped", low=0, high=1, high_open=True)

_TIES = "Yadav, Tam, Choshen, Raffel, Bansal, \"TIES-Merging: Resolving Interference When Merging Models\", NeurIPS 2023"
_TIES_URL = "https://arxiv.org/abs/2306.01708"
_DARE = ("Yu, Yu, Yu, Huang, Li, \"Language Models are Super Mario: Absorbing Abilities from Homologous Models "
         "as a Free Lunch\", ICML 2024")
_DARE_URL = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = ("Davari & Belilovsky, \"Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks\", "
                "ECCV 2024")
_BREADCRUMBS_URL = "https://arxiv.org/abs/2312.06795"

_FACTORED_AND_ELEMENTWISE: list[MethodSpec] = [
    MethodSpec(
        "linear", "factored", factored.weighted_sum,
        "weighted average Σ w̄ΔW (weights normalised), exact in factored form",
        "Wortsman et al., \"Model soups: averaging weights of multiple fine-tuned models improves accuracy "
        "without increasing inference time\", ICML 2022",
        "https://arxiv.org/abs/2203.05482",
        params=(Param("normalize", True, "divide the weights by their sum (false: plain weighted sum)", kind=bool),),
        rank="exact",
        notes="PEFT's `linear` averages the factors (A = Σ √c_k A_k, B = Σ √c_k B_k, equal ranks), which adds "
              "cross terms √(c_j c_k) B_j A_k and equals the weighted sum only when they vanish; it does not "
              "normalise the weights.",
    ),
    MethodSpec(
        "cat", "factored", factored.weighted_sum,
        "exact weighted sum by concatenating factors (rank Σ r_k)",
        "Prabhakar et al., \"LoRA Soups: Merging LoRAs for Practical Skill Composition Tasks\", COLING 2025 "
        "(industry track)",
        "https://arxiv.org/abs/2410.13025",
        rank="concat",
        notes="Same ΔW as PEFT's `cat` (which folds weight·scale into A).",
    ),
    MethodSpec(
        "task_arithmetic", "factored", factored.weighted_sum,
        "λ·Σ wΔW (Ilharco et al. 2023), exact",
        "Ilharco et al., \"Editing Models with Task Arithmetic\", ICLR 2023",
        "https://arxiv.org/abs/2212.04089",
        recipe=Recipe(),
        params=(Param("scaling", 1.0, "λ, multiplying the weighted sum"),),
        rank="exact",
    ),
    MethodSpec(
        "svd", "factored", factored.truncated_sum,
        "exact truncated SVD of Σ wΔW via QR of stacked factors (no m×n matrix)",
        "Eckart & Young, \"The approximation of one matrix by another of lower rank\", Psychometrika 1936",
        "https://doi.org/10.1007/BF02288367",
        notes="The merge of kohya's sd-scripts; same ΔW as PEFT's `svd` (a dense SVD of the dense sum).",
    ),
    MethodSpec(
        "ties", "element-wise", elementwise.merge_module,
        "TIES: trim by magnitude, elect sign, disjoint mean, re-factorise",
        _TIES, _TIES_URL,
        recipe=Recipe(sparsify="magnitude", consensus=True, combine="disjoint_mean"),
        params=(_density(0.2), _MAJORITY),
        notes="Trim: exactly ⌈density·n⌉ entries per adapter and module, magnitudes tied at the cut ranked by "
              "row-major position (earlier first). = PEFT's `ties_svd` for equal positive weights when density·n "
              "is an integer (PEFT keeps int(density·n) by torch.topk and elects on unweighted tensors); PEFT's "
              "plain `ties` trims the A and B factors separately, which is not TIES on ΔW.",
    ),
    MethodSpec(
        "dare_linear", "element-wise", elementwise.merge_module,
        "DARE: random drop + 1/density rescale, weighted sum",
        _DARE, _DARE_URL,
        recipe=Recipe(sparsify="random", rescale=True),
        params=(_density(0.5), _RNG),
        notes="Unbiased (the mean over seeds is Σ w_k ΔW_k); = PEFT's `dare_linear_svd` with rng='sequential'.",
    ),
    MethodSpec(
        "dare_ties", "element-wise", elementwise.merge_module,
        "DARE drop/rescale, then TIES sign election and disjoint mean",
        _DARE, _DARE_URL,
        recipe=Recipe(sparsify="random", rescale=True, consensus=True, combine="disjoint_mean"),
        params=(_density(0.5), _MAJORITY, _RNG),
        notes="= PEFT's `dare_ties_svd` with rng='sequential' and equal positive weights; PEFT's plain "
              "`dare_ties` drops entries of the A and B factors separately, not of ΔW.",
    ),
    MethodSpec(
        "magnitude_prune", "element-wise", elementwise.merge_module,
        "keep top-density magnitudes per adapter, weighted sum",
        _TIES + " (the trim step, without election)", _TIES_URL,
        recipe=Recipe(sparsify="magnitude"),
        params=(_density(0.2),),
        notes="TIES' trim (⌈density·n⌉ entries, ties by row-major position); = PEFT's `magnitude_prune_svd` when "
              "density·n is an integer.",
    ),
    MethodSpec(
        "breadcrumbs", "element-wise", elementwise.merge_module,
        "Model Breadcrumbs: drop top-gamma outliers and small tail",
        _BREADCRUMBS, _BREADCRUMBS_URL,
        recipe=Recipe(sparsify="breadcrumbs"),
        params=(_density(0.9), _GAMMA),
        notes="mergekit's parametrisation of the paper's two thresholds (the ⌊gamma·n⌋ largest dropped, then "
              "⌈density·n⌉ kept; ties by row-major position). Not in PEFT.",
    ),
    MethodSpec(
        "breadcrumbs_ties", "element-wise", elementwise.merge_module,
        "Breadcrumbs mask + TIES sign election",
        _BREADCRUMBS + " + " + _TIES, _BREADCRUMBS_URL,
        recipe=Recipe(sparsify="breadcrumbs", consensus=True, combine="disjoint_mean"),
        params=(_density(0.9), _GAMMA, _MAJORITY),
        notes="mergekit's `breadcrumbs_ties`.",
    ),
    MethodSpec(
        "lora_lego", "clustering", lego.lora_lego,
        "LoRA-LEGO: k-means of rank-one units + dual reweighting",
        "Zhao et al., \"Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through "
        "Rank-Wise Clustering\", ICLR 2025",
        "https://arxiv.org/abs/2409.16167",
        params=(
            Param("reweight", "dual", "dual reweighting of the centroids, or none", kind=str, choices=("dual", "none")),
            Param("iters", 50, "k-means iterations at most", kind=int, low=0),
        ),
        notes="Not in PEFT or mergekit.",
    ),
]

# What an aligned method's ``inner`` may name: every method with an element-wise recipe.
INNER_RECIPES: tuple[str, ...] = tuple(s.name for s in _FACTORED_AND_ELEMENTWISE if s.recipe is not None)
_ALIGNED_PARAMS = (
    _density(0.2),
    Param("inner", "ties", "the element-wise merge of the aligned parts", kind=str, choices=INNER_RECIPES),
    _MAJORITY,
    _GAMMA,
    _RNG,
)

METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in [
        *_FACTORED_AND_ELEMENTWISE,
        MethodSpec(
            "knots", "aligned", partial(aligned.merge, align=aligned.joint_svd),
            "KnOTS: joint-SVD alignment, inner merge (ties) of aligned V's",
            "Stoica, Ramesh, Ecsedi, Choshen, Hoffman, \"Model merging with SVD to tie the KnOTS\", ICLR 2025",
            "https://arxiv.org/abs/2410.19735",
            params=_ALIGNED_PARAMS,
            notes="Not in PEFT.",
        ),
        MethodSpec(
            "core_space", "aligned", partial(aligned.merge, align=aligned.core_basis),
            "Core Space: merge (ties) in the core of the stacked bases",
            "Panariello et al., \"Accurate and Efficient Low-Rank Model Merging in Core Space\", NeurIPS 2025",
            "https://arxiv.org/abs/2509.17786",
            params=_ALIGNED_PARAMS,
            notes="Not in PEFT.",
        ),
        MethodSpec(
            "regmean", "data-aware", regmean.regmean,
            "RegMean: (Σ ΔW_i G̃_i)(Σ G̃_i)⁻¹ on each domain's input Grams, exact on the factors",
            "Jin, Ren, Preotiuc-Pietro, Cheng, \"Dataless Knowledge Fusion by Merging Weights of Language "
            "Models\", ICLR 2023",
            "https://arxiv.org/abs/2212.09849",
            params=(
                Param("alpha", 0.9, "share of the Gram matrices' off-diagonal kept (G̃ = αG + (1−α)diag G)",
                      low=0, high=1),
                Param("ridge", 1e-6, "added ×mean(diag) to Σ G̃ only when it is singular", low=0, low_open=True),
            ),
            rank="exact",
            needs_grams=True,
            notes="Not in PEFT or mergekit. Needs Gram matrices (edgefuse grams; fuse --activations).",
        ),
    ]
}


@dataclass(frozen=True)
class CRStrategy:
    """One LoRA-CR strategy: which resolution steps run on a flagged module, in order."""

    name: str
    steps: tuple[str, ...]  # "direction" (factored, exact) and/or "element" (dense, re-factorised), on the adapters
    # before fusion; or "regmean" (`fusion.cr_activation`), on the fused result, with Gram matrices
    summary: str

    @property
    def needs_grams(self) -> bool:
        """Scores and resolves on each domain's module inputs (``grams=``, ``fuse --activations``)."""
        return any(s in POST_FUSION_STEPS for s in self.steps)

    def changes(self, method: str) -> bool:
        """Whether this strategy can change what ``method`` fuses. A strategy whose only step re-solves flagged
        modules by a method leaves that method's own result as it is (activation on regmean: the flagged modules
        are already RegMean's), so a study does not build and evaluate that copy."""
        return self.steps != (method,)


POST_FUSION_STEPS = ("regmean",)


# LoRA-CR is edgefuse's own method (README, "LoRA-CR"); the steps are documented in `fusion.conflict` (element,
# direction: on the adapters, before fusion) and `fusion.cr_activation` (regmean: on the fused result, with Grams).
CR_STRATEGIES: dict[str, CRStrategy] = {
    s.name: s
    for s in [
        CRStrategy("element", ("element",),
                   "per element in conflicting modules: keep the dominant sign's mass, drop the opposing minority"),
        CRStrategy("direction", ("direction",),
                   "per module: remove a weaker adapter's opposing component along the dominant one's singular "
                   "directions"),
        CRStrategy("hybrid", ("direction", "element"), "direction first, then element on what still conflicts"),
        CRStrategy("activation", ("regmean",),
                   "per module, on activations (needs Gram matrices): score = the fused update's worst deviation "
                   "from an edge on that edge's inputs, max_i ‖(ΔW_f − ΔW_i)H_i‖/‖ΔW_i H_i‖; flagged modules are "
                   "re-solved by RegMean, the rest keep the method's result"),
    ]
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise EdgefuseError(f"unknown fusion method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def get_cr_strategy(name: str) -> CRStrategy:
    if name not in CR_STRATEGIES:
        raise EdgefuseError(f"unknown LoRA-CR strategy {name!r}; valid: {', '.join(CR_STRATEGIES)}")
    return CR_STRATEGIES[name]


def resolve_params(spec: MethodSpec, density: float | None, params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Check a call's density and parameters against the spec and fill in the defaults.

    Args:
        spec: the method.
        density: the requested density, or None for the method's default.
        params: the other hyper-parameters given (the method's and `COMMON_PARAMS`).

    Returns:
        (density to use — 1.0 for a method without one —, every parameter of the method then the common ones,
        with defaults filled in).

    Raises:
        EdgefuseError: one line naming an unknown parameter, a density for a method without one, or a value
            outside what the spec allows.
    """
    declared = {p.name: p for p in (*spec.params, *COMMON_PARAMS) if p.name != "density"}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise EdgefuseError(
            f"method {spec.name} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(declared))}"
        )
    if density is not None:
        if spec.density is None:
            raise EdgefuseError(f"method {spec.name} takes no density")
        spec.param("density").check(density)
    for name, value in params.items():
        declared[name].check(value)
    resolved = {**{n: p.default for n, p in declared.items()}, **params}
    return (spec.density if density is None else float(density)) or 1.0, resolved


def recipe_for(spec: MethodSpec, params: dict[str, Any]) -> Recipe | None:
    """The element-wise recipe a call runs: the method's own, or for an aligned method the ``inner`` one."""
    if "inner" in params:
        return METHODS[params["inner"]].recipe
    return spec.recipe


def list_methods() -> dict[str, str]:
    """Method name → one-line description."""
    return {n: s.summary for n, s in METHODS.items()}


def list_cr_strategies() -> dict[str, str]:
    """LoRA-CR strategy name → one-line description."""
    return {n: s.summary for n, s in CR_STRATEGIES.items()}
