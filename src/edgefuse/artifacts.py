"""Every JSON file edgefuse writes and later reads back, as one typed, versioned pydantic model each.

Why: readers that each parsed a file their own way drifted from the writers (a reader asked for a manifest key
``training`` that nothing wrote; the report tried four names for one number). Here each artifact has one model
with a ``kind`` and a ``format_version``; the writer builds it (or validates its dict through it) and the reader
parses the file with it, so a missing field, a wrong type, another kind or a version this edgefuse does not know
is one line naming the file. The catalogue, with the meaning of every field, is ``docs/artifacts.md``.

Nested statistics (training curves, evaluation results, conflict scores) stay plain JSON objects inside the
typed envelope: they are produced and consumed by one module each, and typing them would only repeat those
modules. Files written before versioning (no ``format_version``; fused adapters then said ``format``/``version``)
are read as version 1 by `upgrade_legacy`, the one place that knows the old spellings.

Light on purpose (pydantic only): the command line, the federated verifier and the report import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgefuse.errors import EdgefuseError
from edgefuse.io import atomic_write_json, read_json

FORMAT_VERSION = 1

PLAN_KIND = "edgefuse-prune-plan"
PRUNED_MODEL_KIND = "edgefuse-pruned-model"
PACKAGE_KIND = "edgefuse-edge-package"
RECOVERED_KIND = "edgefuse-recovered-adapter"
FUSED_KIND = "edgefuse-fused-adapter"
ROUND_START_KIND = "edgefuse-round-start"
EXTERNAL_KIND = "edgefuse-external-adapter"
RESULTS_KIND = "edgefuse-study-results"
GRAMS_KIND = "edgefuse-activation-grams"


def problem(e: ValidationError, tag: str | None = None) -> str:
    """A pydantic error as one short phrase: the first failing field and why (the rest would be noise).
    ``tag``: the discriminator value a union put in front of the field's path."""
    err = e.errors()[0]
    path = err["loc"][1:] if tag is not None and err["loc"][:1] == (tag,) else err["loc"]
    loc = ".".join(str(p) for p in path)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"lacks the field {loc}"
    if err["type"] == "extra_forbidden":
        return f"has an unknown field {loc}"
    if err["type"] == "literal_error" and path[-1:] == ("format_version",):
        return f"format_version {err['input']!r} is not supported (this edgefuse reads {FORMAT_VERSION})"
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        kind = err["input"].get("kind") if isinstance(err.get("input"), dict) else None
        return f"kind {kind!r} is not an edgefuse adapter manifest"
    return f"{loc}: {msg}" if loc else msg


