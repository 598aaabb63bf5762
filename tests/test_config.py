"""Bad study configs fail with one clear line naming the key, before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edgefuse.config import load_config
from edgefuse.errors import EdgefuseError

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

GOOD = {"model": "tiny-llama", "edges": {"a": ["stem"], "b": ["law"]},
        "fusion": {"methods": ["task_arithmetic"], "cr": ["off"]}}


def write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))  # keep the edges in their written order
    return p


def test_shipped_configs_validate():
    shipped = sorted(CONFIGS.glob("*.yaml"))
    assert shipped
    for p in shipped:
        load_config(p)


def test_the_tiny_study_of_the_end_to_end_tests_validates(tmp_path, tiny_study):
    """The shared tiny study (fixture) is a valid config with what the end-to-end tests rely on: a second edge
    pruned its own way, two methods with and without LoRA-CR."""
    cfg = load_config(write(tmp_path, tiny_study))
    assert list(cfg.edges) == ["science", "law"] and cfg.edges["law"] == ["law"]
    assert (cfg.pruning_for("law").method, cfg.pruning_for("law").ratio) == ("random", 0.25)
    assert cfg.pruning_for("science") is cfg.pruning and cfg.pruning.ratio == 0.5
    assert cfg.fusion.methods == ["task_arithmetic", "ties"] and [c.name for c in cfg.fusion.cr] == ["off", "element"]


def test_good_config_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.training.steps > 0 and cfg.benchmarks.mmlu_cd.ks == [2]
    assert cfg.rounds.count == 1 and cfg.sent_back() == "task_arithmetic"


@pytest.mark.parametrize("patch, msg", [
    ({"fusion": {"methods": ["averaging_magic"]}}, "fusion.methods: unknown fusion method 'averaging_magic'; valid:"),
    ({"fusion": {"cr": ["maybe"]}}, "fusion.cr: unknown LoRA-CR strategy 'maybe'"),
    ({"edges": {"a": ["astrology"]}}, "edges: unknown domain 'astrology'"),
    ({"edges": {"a": []}}, "edge 'a' has no domains"),
    ({"training": {"steps": -3}}, "training.steps: Input should be greater than or equal to 1"),
    ({"trainig": {"steps": 3}}, "trainig: unknown key"),
    ({"training": {"seed": 3}}, "training.seed: set the seed with the top-level `seeds"),
    ({"training": {"stepz": 3}}, "training.stepz: unknown key"),
    ({"pruning": {"ratio": 1.5}}, "pruning.ratio: Input should be less than 1"),
    ({"benchmarks": {"mmlu_cd": {"ks": [1]}}}, "every k must be at least 2"),
    ({"rounds": {"count": 0}}, "rounds.count: Input should be greater than or equal to 1"),
    ({"rounds": {"count": 2, "method": "ties"}}, "rounds.method 'ties' is not among fusion.methods ['task_arithmetic']"),
    ({"rounds": {"count": 2, "cr": "element"}}, "rounds.cr 'element' is not among fusion.cr ['off']"),
    ({"rounds": {"cuont": 2}}, "rounds.cuont: unknown key"),
    # fusion parameters are checked against each method's spec when the config loads, not at the fuse stage
    ({"fusion": {"methods": ["ties"], "params": {"ties": {"majority": "median"}}}},
     "fusion: ties: majority must be one of total, frequency, got 'median'"),
    ({"fusion": {"methods": ["ties"], "params": {"ties": {"majorty": "total"}}}},
     "fusion: ties: method ties has no parameter(s) majorty; valid:"),
    ({"fusion": {"methods": ["ties"], "params": {"ties": {"workers": 0}}}}, "fusion: ties: workers"),
    ({"fusion": {"methods": ["ties"], "params": {"dare": {}}}},
     "fusion: params names method 'dare', which is not among fusion.methods ['ties']"),
    ({"edges": {"a": {"domains": ["stem"], "prune": {}}}}, "edges.a.prune: unknown key (an edge has domains"),
    ({"edges": {"a": {"pruning": {"ratio": 0.5}}}}, "edges.a: an edge written as a mapping needs `domains`"),
    ({"edges": {"a": {"domains": ["stem"], "pruning": {"ratio": 1.5}}}},
     "edges.a.pruning.ratio: Input should be less than 1"),
    ({"edges": {"a": {"domains": ["stem"], "pruning": {"mthod": "taylor"}}}}, "edges.a.pruning.mthod: unknown key"),
    ({"edges": {"a": {"domains": ["stem"], "pruning": {"ratio": None}}}},
     "edges.a.pruning needs a ratio or a memory_budget_gib"),
    ({"edge_pruning": {"z": {"ratio": 0.5}}}, "edge_pruning names 'z', which is not an edge of the study"),
    ({"edges": {"a": {"domains": ["stem"], "pruning": {"ratio": 0.5}}}, "edge_pruning": {"a": {"ratio": 0.3}}},
     "edges.a: pruning given both inline and in edge_pruning"),
])
def test_bad_configs_name_the_key(tmp_path, patch, msg):
    cfg = {**GOOD, **patch}
    with pytest.raises(EdgefuseError) as e:
        load_config(write(tmp_path, cfg))
    assert msg in str(e.value) and "cfg.yaml" in str(e.value)


def test_per_edge_pruning_overrides_only_what_it_sets(tmp_path):
    """An edge device with its own budget or ratio; the others keep the study-wide pruning unchanged."""
    cfg = load_config(write(tmp_path, {**GOOD, "pruning": {"method": "taylor", "memory_budget_gib": 2.0},
                                       "edges": {"a": ["stem"],
                                                 "b": {"domains": ["law"], "pruning": {"ratio": 0.5}},
                                                 "c": {"domains": ["history"], "pruning": {"memory_budget_gib": 1.2}},
                                                 "d": {"domains": ["other"]}}}))
    assert cfg.edges == {"a": ["stem"], "b": ["law"], "c": ["history"], "d": ["other"]}
    assert cfg.pruning_for("a") is cfg.pruning and cfg.pruning_for("d") is cfg.pruning
    b, c = cfg.pruning_for("b"), cfg.pruning_for("c")
    assert (b.method, b.ratio, b.memory_budget_gib) == ("taylor", 0.5, None)  # its ratio counts, not the budget
    assert (c.method, c.memory_budget_gib) == ("taylor", 1.2)
    # the saved form (the run directory's config.json) loads back to the same study
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.model_dump()))
    again = load_config(saved)
    assert again.edge_pruning["b"].model_dump(exclude_unset=True) == {"ratio": 0.5}
    assert all(again.pruning_for(e) == cfg.pruning_for(e) for e in cfg.edges)


def test_cli_rejects_bad_config_before_work(tmp_path, cli):
    p = write(tmp_path, {**GOOD, "fusion": {"methods": ["nope"]}})
    r = cli("run", p, "--run-dir", tmp_path / "run")
    assert r.returncode != 0 and "unknown fusion method 'nope'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: tiny-llama\nedges: [unclosed\n")
    with pytest.raises(EdgefuseError, match=r"bad\.yaml:\d+: malformed YAML"):
        load_config(p)


def test_impossible_edge_budget_names_the_edge(tmp_path, cli):
    """A device whose own memory budget cannot hold even a 95%-pruned model stops the run with one line that
    names that edge; no report is written."""
    cfg = {**GOOD, "edges": {"phone": {"domains": ["stem"], "pruning": {"memory_budget_gib": 0.0001}},
                             "laptop": ["law"]},
           "training": {"steps": 2, "batch": 4, "seq": 128},
           "benchmarks": {"mmlu": {"limit": 4}, "mmlu_cd": {"ks": [2], "n": 2}}}
    run_dir = tmp_path / "run"
    r = cli("run", write(tmp_path, cfg), "--run-dir", run_dir, "--no-progress")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "edge phone: memory budget 0.0001 GiB is too small" in r.stderr
    assert not (run_dir / "report.md").exists() and not (run_dir / "results.json").exists()


@pytest.mark.parametrize("patch, msg", [
    ({"benchmarks": {"format": "essay"}}, "benchmarks.format: Input should be 'letters' or 'cloze'"),
    ({"benchmarks": {"metric": "acc_norm"}}, "benchmarks: metric acc_norm is not produced by the letters format"),
    ({"benchmarks": {"format": "cloze", "mmlu": {"shots": 2}}}, "benchmarks: the cloze format is zero-shot"),
    ({"training": {"objective": "essays"}}, "training.objective: Input should be 'letters', 'cloze' or 'both'"),
    ({"fusion": {"cr": ["off", {"name": "x", "strategy": "element", "share": 2}]}},
     "fusion.cr.1.share: Input should be less than or equal to 1"),
    ({"fusion": {"cr": ["off", {"name": "x", "strategy": "sometimes"}]}}, "unknown LoRA-CR strategy 'sometimes'"),
    ({"fusion": {"cr": ["element", {"name": "element", "strategy": "direction"}]}},
     "LoRA-CR setting names must be distinct"),
    ({"max_minutes": 0}, "max_minutes: Input should be greater than 0"),
])
def test_bad_scoring_and_cr_settings_name_the_key(tmp_path, patch, msg):
    with pytest.raises(EdgefuseError) as e:
        load_config(write(tmp_path, {**GOOD, **patch}))
    assert msg in str(e.value), str(e.value)


def test_headline_metric_follows_the_format_and_named_cr_settings_round_trip(tmp_path):
    cloze = load_config(write(tmp_path, {**GOOD, "benchmarks": {"format": "cloze"}}))
    assert cloze.benchmarks.headline_metric == "acc_norm"
    assert load_config(write(tmp_path, GOOD)).benchmarks.headline_metric == "acc"
    cfg = load_config(write(tmp_path, {**GOOD, "fusion": {"methods": ["ties"], "cr": [
        "off", "element", {"name": "top", "strategy": "element", "share": 0.25}]}}))
    assert [c.name for c in cfg.fusion.cr] == ["off", "element", "top"]
    assert cfg.fusion.cr[2].fuse_params() == {"cr_share": 0.25}
    dumped = cfg.model_dump()["fusion"]["cr"]
    assert dumped[:2] == ["off", "element"] and dumped[2]["share"] == 0.25  # plain names stay plain (cache keys)
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.model_dump()))
    assert load_config(saved) == cfg


def test_compose_section_defaults_come_from_one_place_and_round_trip(tmp_path):
    """``compose:`` is off unless named; ``lorahub: {}`` and a bare mixture take the library's own defaults (those
    `edgefuse.compose` uses when called directly), a mixture gets a name from its settings, and the saved form
    loads back to the same study."""
    import inspect

    from edgefuse.compose.lorahub import lorahub, lorahub_dirs
    from edgefuse.compose.retrieval import RetrievalSettings

    off = load_config(write(tmp_path, GOOD))
    assert not off.compose.enabled and off.compose.lorahub is None and off.compose.retrieval_mixture == []
    cfg = load_config(write(tmp_path, {**GOOD, "compose": {"lorahub": {}, "retrieval_mixture": [
        {}, {"k": 1, "weighting": "softmax", "temperature": 0.5, "routing": "segment"}, {"name": "mine", "k": 2}]}}))
    assert cfg.compose.enabled
    lh, direct = cfg.compose.lorahub, inspect.signature(lorahub).parameters
    assert (lh.budget, lh.method) == (direct["budget"].default, direct["method"].default)
    assert lh.examples == inspect.signature(lorahub_dirs).parameters["examples"].default
    a, b, c = cfg.compose.retrieval_mixture
    ref = RetrievalSettings()
    assert (a.k, a.weighting, a.temperature, a.routing) == (ref.top_k, ref.weighting, ref.temperature, ref.routing)
    assert a.name == "retrieval-k2-uniform-instance" and b.name == "retrieval-k1-softmax-t0.5-segment"
    assert a.retrieval_tag == c.retrieval_tag == "retrieval-k2-uniform" and c.name == "mine"
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.model_dump()))
    assert load_config(saved) == cfg


@pytest.mark.parametrize("patch, msg", [
    ({"lorahub": {"budget": -1}}, "compose.lorahub.budget: Input should be greater than or equal to 0"),
    ({"lorahub": {"method": "magic"}}, "compose.lorahub.method: unknown fusion method 'magic'"),
    ({"lorahub": {"budgett": 3}}, "compose.lorahub.budgett: unknown key"),
    ({"lorahub": {"method": "regmean"}}, "compose.lorahub.method: regmean fuses with Gram matrices"),
    ({"retrieval_mixture": [{"k": 3}]}, "k = 3 is larger than the 2 edges"),
    ({"retrieval_mixture": [{"k": 0}]}, "compose.retrieval_mixture.0.k: Input should be greater than or equal to 1"),
    ({"retrieval_mixture": [{"weighting": "max"}]}, "compose.retrieval_mixture.0.weighting: Input should be"),
    ({"retrieval_mixture": [{"routing": "token"}]}, "compose.retrieval_mixture.0.routing: Input should be"),
    ({"retrieval_mixture": [{"temperature": 0}]}, "compose.retrieval_mixture.0.temperature: Input should be greater"),
    ({"retrieval_mixture": [{}, {}]}, "retrieval mixture names must be distinct"),
    ({"retrieval_mixture": [{"name": "task_arithmetic"}]}, "the name 'task_arithmetic' is taken"),
    ({"retrieval_mixture": [{"name": "lorahub"}]}, "the name 'lorahub' is taken"),
    ({"mixture": []}, "compose.mixture: unknown key"),
])
def test_bad_compose_settings_name_the_key(tmp_path, patch, msg):
    with pytest.raises(EdgefuseError) as e:
        load_config(write(tmp_path, {**GOOD, "compose": patch}))
    assert msg in str(e.value), str(e.value)


def test_interference_section_defaults_are_gramspecs_and_regmean_collects_grams(tmp_path):
    """``interference:`` is off by default and takes the Gram budget `edgefuse grams` uses; a fusion method that
    needs Gram matrices (regmean) is accepted and makes the study collect them; the saved form loads back."""
    from edgefuse.interference.collect import GramSpec

    off = load_config(write(tmp_path, GOOD))
    assert not off.collects_grams and not off.interference.enabled
    assert (off.interference.tokens, off.interference.per_prompt) == (GramSpec.tokens, GramSpec.per_prompt)
    reg = load_config(write(tmp_path, {**GOOD, "fusion": {"methods": ["task_arithmetic", "regmean"]}}))
    assert reg.fusion.needs_grams and reg.collects_grams and not reg.interference.enabled
    on = load_config(write(tmp_path, {**GOOD, "interference": {"enabled": True, "tokens": 256}}))
    assert on.collects_grams and on.interference.spec(3) == GramSpec(tokens=256, split_seed=3)
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(on.model_dump()))
    assert load_config(saved) == on


@pytest.mark.parametrize("patch, msg", [
    ({"tokens": 0}, "interference.tokens: Input should be greater than or equal to 1"),
    ({"per_prompt": 0}, "interference.per_prompt: Input should be greater than or equal to 1"),
    ({"token": 5}, "interference.token: unknown key"),
])
def test_bad_interference_settings_name_the_key(tmp_path, patch, msg):
    with pytest.raises(EdgefuseError) as e:
        load_config(write(tmp_path, {**GOOD, "interference": patch}))
    assert msg in str(e.value), str(e.value)


def test_a_cr_setting_that_cannot_change_its_method_is_not_built(tmp_path):
    """LoRA-CR activation re-solves its flagged modules by RegMean, so on regmean it would build regmean again
    (tests/test_cr_activation.py shows the two equal): the study builds every other pair, in config order, and a
    round that would send that copy back is refused."""
    act = {"name": "act50", "strategy": "activation", "share": 0.5}
    cfg = load_config(write(tmp_path, {**GOOD, "fusion": {"methods": ["task_arithmetic", "regmean", "ties"],
                                                          "cr": ["off", act, "element"]}}))
    assert [name for _, _, name in cfg.fusion.fusions()] == [
        "task_arithmetic", "task_arithmetic+act50", "task_arithmetic+element", "regmean", "regmean+element",
        "ties", "ties+act50", "ties+element"]
    with pytest.raises(EdgefuseError) as e:
        load_config(write(tmp_path, {**GOOD, "fusion": {"methods": ["regmean"], "cr": [act]},
                                     "rounds": {"count": 2}}))
    assert "the model sent back, 'regmean+act50', is not built" in str(e.value), str(e.value)


def test_a_cr_setting_can_be_limited_to_some_methods_without_changing_its_stage_key(tmp_path):
    """``methods:`` on a LoRA-CR setting builds it only with those methods; a method outside fusion.methods is a
    one-line error; the fuse stage's key input (the setting's dump) does not carry the restriction."""
    act = {"name": "act50", "strategy": "activation", "share": 0.5}
    cfg = load_config(write(tmp_path, {**GOOD, "fusion": {"methods": ["task_arithmetic", "ties"],
                                                          "cr": ["off", {**act, "methods": ["task_arithmetic"]}]}}))
    assert [n for _, _, n in cfg.fusion.fusions()] == ["task_arithmetic", "task_arithmetic+act50", "ties"]
    limited = cfg.fusion.cr[1]
    free = load_config(write(tmp_path, {**GOOD, "fusion": {"methods": ["task_arithmetic"], "cr": [act]}})).fusion.cr[0]
    assert limited.model_dump(exclude={"methods"}) == free.model_dump(exclude={"methods"})
    with pytest.raises(EdgefuseError) as e:
        load_config(write(tmp_path, {**GOOD, "fusion": {"methods": ["ties"], "cr": [{**act, "methods": ["regmean"]}]}}))
    assert "cr 'act50': methods ['regmean'] are not among fusion.methods ['ties']" in str(e.value), str(e.value)


def test_turning_edge_alone_evaluations_on_keeps_the_other_evaluations_keys(tmp_path):
    """Which models are evaluated (``edges_alone``) is not how one is: the base and fused evaluations keep their key,
    so a finished study that turns edge-alone evaluations on runs only those; ``edges_alone_cd`` enters only the
    edge-alone evaluations' keys (`stage_recover_eval`). Found when session 9 turned them on for the conflict study
    and its base evaluation started again."""
    from types import SimpleNamespace

    from edgefuse.runner.cache import StageCache
    from edgefuse.runner.stages import eval_inputs

    def key(bench: dict) -> str:
        cfg = load_config(write(tmp_path, {**GOOD, "benchmarks": bench}))
        st = SimpleNamespace(cfg=cfg, base_fingerprint="f" * 32, cd_hashes={"2": "c" * 64}, tasks=[],
                             data_inputs=cfg.data.model_dump,
                             precision=cfg.precision())
        return StageCache.key("eval", "eval-base", eval_inputs(st))

    off = key({"edges_alone": False})
    assert key({"edges_alone": True}) == off
    assert key({"edges_alone": True, "edges_alone_cd": True}) == off
    assert key({"edges_alone": False, "mmlu": {"limit": 7}}) != off  # a setting of how a model is evaluated does count
