"""The study configuration (``edgefuse run CONFIG.yaml``), validated by pydantic before any work starts.

Every section forbids unknown keys, so a typo fails at once with the key's path instead of being
silently ignored after an hour of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_serializer, field_validator,
                      model_serializer, model_validator)

from edgefuse.compose.schema import LORAHUB_NAME, ComposeConfig
from edgefuse.data.choices import load_choice_file
from edgefuse.data.mmlu import SplitSpec
from edgefuse.data.taxonomy import domain_subjects, is_domain
from edgefuse.edge.schema import PruningConfig, TrainConfig
from edgefuse.errors import EdgefuseError
from edgefuse.fusion.registry import CR_STRATEGIES, METHODS, get_method, list_cr_strategies, list_methods
from edgefuse.fusion.request import FusionRequest
from edgefuse.interference.spec import GramSpec
from edgefuse.precision import dtype_name, parse_device, resolve
from edgefuse.tasks.base import TaskSettings
from edgefuse.tasks.mmlu import MMLUBench
from edgefuse.tasks.mmlu_cd import MMLUCDBench
from edgefuse.tasks.registry import task_settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _without_empty(dumped: dict, key: str) -> dict:
    """A dump without ``key`` when it is empty: a field added after studies already ran leaves their dumps (part
    of stage keys, and their config.json) as they were while it is unused."""
    if not dumped.get(key):
        dumped.pop(key, None)
    return dumped


class ChoiceFile(_Strict):
    """A multiple-choice file whose domains the study's edges can train on (`edgefuse.data.choices`)."""

    path: str = Field(description="a JSONL file (one question per line) or a BIG-bench task.json")
    fields: str = Field("", description="the JSONL field mapping, e.g. 'question=q,choices=a|b|c,answer=label,"
                                        "domain=topic' (edgefuse.data.choices.FieldMap; empty: the defaults)")
    domain: Optional[str] = Field(None, description="the file's one domain, when its rows name none")


class DataConfig(_Strict):
    source: str = "embedded"
    split_seed: int = 0
    public_per_subject: int = Field(5, ge=1)
    edge_fraction: float = Field(0.4, gt=0, lt=1)
    choices: dict[str, ChoiceFile] = Field({}, description="multiple-choice files by name: their domains are split "
                                                           "as MMLU's subjects are, and edges may name them")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_empty(handler(self), "choices")

    @property
    def mmlu_source(self) -> str | None:
        """The MMLU file `edgefuse.data.mmlu.load_mmlu` reads (None: the embedded one)."""
        return None if self.source == "embedded" else self.source

    def split_spec(self) -> SplitSpec:
        """How every domain is split into public, edge and test questions under these settings."""
        return SplitSpec(seed=self.split_seed, public_per_subject=self.public_per_subject,
                         edge_fraction=self.edge_fraction)


class TrainingConfig(TrainConfig):
    """Edge LoRA training: every setting of `edgefuse.edge.schema.TrainConfig` (one definition, one set of
    defaults); the seed is not set here but by the study's ``seeds``."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("seed")
    @classmethod
    def _seed_from_seeds(cls, v: int) -> int:
        if v != 0:
            raise ValueError("set the seed with the top-level `seeds: [...]`, not training.seed")
        return v


OFF = "off"  # the LoRA-CR setting (and strategy) that fuses without conflict resolution


def fused_model_name(method: str, cr: str) -> str:
    """A fused model's name in stages and the report: the method, then ``+`` and the LoRA-CR setting unless off."""
    return method if cr == OFF else f"{method}+{cr}"


class CRSetting(_Strict):
    """One LoRA-CR setting of the study, named so that several settings of one strategy can sit side by side
    (``fusion.cr: [off, element, {name: top10, strategy: element, share: 0.1}]``; a plain name is the
    strategy with its defaults)."""

    name: str
    strategy: str
    threshold: float = Field(0.1, ge=0)
    share: Optional[float] = Field(None, gt=0, le=1, description="edit the ⌈share·M⌉ most conflicting modules "
                                                                  "instead of those above `threshold`")
    element_threshold: Optional[float] = Field(None, ge=0)
    direction_threshold: Optional[float] = Field(None, ge=0)
    methods: Optional[list[str]] = Field(None, description="build this setting only with these fusion methods "
                                                          "(default: with every method of fusion.methods)")

    @property
    def is_plain(self) -> bool:
        """A strategy with its defaults, written as its name alone."""
        return self == CRSetting(name=self.name, strategy=self.name)

    @property
    def needs_grams(self) -> bool:
        """Its strategy scores or resolves on Gram matrices of each domain's module inputs (activation)."""
        return not self.is_off and CR_STRATEGIES[self.strategy].needs_grams

    @property
    def is_off(self) -> bool:
        """Fuses without conflict resolution."""
        return self.strategy == OFF

    def fuse_params(self) -> dict:
        """The `fuse_adapters` parameters this setting fixes (``cr_share``, ``cr_element_threshold``, …)."""
        return {f"cr_{k}": v for k, v in (("share", self.share), ("element_threshold", self.element_threshold),
                                          ("direction_threshold", self.direction_threshold)) if v is not None}


