"""``--device`` / ``--dtype``: prune → train → recover → eval in bfloat16 on the CPU, against float32.

The reference is the same chain in float32 (same seeds, same items). The bounds below were measured on the
tiny Llama and are stated with their margin (module constants); bad input is one line, a non-zero exit and
no output, through the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from edgefuse import precision

pytestmark = pytest.mark.integration

# Largest |bf16 − fp32| of a score, measured on this chain (24 items; the two chains' pruning plans differ, as
# near-tied Taylor scores may): letter log-probabilities 0.0065, cloze summed log-likelihoods 0.052. Bounds: 3×.
LETTER_TOL = 0.02
CLOZE_TOL = 0.15
# Pruning importance (Taylor, summed over calibration batches) in bf16 vs fp32: largest error 1.1% of the
# largest score of its projection; bound 3%.
IMPORTANCE_TOL = 0.03
EVAL_ITEMS = 24


def chain(cli, root: Path, dtype: str) -> Path:
    """The CLI chain in one dtype; returns its directory (eval results in letters.json / cloze.json)."""
    d = root / dtype
    steps = [
        ["prune", "--model", "tiny-llama", "--method", "taylor", "--ratio", "0.25", "--calib", "4", "--out", d / "p"],
        ["train", "--pruned", d / "p", "--domain", "stem", "--steps", "3", "--batch", "2", "--seq", "48", "--limit", "6",
         "--lr", "0.003", "--out", d / "pkg"],
        ["recover", "--package", d / "pkg", "--plan", d / "p" / "plan.json", "--out", d / "rec"],
        *[["eval", "mmlu", "--model", "tiny-llama", "--adapter", d / "rec", "--limit", EVAL_ITEMS, "--format", fmt,
           "--out", d / f"{fmt}.json"] for fmt in ("letters", "cloze")],
    ]
    for args in steps:
        r = cli(*args, *(["--device", "cpu", "--dtype", dtype] if args[0] != "recover" else []))
        assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def chains(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("precision")
    return {dt: chain(cli, root, dt) for dt in ("float32", "bfloat16")}


def results(chains, dtype: str, fmt: str) -> dict:
    return json.loads((chains[dtype] / f"{fmt}.json").read_text())


def margins(scores: list[list[float]], lengths: list[list[int]] | None = None) -> list[float]:
    """Best minus second-best score per item (per character when ``lengths`` are given: acc_norm)."""
    out = []
    for i, s in enumerate(scores):
        v = sorted((x / lengths[i][j] if lengths else x) for j, x in enumerate(s))
        out.append(v[-1] - v[-2])
    return out


def check_predictions(ref: dict, low: dict, tol: float, pred: str = "pred", correct: str = "correct",
                      lengths=None) -> None:
    """Where float32's margin exceeds 2·tol no score bound of tol can flip the choice: the prediction must be the
    same there, and accuracy may differ by at most the share of the other items."""
    m = margins([it["scores"] for it in ref["items"]], lengths)
    close = 0
    for it_ref, it_low, mi in zip(ref["items"], low["items"], m):
        if mi > 2 * tol:
            assert it_low[pred] == it_ref[pred], (it_ref["id"], mi)
        else:
            close += 1
    acc_ref = sum(it[correct] for it in ref["items"]) / len(ref["items"])
    acc_low = sum(it[correct] for it in low["items"]) / len(low["items"])
    assert abs(acc_ref - acc_low) <= close / len(ref["items"])


def max_diff(ref: dict, low: dict) -> float:
    return max(abs(a - b) for x, y in zip(ref["items"], low["items"]) for a, b in zip(x["scores"], y["scores"]))


def test_bf16_chain_letter_scores_stay_within_tolerance_of_float32(chains):
    ref, low = results(chains, "float32", "letters"), results(chains, "bfloat16", "letters")
    assert low["dtype"] == "bfloat16" and ref["dtype"] == "float32"
    assert [it["id"] for it in low["items"]] == [it["id"] for it in ref["items"]]
    assert max_diff(ref, low) <= LETTER_TOL
    check_predictions(ref, low, LETTER_TOL)


def test_bf16_chain_cloze_scores_stay_within_tolerance_of_float32(chains, mmlu):
    ref, low = results(chains, "float32", "cloze"), results(chains, "bfloat16", "cloze")
    assert max_diff(ref, low) <= CLOZE_TOL
    check_predictions(ref, low, CLOZE_TOL)
    by_id = {it.id: it for it in mmlu.items}
    lengths = [[len(c) for c in by_id[it["id"]].choices] for it in ref["items"]]
    check_predictions(ref, low, CLOZE_TOL, "pred_norm", "correct_norm", lengths)


def test_bf16_package_records_its_dtype_and_its_adapter_is_float32(chains):
    from safetensors.torch import load_file

    man = json.loads((chains["bfloat16"] / "pkg" / "edgefuse.json").read_text())
    assert man["stats"]["dtype"] == "bfloat16"
    cfg = json.loads((chains["bfloat16"] / "p" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"  # the pruned weights are stored in bf16
    assert {t.dtype for t in load_file(chains["bfloat16"] / "rec" / "adapter_model.safetensors").values()} == {torch.float32}


def test_an_adapter_trained_in_bf16_applies_to_the_float32_model(chains, cli):
    """One fingerprint whatever the dtype: the bf16 chain's adapter is accepted by the float32 base, and the
    bf16 pruned model (saved in bf16) reloads in float32 with its recorded fingerprint."""
    from edgefuse.edge.plan import load_pruned
    from edgefuse.models import fingerprint, load_model

    r = cli("eval", "mmlu", "--model", "tiny-llama", "--adapter", chains["bfloat16"] / "rec", "--limit", 4)
    assert r.returncode == 0, r.stderr
    assert fingerprint(load_model("tiny-llama", dtype="bfloat16")[0]) == fingerprint(load_model("tiny-llama")[0])
    model, _, _ = load_pruned(chains["bfloat16"] / "p")  # checks the recorded pruned fingerprint
    assert model.dtype == torch.float32


def test_lora_weights_stay_float32_and_the_forward_runs_under_bf16_autocast(tmp_path, mmlu, monkeypatch):
    from edgefuse.data.mmlu import select
    from edgefuse.edge import train
    from edgefuse.edge.plan import save_pruned
    from edgefuse.edge.prune import prune_model
    from edgefuse.models import load_model

    model, tok = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    save_pruned(prune_model(model, tok, method="magnitude", ratio=0.25), tok, tmp_path / "p")
    seen = {"trainable": set(), "frozen": set(), "autocast": set()}

    def watch(peft_model):
        peft_model = lora_float32(peft_model)
        for name, p in peft_model.named_parameters():
            seen["trainable" if p.requires_grad else "frozen"].add(p.dtype)
        lora_a = next(m for n, m in peft_model.named_modules() if n.endswith("lora_A.default"))
        lora_a.register_forward_hook(lambda mod, args, out: seen["autocast"].add(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype)))
        return peft_model

    lora_float32 = train.lora_float32
    monkeypatch.setattr(train, "lora_float32", watch)
    step_dtypes = set()
    adamw_step = torch.optim.AdamW.step

    def step(self, *a, **k):  # every optimizer step: the parameters it updates and their gradients
        step_dtypes.update((p.dtype, p.grad.dtype) for g in self.param_groups for p in g["params"] if p.grad is not None)
        return adamw_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = train.TrainConfig(steps=2, batch=2, seq=48, checkpoint_every=0)
    train.train_edge(tmp_path / "p", "stem", select(mmlu, "edge", ["stem"], limit=4), cfg, tmp_path / "pkg",
                     device="cpu", dtype="bfloat16", progress=lambda *a, **k: None)
    assert seen["trainable"] == {torch.float32} and seen["frozen"] == {torch.bfloat16}
    assert seen["autocast"] == {(True, torch.bfloat16, torch.bfloat16)}
    assert step_dtypes == {(torch.float32, torch.float32)}


def test_pruning_importance_accumulates_in_float32(tiny):
    """Taylor gradients over several calibration batches: float32 sums on the bf16 model, close to float32's."""
    from edgefuse.data.mmlu import load_mmlu, select
    from edgefuse.data.prompts import answer_text, mc_prompt
    from edgefuse.edge import importance as imp
    from edgefuse.models import load_model

    prompts = [mc_prompt(it) + answer_text(it.answer) for it in select(load_mmlu(), "public", limit=6)]
    stats = {}
    for dt in ("float32", "bfloat16"):
        model, tok = load_model("tiny-llama", device="cpu", dtype=dt)
        stats[dt] = imp.collect_stats(model, tok, prompts, grads=True, batch_size=2)  # three batches summed
        assert {g.dtype for g in stats[dt].grads.values()} == {torch.float32}
    for key, ref in stats["float32"].grads.items():
        err = (stats["bfloat16"].grads[key] - ref).abs().max() / ref.abs().max()
        assert err <= IMPORTANCE_TOL, (key, float(err))