class Artifact(BaseModel):
    """The envelope every artifact shares: what it is and which layout it follows."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, ser_json_inf_nan="constants")
    WHAT: ClassVar[str] = "file"

    format_version: Literal[1] = FORMAT_VERSION

    @classmethod
    def parse(cls, raw: Any, path: object) -> "Artifact":
        """``raw`` (parsed JSON) as this artifact, or one `EdgefuseError` naming ``path`` and the first problem."""
        return _validated(cls.WHAT, raw, path, cls.model_validate)

    @classmethod
    def read(cls, path: str | Path) -> "Artifact":
        return cls.parse(read_json(path), path)

    def dump(self) -> dict[str, Any]:
        """The JSON object written to disk (field aliases such as ``from`` restored)."""
        return self.model_dump(mode="json", by_alias=True)

    def write(self, path: str | Path, indent: int | None = 2) -> None:
        atomic_write_json(path, self.dump(), indent=indent)


def _validated(what: str, raw: Any, path: object, validate: Callable[[dict], Any], by_kind: bool = False) -> Any:
    """``validate(raw)`` after `upgrade_legacy`, every failure one line naming ``path``. ``by_kind``: a union that
    picks its model by ``kind`` (which must then be present, and is left out of the failing field's path)."""
    if not isinstance(raw, dict):
        raise EdgefuseError(f"{what} is not a JSON object", path=path)
    raw = upgrade_legacy(raw)
    if by_kind and "kind" not in raw:
        raise EdgefuseError(f"{what} lacks the field kind", path=path)
    try:
        return validate(raw)
    except ValidationError as e:
        raise EdgefuseError(f"{what} {problem(e, raw['kind'] if by_kind else None)}", path=path) from None


def upgrade_legacy(raw: dict[str, Any]) -> dict[str, Any]:
    """The layout of files written before artifacts were versioned, as version 1.

    Fused adapters said ``format``/``version`` where everything else says ``kind``/``format_version``; and
    round-start adapters, pruned-model notes and results documents carried no version at all."""
    out = dict(raw)
    if "kind" not in out and out.get("format") == FUSED_KIND:
        out["kind"] = out.pop("format")
        out["format_version"] = out.pop("version", FORMAT_VERSION)
    out.setdefault("format_version", FORMAT_VERSION)
    return out


# --- the pruning plan and the pruned model beside it -------------------------------------------------------


class LayerPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: list[int]
    kv_heads: list[int]
    mlp_channels: list[int]


class ModulePlan(BaseModel):
    """Where a full-model module's kept rows and columns went: ``[start, stop)`` runs of kept indices, or null
    where all are kept."""

    model_config = ConfigDict(extra="forbid")
    pruned_name: str
    rows: Optional[list[list[int]]]
    cols: Optional[list[list[int]]]


class PrunePlan(Artifact):
    """``plan.json``: what the cloud kept of the base model for one edge; recovery maps adapters back through it.

    The plan is hashed as written (packages record that hash), so code passes the validated *dict* around and
    this model only checks it: `edgefuse.edge.plan.validate_plan` adds the checks between fields."""

    WHAT: ClassVar[str] = "pruning plan"
    kind: Literal["edgefuse-prune-plan"] = PLAN_KIND
    base_model: Optional[str]
    base_fingerprint: str
    base_config: dict[str, Any] = Field(description="the shapes recovery needs (layers, heads, widths, family)")
    method: str
    structure: str
    ratio: float
    seed: int = 0
    rounding: Optional[str] = None
    calibration: Optional[dict[str, Any]] = None
    kept_layers: list[int]
    layers: dict[str, LayerPlan]
    modules: dict[str, ModulePlan]
    sparsity: Optional[dict[str, float]] = None
    note: Optional[str] = None
    estimate: Optional[dict[str, Any]] = None


class PrunedModelMeta(Artifact):
    """``edgefuse_model.json`` beside a pruned model: its name and the hashes that tie it to its plan."""

    WHAT: ClassVar[str] = "pruned-model note"
    kind: Literal["edgefuse-pruned-model"] = PRUNED_MODEL_KIND
    name: str
    plan_hash: str
    base_fingerprint: str
    pruned_fingerprint: str


# --- adapter manifests (edgefuse.json beside adapter_model.safetensors) ------------------------------------


class Manifest(Artifact):
    WHAT: ClassVar[str] = "manifest"
    files: dict[str, str] = Field({}, description="sha256 of every other file of the adapter directory")
    embedding: Optional[dict[str, Any]] = Field(
        None, description="retrieval vector (edgefuse.compose.embedding); checked when retrieval uses it, so an "
                          "adapter with a damaged vector still fuses")


class EdgePackageManifest(Manifest):
    """What an edge uploads with its adapter: which model and plan it trained on, and how."""

    kind: Literal["edgefuse-edge-package"] = PACKAGE_KIND
    base_model: Optional[str]
    base_fingerprint: str
    pruned_model: Optional[str]
    pruned_fingerprint: str
    domain: str
    n_items: int
    plan_hash: str
    plan: dict[str, Any] = Field(description="method, structure and ratio of the plan")
    train: dict[str, Any] = Field(description="the TrainConfig the edge used")
    loss: str
    init: Optional[dict[str, Any]] = None
    stats: dict[str, Any] = Field(description="training statistics: loss curve, tokens, wall time, memory")


class RecoveredAdapterManifest(EdgePackageManifest):
    """An edge package mapped back to the full model's shapes: the package's fields plus how it was recovered."""

    kind: Literal["edgefuse-recovered-adapter"] = RECOVERED_KIND  # type: ignore[assignment]
    recovery: dict[str, Any]


class FusedAdapterManifest(Manifest):
    """A fused adapter (a fusion method ± LoRA-CR, or LoraHub's learned weights) and what went into it."""

    kind: Literal["edgefuse-fused-adapter"] = FUSED_KIND
    base_fingerprint: Optional[str]
    base_model: Optional[str]
    method: Optional[str]
    composition: Optional[Literal["lorahub"]] = None
    parameters: Optional[dict[str, Any]] = None
    cr: Optional[dict[str, Any]] = None
    inputs: list[dict[str, Any]] = []
    conflicts: Optional[dict[str, Any]] = None
    cr_stats: Optional[dict[str, Any]] = None
    lorahub: Optional[dict[str, Any]] = None
    output_rank: int
    wall_s: Optional[float] = None


class RoundStartManifest(Manifest):
    """A fused adapter projected to an edge's pruned shapes, sent back to start the edge's next round."""

    kind: Literal["edgefuse-round-start"] = ROUND_START_KIND
    source: str = Field(alias="from", description="the fused stage it was projected from")
    fused_sha256: str
    plan_hash: str


class ExternalAdapterManifest(Manifest):
    """What edgefuse notes beside an adapter it did not make (a retrieval vector, a domain)."""

    kind: Literal["edgefuse-external-adapter"] = EXTERNAL_KIND
    domain: Optional[str] = None
    base_fingerprint: Optional[str] = Field(None, description="the base model's fingerprint, where whoever "
                                                              "noted the adapter knew it (then checked like ours)")


AdapterManifest = Annotated[
    Union[EdgePackageManifest, RecoveredAdapterManifest, FusedAdapterManifest, RoundStartManifest,
          ExternalAdapterManifest],
    Field(discriminator="kind"),
]
_MANIFEST = TypeAdapter(AdapterManifest)


def parse_manifest(raw: Any, path: object) -> Manifest:
    """An ``edgefuse.json`` of any kind, checked against that kind's model."""
    return _validated("manifest", raw, path, _MANIFEST.validate_python, by_kind=True)


def read_manifest(path: str | Path) -> Manifest:
    return parse_manifest(read_json(path), path)


# --- the study's results ------------------------------------------------------------------------------------


class DomainInterference(BaseModel):
    """One edge's domain under one fused model (`edgefuse.interference.metrics.interference` on the study's Grams):
    the fused deviation ‖(ΔW_f − ΔW_i)H_i‖/‖ΔW_i H_i‖ and the worst interference ratio max_j≠i ‖ΔW_j H_i‖/‖ΔW_i H_i‖,
    pooled over modules, as the median over modules and at the worst module."""

    model_config = ConfigDict(extra="forbid")
    domain: str = Field(description="the edge (its adapter's domain; its Grams are its domains' public prompts)")
    deviation: Optional[float] = Field(description="fused deviation, squared norms pooled over modules")
    deviation_median: Optional[float] = Field(description="median over modules of the module's fused deviation")
    deviation_max: Optional[float]
    deviation_max_module: Optional[str]
    ratio: Optional[float] = Field(description="worst other adapter's ratio, squared norms pooled over modules")
    ratio_adapter: Optional[str] = Field(description="the edge whose adapter gives ``ratio``")
    ratio_median: Optional[float] = Field(description="median over modules of the module's worst ratio")
    ratio_max: Optional[float] = Field(description="the worst ratio of any module")
    ratio_max_module: Optional[str]


class FusedInterference(BaseModel):
    """Interference of one fused model of the study (stage ``interference-<name>-<tag>``, kind fuse)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    seed: int
    round: int = 1
    edges: list[str] = Field(description="the fused edges, in order: rows and columns of ``ratio``")
    modules: int
    ratio: list[list[Optional[float]]] = Field(description="pooled ‖ΔW_j H_i‖/‖ΔW_i H_i‖, row domain i, column adapter j")
    domains: list[DomainInterference]
    file: str = Field(description="the full statistics (every module) in the stage directory")


class StudyInterference(BaseModel):
    """The study's Gram matrices (stage ``grams``) and the interference of each fused model measured on them."""

    model_config = ConfigDict(extra="forbid")
    grams: dict[str, Any] = Field(description="tokens and prompts per edge, per_prompt, the manifest's sha256")
    models: list[FusedInterference] = []


class StudyResults(Artifact):
    """``results.json``: everything the report shows, so that `edgefuse report` re-renders it alone.

    ``config`` is the study config as run (its own model, `edgefuse.config.StudyConfig`, is the config
    snapshot ``config.json``); ``base`` and each seed's evaluations are the evaluation documents of
    `edgefuse.evaluate`."""

    WHAT: ClassVar[str] = "results document"
    kind: Literal["edgefuse-study-results"] = RESULTS_KIND
    name: str
    model: str
    base_fingerprint: str
    config: dict[str, Any]
    precision: Optional[dict[str, Any]] = None
    base: dict[str, Any]
    seeds: list[dict[str, Any]]
    missing_edges: list[dict[str, Any]] = []
    stages: list[dict[str, Any]]
    wall_s: float
    mmlu_n: int
    cd_n: dict[str, int]
    task_columns: Optional[dict[str, str]] = Field(None, description="the configured tasks' results keys and report "
                                                                     "column titles (edgefuse.tasks); absent without")
    estimate: Optional[dict[str, Any]] = None
    interference: Optional[StudyInterference] = Field(None, description="present when the study collected Grams")


# --- activation Gram matrices (edgefuse grams) ---------------------------------------------------------------


class GramDomain(BaseModel):
    """One domain's Gram matrices: the safetensors file (one d_in × d_in tensor per distinct module input) and
    how much public text went into it."""

    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str
    tokens: int = Field(ge=1, description="tokens whose module inputs were summed into every Gram matrix")
    prompts: int = Field(ge=1)


class GramsManifest(Artifact):
    """``grams.json``: Gram matrices G = HᵀH of every adapted module's inputs, per domain, from the base model on
    public prompts (`edgefuse.interference`). Modules fed the same tensor (q/k/v, gate/up) share one entry."""

    WHAT: ClassVar[str] = "Gram-matrix manifest"
    kind: Literal["edgefuse-activation-grams"] = GRAMS_KIND
    base_model: Optional[str]
    base_fingerprint: str
    split: str
    split_seed: int
    per_prompt: Optional[int] = Field(None, description="tokens of each prompt at most (None: whole prompts)")
    dtype: Literal["float32", "float64"]
    modules: dict[str, str] = Field(description="module name → its tensor's key in every domain's file")
    domains: dict[str, GramDomain]