class FusionConfig(_Strict):
    methods: list[str] = ["task_arithmetic", "ties"]
    cr: list[CRSetting] = Field([OFF, "element"], validate_default=True)  # validated: plain names become settings
    rank: Optional[int] = Field(None, ge=1)
    density: Optional[float] = Field(None, gt=0, le=1)
    weights: Optional[list[float]] = None
    params: dict[str, dict] = {}

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        known = list(list_methods())
        bad = [m for m in v if m not in known]
        if bad:
            raise ValueError(f"unknown fusion method {bad[0]!r}; valid: {', '.join(known)}")
        return v

    @property
    def needs_grams(self) -> bool:
        """Some method or LoRA-CR setting fuses with Gram matrices of each edge's module inputs (RegMean,
        LoRA-CR activation)."""
        return any(METHODS[m].needs_grams for m in self.methods) or any(s.needs_grams for s in self.cr)

    def fusions(self) -> list[tuple[str, "CRSetting", str]]:
        """(method, LoRA-CR setting, model name) of every fused model a study builds: each method with each
        setting, except a setting that cannot change the method's result (`CRStrategy.changes`: activation on
        regmean), which would be a second copy of the same model."""
        return [(m, s, fused_model_name(m, s.name)) for m in self.methods for s in self.cr
                if s.is_off or (CR_STRATEGIES[s.strategy].changes(m) and (s.methods is None or m in s.methods))]

    @field_validator("cr", mode="before")
    @classmethod
    def _known_cr(cls, v):
        known = [OFF, *list_cr_strategies()]
        out = []
        for s in v if isinstance(v, list) else [v]:
            s = {"name": s, "strategy": s} if isinstance(s, str) else s
            if isinstance(s, CRSetting):
                s = s.model_dump()
            if isinstance(s, dict) and s.get("strategy") not in known:
                raise ValueError(f"unknown LoRA-CR strategy {s.get('strategy')!r}; valid: {', '.join(known)}")
            out.append(s)
        names = [s.get("name") for s in out if isinstance(s, dict)]
        if len(set(names)) != len(names):
            raise ValueError(f"LoRA-CR setting names must be distinct (got {names})")
        return out

    @model_validator(mode="after")
    def _cr_methods_are_fused(self) -> "FusionConfig":
        for s in self.cr:
            bad = [m for m in s.methods or [] if m not in self.methods]
            if bad:
                raise ValueError(f"cr {s.name!r}: methods {bad} are not among fusion.methods {self.methods}")
        return self

    @model_validator(mode="after")
    def _params_fit_their_methods(self) -> "FusionConfig":
        """Every fused model's `FusionRequest`, checked against the registry as its fuse stage will pass it
        (`request`), so a misspelt or out-of-range parameter fails when the config loads, not after the edges
        trained."""
        stray = [m for m in self.params if m not in self.methods]
        if stray:
            raise ValueError(f"params names method {stray[0]!r}, which is not among fusion.methods {self.methods}")
        for method, setting, name in self.fusions():
            try:
                self.request(method, setting).check()
            except EdgefuseError as e:
                raise ValueError(f"{name}: {e}") from None
        return self

    def request(self, method: str, setting: CRSetting, seed: int = 0,
                weights: list[float] | None = None) -> FusionRequest:
        """The `edgefuse.fusion.FusionRequest` of one fused model: the shared rank (unless the method keeps the exact
        concatenated rank) and density where the method takes one, the method's ``params`` and, unless off, the
        LoRA-CR setting's own (`CRSetting.fuse_params`); ``weights``: the delivered edges' (default: equal)."""
        spec = get_method(method)
        return FusionRequest(
            method, weights, rank=None if spec.exact_rank else self.rank,
            density=self.density if spec.density is not None else None, seed=seed,
            cr=None if setting.is_off else setting.strategy, cr_threshold=setting.threshold,
            params={**self.params.get(method, {}), **({} if setting.is_off else setting.fuse_params())})

    @field_serializer("cr")
    def _plain_names(self, v: list[CRSetting]) -> list:
        """A setting that is just a strategy with its defaults is written back as its name (the YAML form)."""
        return [c.name if c.is_plain else c.model_dump() for c in v]