def test_default_precision_adds_nothing_to_cache_keys_and_others_add_what_differs():
    from types import SimpleNamespace

    from edgefuse.runner.stages import precision_inputs

    default = precision.resolve()
    assert default.as_dict() == {"device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": "float32"}
    assert precision_inputs(SimpleNamespace(precision=default)) == {}
    assert precision_inputs(SimpleNamespace(precision=precision.resolve(default.device, "float32"))) == {}
    bf16 = precision.resolve(None, torch.bfloat16)
    assert precision_inputs(SimpleNamespace(precision=bf16)) == {"precision": {"dtype": "bfloat16"}}


TINY_STUDY = {
    "name": "tiny-precision", "model": "tiny-llama", "seeds": [0], "edges": {"science": ["stem"]},
    "pruning": {"method": "magnitude", "ratio": 0.5},
    "training": {"steps": 2, "rank": 4, "alpha": 8, "batch": 2, "seq": 64},
    "fusion": {"methods": ["task_arithmetic"], "cr": ["off"]},
    "benchmarks": {"mmlu": {"limit": 8}, "mmlu_cd": {"enabled": False}, "edges_alone": False},
}


def stage_runs(run_dir: Path) -> dict[str, str]:
    """Each stage's status in the last run recorded in ``stages.jsonl`` (ran or cached)."""
    out = {}
    for line in (run_dir / "stages.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["stage"]] = rec["status"]
    return out


@pytest.mark.e2e  # a study, run twice: the layer overrides the module's
def test_study_keeps_its_cache_with_explicit_defaults_and_reruns_model_stages_in_bf16(tmp_path, cli):
    """A default study's stage keys do not change when the defaults are written out (config keys); bf16 (the
    command-line override) redoes every stage that runs the model (prune, train and what follows, eval) and
    reuses the data stages."""
    run_dir = tmp_path / "run"
    for extra, options, name in (({}, [], "default"),
                                 ({"dtype": "float32", "device": precision.default_device()}, [], "explicit"),
                                 ({}, ["--dtype", "bfloat16"], "bf16")):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**TINY_STUDY, **extra}))
        (run_dir / "stages.jsonl").unlink(missing_ok=True)
        r = cli("run", cfg, "--run-dir", run_dir, "--no-progress", *options)
        assert r.returncode == 0, r.stderr
        status = stage_runs(run_dir)
        if name == "explicit":
            assert set(status.values()) == {"cached"}, status
        if name == "bf16":
            assert status["data"] == "cached"
            assert all(status[s] != "cached" for s in status if s != "data"), status
            assert json.loads((run_dir / "results.json").read_text())["precision"]["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def cannot_run_float16(monkeypatch):
    """A torch build whose CPU has no float16 matmul (torch 2.13's CPU build has one, older ones did not)."""
    real = precision._probe

    def probe(device, dtype):
        if dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(device, dtype)

    precision._unsupported.cache_clear()
    monkeypatch.setattr(precision, "_probe", probe)
    yield
    precision._unsupported.cache_clear()


@pytest.fixture(scope="module")
def adapter(chains):
    return chains["float32"] / "rec"


@pytest.fixture(scope="module")
def inputs(chains, tmp_path_factory, cli):
    """What the commands below read: the float32 chain's pruned model and adapter, an MMLU-CD file, a config."""
    d = tmp_path_factory.mktemp("inputs")
    r = cli("mmlu-cd", "build", "--n", "2", "--out", d / "cd.jsonl")
    assert r.returncode == 0, r.stderr
    (d / "study.yaml").write_text(yaml.safe_dump(TINY_STUDY))
    return {"pruned": chains["float32"] / "p", "adapter": chains["float32"] / "rec", "bench": d / "cd.jsonl",
            "config": d / "study.yaml"}


def commands(out: Path, i: dict) -> dict[str, list]:
    """Every command that loads a model, writing to ``out``; the precision options are appended."""
    return {
        "prune": ["prune", "--model", "tiny-llama", "--ratio", "0.5", "--out", out],
        "train": ["train", "--pruned", i["pruned"], "--domain", "stem", "--steps", "1", "--out", out],
        "eval mmlu": ["eval", "mmlu", "--model", "tiny-llama", "--limit", "2", "--out", out],
        "eval mmlu-cd": ["eval", "mmlu-cd", "--bench", i["bench"], "--model", "tiny-llama", "--out", out],
        "export": ["export", "--adapter", i["adapter"], "--out", out],
        "fuse --merged-out": ["fuse", "--method", "task_arithmetic", "--model", "tiny-llama", "--merged-out", out,
                              "--adapters", i["adapter"], i["adapter"], "--out", out],
        "run": ["run", i["config"], "--run-dir", out],
    }


BAD = [
    (["--dtype", "float64"], "unknown dtype 'float64'; valid: float32, bfloat16, float16"),
    (["--device", "tpu"], "unknown device 'tpu'; valid: cpu, cuda, cuda:N, mps"),
    (["--device", "cuda"], "sees no CUDA GPU"),
    (["--device", "cpu", "--dtype", "float16"], "dtype float16 cannot run on cpu"),
]


@pytest.mark.parametrize("options, msg", BAD, ids=["unknown-dtype", "unknown-device", "no-gpu", "float16-on-cpu"])
@pytest.mark.parametrize("command", ["prune", "train", "eval mmlu", "eval mmlu-cd", "export", "fuse --merged-out", "run"])
def test_bad_precision_is_one_line_before_any_work(tmp_path, inputs, cannot_run_float16, command, options, msg, cli):
    if options == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = cli(*commands(tmp_path / "x", inputs)[command], *options)
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key, value, msg", [
    ("dtype", "half", "dtype: unknown dtype 'half'; valid: float32, bfloat16, float16"),
    ("device", "gpu0", "device: unknown device 'gpu0'"),
])
def test_bad_precision_in_the_study_config_names_the_key(tmp_path, key, value, msg, cli):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({**TINY_STUDY, key: value}))
    r = cli("run", config, "--run-dir", tmp_path / "x")
    assert r.returncode != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()