class InterferenceConfig(_Strict):
    """Gram matrices of every adapted module's inputs, collected with the base model on each edge's public-split
    prompts (stage ``grams``; never edge data unless ``source: edges``, where each edge sends its own), and the
    interference of every fused model measured on them (docs/interference.md). A fusion method that needs them
    (regmean) collects them whatever ``enabled`` says."""

    enabled: bool = Field(False, description="collect the Gram matrices and measure interference even when no "
                                             "fusion method needs them (the report's interference table)")
    tokens: int = Field(GramSpec.tokens, ge=1, description="tokens of public prompts per edge")
    per_prompt: int = Field(GramSpec.per_prompt, ge=1, description="tokens of each prompt at most")
    source: Literal["public", "edges"] = Field(
        "public", description="public: the cloud's base model on each edge's public-split prompts, before training; "
                              "edges: each edge runs the base model on its own training prompts and sends the Gram "
                              "matrices with its first-round package, checked by the cloud (they reveal the second "
                              "moments of private inputs; docs/interference.md)")

    @property
    def from_edges(self) -> bool:
        return self.source == "edges"

    def spec(self, split_seed: int) -> GramSpec:
        return GramSpec(tokens=self.tokens, per_prompt=self.per_prompt, split_seed=split_seed)


class RoundsConfig(_Strict):
    """Several rounds: the fused adapter of one round is every edge's start in the next.

    ``method``/``cr`` name the fused model sent back (default: the first of ``fusion.methods`` /
    ``fusion.cr``); every configured fusion is still built and evaluated in every round, which is the
    accuracy-per-round table of the report.
    """

    count: int = Field(1, ge=1, le=100)
    method: Optional[str] = None
    cr: Optional[str] = None


class BenchmarksConfig(_Strict):
    format: Literal["letters", "cloze"] = Field(
        "letters", description="letters: the answer letter after lettered choices; cloze: each answer text as the "
                               "continuation (small models are above chance only in cloze)")
    metric: Optional[Literal["acc", "acc_norm"]] = Field(
        None, description="headline metric: acc (summed log-likelihood) or acc_norm (per character, cloze only); "
                          "default acc_norm for cloze, acc for letters")
    mmlu: MMLUBench = MMLUBench()
    mmlu_cd: MMLUCDBench = MMLUCDBench()
    batch_size: int = Field(8, ge=1)
    edges_alone: bool = True
    edges_alone_cd: bool = Field(False, description="also run MMLU-CD for each edge alone (MMLU always runs)")
    tasks: dict[str, SerializeAsAny[TaskSettings]] = Field({}, description="more benchmarks by name, each with its kind "
                                                           "(edgefuse.tasks.registry), evaluated after MMLU and MMLU-CD")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_empty(handler(self), "tasks")

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, v):
        if not isinstance(v, dict):
            raise ValueError("tasks: a mapping of task names to settings")
        return {name: task_settings(name, entry) for name, entry in v.items()}

    @model_validator(mode="after")
    def _metric_of_format(self) -> "BenchmarksConfig":
        if self.metric == "acc_norm" and self.format == "letters":
            raise ValueError("metric acc_norm is not produced by the letters format (use format: cloze, or metric: acc)")
        if self.format == "cloze" and self.mmlu.shots:
            raise ValueError("the cloze format is zero-shot: set mmlu.shots to 0")
        return self

    @property
    def headline_metric(self) -> str:
        return self.metric or ("acc_norm" if self.format == "cloze" else "acc")


class OutputConfig(_Strict):
    figures: bool = True
    headline_k: int = 2