def test_a_dtype_the_device_cannot_run_in_the_study_config_fails_before_anything_is_written(tmp_path,
                                                                                             cannot_run_float16, cli):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({**TINY_STUDY, "device": "cpu", "dtype": "float16"}))
    r = cli("run", config, "--run-dir", tmp_path / "x")
    assert r.returncode != 0 and "dtype float16 cannot run on cpu" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_gguf_export_refuses_a_dtype(tmp_path, adapter, cli):
    r = cli("export", "--adapter", adapter, "--format", "gguf", "--dtype", "bfloat16", "--out", tmp_path / "m.gguf")
    assert r.returncode != 0 and "--dtype bfloat16 applies to --format hf" in r.stderr, r.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_hf_export_writes_the_merged_weights_in_the_chosen_dtype(tmp_path, adapter, cli):
    """The merge runs in float32 and is rounded once: the bf16 export equals the float32 export cast to bf16."""
    from safetensors.torch import load_file

    for dt in ("float32", "bfloat16"):
        r = cli("export", "--adapter", adapter, "--dtype", dt, "--out", tmp_path / dt)
        assert r.returncode == 0, r.stderr
    ref, low = (load_file(tmp_path / dt / "model.safetensors") for dt in ("float32", "bfloat16"))
    assert {t.dtype for t in low.values()} == {torch.bfloat16}
    assert all(torch.equal(low[k], ref[k].to(torch.bfloat16)) for k in ref)