class StudyConfig(_Strict):
    """A study, as written in its YAML and as snapshotted into the run directory's ``config.json`` (the
    snapshot is this model's dump, so it loads back to the same study; see docs/artifacts.md)."""

    format_version: Literal[1] = Field(1, description="layout of this config; a run directory's config.json "
                                                      "records it")
    name: str = "study"
    model: str = "smollm2-135m"
    seeds: list[int] = [0]
    data: DataConfig = DataConfig()
    edges: dict[str, list[str]]
    pruning: PruningConfig = PruningConfig()
    edge_pruning: dict[str, PruningConfig] = Field(
        {}, description="per-edge changes to `pruning`, written inline as edges: {NAME: {domains, pruning}}"
    )
    training: TrainingConfig = TrainingConfig()
    fusion: FusionConfig = FusionConfig()
    interference: InterferenceConfig = InterferenceConfig()
    rounds: RoundsConfig = RoundsConfig()
    benchmarks: BenchmarksConfig = BenchmarksConfig()
    compose: ComposeConfig = Field(ComposeConfig(), description="LoraHub and retrieval mixtures of the edge adapters, "
                                                                "evaluated next to the static fusions")
    output: OutputConfig = OutputConfig()
    max_minutes: Optional[float] = Field(None, gt=0, description="refuse to start when the estimated duration "
                                                                 "of the stages still to run is longer")
    device: Optional[str] = Field(None, description="cpu, cuda, cuda:N or mps (default: cuda when torch sees a GPU, "
                                                    "else cpu); checked when the study starts")
    dtype: Optional[str] = Field(None, description="float32 (default), bfloat16 or float16: the base weights' dtype in "
                                                   "pruning, training and scoring (LoRA weights stay float32)")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else _value_error(dtype_name, v)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            _value_error(parse_device, v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _inline_edge_settings(cls, raw):
        """``edges: {phone: {domains: [stem], pruning: {memory_budget_gib: 1.5}}}`` — an edge device with its
        own memory budget (or ratio, method…) — becomes ``edges.phone = [stem]`` plus ``edge_pruning.phone``;
        an edge written as a plain list of domains uses ``pruning`` unchanged."""
        if not isinstance(raw, dict) or not isinstance(raw.get("edges"), dict):
            return raw
        edges, per_edge = {}, dict(raw.get("edge_pruning") or {})  # the saved form (config.json) as well
        for name, spec in raw["edges"].items():
            if isinstance(spec, dict):
                extra = sorted(set(spec) - {"domains", "pruning"})
                if extra:
                    raise ValueError(f"edges.{name}.{extra[0]}: unknown key (an edge has domains and pruning)")
                if "domains" not in spec:
                    raise ValueError(f"edges.{name}: an edge written as a mapping needs `domains`")
                edges[name] = spec["domains"]
                if spec.get("pruning") is not None:
                    if name in per_edge:
                        raise ValueError(f"edges.{name}: pruning given both inline and in edge_pruning")
                    per_edge[name] = spec["pruning"]
            else:
                edges[name] = spec
        return {**raw, "edges": edges, "edge_pruning": per_edge}

    @field_validator("edges")
    @classmethod
    def _edges(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if len(v) < 1:
            raise ValueError("at least one edge is needed")
        for name, domains in v.items():
            if not domains:
                raise ValueError(f"edge {name!r} has no domains")
        return v

    def _check_edge_domains(self) -> None:
        """Every edge domain is MMLU's (category, subcategory, subject) or a domain of a ``data.choices`` file; the
        files are read only when an edge names a domain MMLU does not have."""
        wanted = {d for domains in self.edges.values() for d in domains if not is_domain(d)}
        if not wanted:
            return
        found = {it.subject for f in self.data.choices.values()
                 for it in load_choice_file(f.path, f.fields, f.domain)} if self.data.choices else set()
        for d in sorted(wanted - found):
            try:
                domain_subjects(d)
            except EdgefuseError as e:
                raise ValueError("edges: " + str(e) + (f"; or a domain of data.choices ({', '.join(sorted(found))})"
                                           if self.data.choices else "")) from None

    @model_validator(mode="after")
    def _cross(self) -> "StudyConfig":
        self._check_edge_domains()
        for name, task in self.benchmarks.tasks.items():
            ref = getattr(task, "data", None)
            if ref is not None and ref not in self.data.choices:
                raise ValueError(f"benchmarks.tasks.{name}: data {ref!r} is not a file of data.choices "
                                 f"({', '.join(self.data.choices) or 'none'})")
        unknown = sorted(set(self.edge_pruning) - set(self.edges))
        if unknown:
            raise ValueError(f"edge_pruning names {unknown[0]!r}, which is not an edge of the study")
        for edge in self.edges:
            p = self.pruning_for(edge)
            if p.ratio is None and p.memory_budget_gib is None:
                where = f"edges.{edge}.pruning" if edge in self.edge_pruning else "pruning"
                raise ValueError(f"{where} needs a ratio or a memory_budget_gib")
        if self.fusion.weights is not None and len(self.fusion.weights) != len(self.edges):
            raise ValueError(f"fusion.weights has {len(self.fusion.weights)} entries for {len(self.edges)} edges")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        r = self.rounds
        if r.method is not None and r.method not in self.fusion.methods:
            raise ValueError(f"rounds.method {r.method!r} is not among fusion.methods {self.fusion.methods}")
        cr_names = [c.name for c in self.fusion.cr]
        if r.cr is not None and r.cr not in cr_names:
            raise ValueError(f"rounds.cr {r.cr!r} is not among fusion.cr {cr_names}")
        built = [name for _, _, name in self.fusion.fusions()]
        if self.rounds.count > 1 and self.sent_back() not in built:
            raise ValueError(f"rounds: the model sent back, {self.sent_back()!r}, is not built (LoRA-CR "
                             f"{self.sent_back().split('+')[-1]!r} cannot change {self.sent_back().split('+')[0]!r}); "
                             f"built: {', '.join(built)}")
        taken = {"base", LORAHUB_NAME, *built}
        for mix in self.compose.retrieval_mixture:
            if mix.name in taken:
                raise ValueError(f"compose.retrieval_mixture: the name {mix.name!r} is taken by another model of the study")
            if mix.k > len(self.edges):
                raise ValueError(f"compose.retrieval_mixture {mix.name!r}: k = {mix.k} is larger than the "
                                 f"{len(self.edges)} edges")
        return self

    @field_serializer("edge_pruning")
    def _only_set_keys(self, v: dict[str, PruningConfig]) -> dict[str, dict]:
        """Each edge's own keys only, so that a saved config (``config.json``) loads back to the same study."""
        return {edge: p.model_dump(exclude_unset=True) for edge, p in v.items()}

    def precision(self):
        """The study's `edgefuse.precision.Precision` (defaults filled in), checked against this machine."""
        return resolve(self.device, self.dtype)

    def pruning_for(self, edge: str) -> PruningConfig:
        """``pruning`` with this edge's own settings applied (only the keys the edge sets). An edge that sets a
        ``ratio`` but no ``memory_budget_gib`` drops a study-wide budget, so that its ratio is what counts."""
        own = self.edge_pruning.get(edge)
        if own is None:
            return self.pruning
        changes = {k: getattr(own, k) for k in own.model_fields_set}
        if "ratio" in changes and "memory_budget_gib" not in changes:
            changes["memory_budget_gib"] = None
        return PruningConfig.model_validate({**self.pruning.model_dump(), **changes})

    def with_device_budgets(self, budgets: dict[str, float]) -> "StudyConfig":
        """This config with the memory budgets the edge devices reported (Flower node config
        ``memory-budget-gib``) as those edges' pruning; an edge whose pruning the config sets itself keeps it."""
        own = dict(self.edge_pruning)
        for edge, gib in budgets.items():
            if edge in self.edges and edge not in own:
                own[edge] = PruningConfig.model_validate({"memory_budget_gib": gib})
        return self.model_copy(update={"edge_pruning": own})

    @property
    def collects_grams(self) -> bool:
        """The study has a ``grams`` stage: a fusion method needs Gram matrices, or ``interference.enabled``."""
        return self.interference.enabled or self.fusion.needs_grams

    def sent_back(self) -> str:
        """Name of the fused model that starts the next round (as in the report: ``method`` or ``method+cr``)."""
        method, cr = self.rounds.method or self.fusion.methods[0], self.rounds.cr or self.fusion.cr[0].name
        return fused_model_name(method, cr)


def _value_error(check, value):
    """``check(value)``, with an `EdgefuseError` turned into the ValueError pydantic reports under the key."""
    try:
        return check(value)
    except EdgefuseError as e:
        raise ValueError(str(e)) from None


def load_config(path: str | Path) -> StudyConfig:
    """Parse and validate a YAML study config; every problem becomes one line naming file and key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EdgefuseError("config file not found", path=path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise EdgefuseError(f"malformed YAML ({getattr(e, 'problem', e)})", path=path,
                            line=None if line is None else line + 1) from None
    if not isinstance(raw, dict):
        raise EdgefuseError("config must be a YAML mapping", path=path)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        if loc[:1] == ["edge_pruning"] and len(loc) > 1:  # written inline as edges.NAME.pruning
            loc = ["edges", loc[1], "pruning", *loc[2:]]
        key = ".".join(loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise EdgefuseError(f"{key}: {msg}" if err["loc"] else msg, path=path) from None
