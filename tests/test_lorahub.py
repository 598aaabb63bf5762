"""LoraHub weights (edgefuse.compose.lorahub): the zero-budget start, a search that never ends above its
start, the objective against an independent dense merge, the trace and manifest, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from edgefuse.artifacts import ExternalAdapterManifest
from edgefuse.adapters import LoraAdapter, LoraModule, load_adapter
from edgefuse.compose.lorahub import ExampleLoss, lorahub, lorahub_objective, save_lorahub
from edgefuse.data.mmlu import select
from edgefuse.edge.batching import encode_items
from edgefuse.edge.train import letter_loss
from edgefuse.data.prompts import answer_text
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.scoring import continuation_token_ids, lm_parts, make_batch
from edgefuse.models import tiny_model

pytestmark = pytest.mark.integration

pytest.importorskip("nevergrad")

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def base():
    return tiny_model(layers=2)


@pytest.fixture(scope="module")
def items(mmlu):
    return select(mmlu, "public", domains=["stem"], limit=8, seed=0)


def random_adapter(model, rank: int, seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, layer in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            out, inp = layer.weight.shape
            mods[name] = LoraModule(torch.randn(rank, inp, generator=g) * 0.3,
                                    torch.randn(out, rank, generator=g) * 0.3, 2.0 / rank)
    return LoraAdapter(mods)


@pytest.fixture(scope="module")
def adapters(base):
    return [random_adapter(base[0], r, s) for r, s in ((2, 1), (4, 2), (8, 3))]


def weights_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_zero_budget_returns_the_uniform_start_and_its_loss(base, adapters, items):
    model, tok = base
    before = weights_of(model)
    res = lorahub(model, tok, adapters, items, budget=0)
    assert res.weights == [1 / 3] * 3 and res.start == [1 / 3] * 3
    assert res.loss == res.start_loss and res.objective == res.start_objective
    assert res.objective == pytest.approx(res.loss + 0.05 / 3)
    assert len(res.trace) == 1 and res.trace[0]["weights"] == [1 / 3] * 3
    after = weights_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit for bit
    zeros = lorahub(model, tok, adapters, items, budget=0, start="zeros")
    assert zeros.weights == [0.0] * 3
    assert zeros.loss == pytest.approx(ExampleLoss(tok, items)(model), abs=1e-6)  # ΔW = 0: the base model


def test_search_never_ends_above_the_start_and_records_its_trace(base, adapters, items, tmp_path):
    model, tok = base
    before = weights_of(model)
    res = lorahub(model, tok, adapters, items, budget=8, seed=0)
    assert res.objective <= res.start_objective
    assert len(res.trace) == 9 and [t["step"] for t in res.trace] == list(range(9))
    assert min(t["objective"] for t in res.trace) == res.objective
    assert all(-1.5 <= w <= 1.5 for t in res.trace for w in t["weights"])
    assert any(t["weights"] != res.start for t in res.trace[1:])  # the optimiser moved away from the start
    assert {m.rank for m in res.adapter.modules.values()} == {14}  # task arithmetic concatenates 2+4+8
    after = weights_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = lorahub(model, tok, adapters, items, budget=8, seed=0)
    assert again.weights == res.weights and [t["objective"] for t in again.trace] == [t["objective"] for t in res.trace]
    out = save_lorahub(res, tmp_path / "hub", inputs=[{"path": f"a{i}"} for i in range(3)])
    loaded = load_adapter(out, model)
    man = loaded.manifest.lorahub
    assert man["weights"] == res.weights and len(man["trace"]) == 9 and man["settings"]["budget"] == 8
    for name, m in res.adapter.modules.items():
        assert torch.allclose(loaded.modules[name].delta(), m.delta(), atol=1e-6)


def test_objective_equals_an_independent_dense_merge(base, adapters, items):
    model, tok = base
    w = [0.7, -0.4, 1.2]
    obj, loss, _ = lorahub_objective(model, adapters, w, ExampleLoss(tok, items))
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for name in adapters[0].modules:
            dense = sum(wi * a.modules[name].scale * (a.modules[name].B @ a.modules[name].A)
                        for wi, a in zip(w, adapters))
            ref_model.get_submodule(name).weight.add_(dense)
    seqs = encode_items(tok, items, 512)
    b = make_batch(seqs, tok.pad_token_id if tok.pad_token_id is not None else 0, "right", "cpu")
    letters = torch.tensor(continuation_token_ids(tok, [answer_text(i) for i in range(4)]))
    body, head, softcap = lm_parts(ref_model)
    with torch.no_grad():
        ref = letter_loss(body, head, softcap, letters, b, torch.tensor([it.answer for it in items])).item()
    assert loss == pytest.approx(ref, abs=1e-5)
    assert obj == pytest.approx(ref + 0.05 * sum(abs(x) for x in w) / 3, abs=1e-5)


def test_cloze_objective_runs_and_differs_from_letters(base, adapters, items):
    model, tok = base
    res = lorahub(model, tok, adapters, items, objective="cloze", budget=0)
    assert res.loss > 0 and res.loss != lorahub(model, tok, adapters, items, budget=0).loss


def one_line_error(call) -> str:
    with pytest.raises(EdgefuseError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_input_gives_one_clear_line(base, adapters, items):
    model, tok = base
    assert "budget" in one_line_error(lambda: lorahub(model, tok, adapters, items, budget=-1))
    assert "at least one adapter" in one_line_error(lambda: lorahub(model, tok, [], items))
    assert "example" in one_line_error(lambda: lorahub(model, tok, adapters, [], budget=0))
    assert "objective" in one_line_error(lambda: lorahub(model, tok, adapters, items, objective="x"))
    assert "3 adapters" in one_line_error(lambda: lorahub(model, tok, adapters, items, start=[0.1]))
    assert "[-1.5, 1.5]" in one_line_error(lambda: lorahub(model, tok, adapters, items, start=[2, 0, 0]))


# --- CLI: edgefuse compose lorahub ---------------------------------------------------------------------------


@pytest.fixture
def adapter_dirs(tmp_path, base, adapters):
    from edgefuse.adapters import save_adapter
    from edgefuse.models import fingerprint

    fp = fingerprint(tiny_model()[0])
    dirs = []
    for k, a in enumerate(adapters):
        d = tmp_path / f"a{k}"
        save_adapter(LoraAdapter(a.modules, base_model="tiny-llama"), d,
                     ExternalAdapterManifest(base_fingerprint=fp, domain=f"d{k}"))
        dirs.append(d)
    return dirs


def test_cli_writes_a_peft_adapter_with_weights_and_trace(tmp_path, adapter_dirs, cli):
    import json

    out = tmp_path / "hub"
    code, so, se = cli("compose", "lorahub", "--domains", "stem", "--examples", 4,
                       "--budget", 3, "--out", out, "--device", "cpu", "--adapters", *adapter_dirs)
    assert code == 0, se
    assert "in 4 evaluations" in so
    man = json.loads((out / "edgefuse.json").read_text())
    hub = man["lorahub"]
    assert len(hub["weights"]) == 3 and len(hub["trace"]) == 4 and hub["settings"]["domains"] == ["stem"]
    assert hub["objective"] <= hub["start_objective"] and man["base_model"] == "tiny-llama"
    assert [i["domain"] for i in man["inputs"]] == ["d0", "d1", "d2"]
    load_adapter(out, tiny_model()[0])


def test_cli_bad_input_one_line_nothing_written(tmp_path, adapter_dirs, cli):
    out = tmp_path / "never"

    def bad(*args) -> str:
        code, _, se = cli("compose", "lorahub", "--out", out, *args)
        assert code != 0 and not out.exists()
        lines = [ln for ln in se.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), se
        return lines[0]

    assert "budget must be an integer >= 0" in bad("--domains", "stem", "--budget", -1, "--adapters", *adapter_dirs)
    assert "at least one adapter" in bad("--domains", "stem")
    assert "unknown domain 'astrology'" in bad("--domains", "astrology", "--adapters", *adapter_dirs)
    assert "--domains" in bad("--adapters", *adapter_dirs)
    assert "--examples" in bad("--domains", "stem", "--examples", 0, "--adapters", *adapter_dirs)
    assert "unknown fusion method 'nope'" in bad("--domains", "stem", "--method", "nope", "--adapters", *adapter_dirs)
    assert "--start" in bad("--domains", "stem", "--start", "random", "--adapters", *adapter_dirs)
    out.mkdir()
    code, _, se = cli("compose", "lorahub", "--out", out, "--domains", "stem",
                      "--adapters", *adapter_dirs)
    assert code != 0 and "already exists" in se and not any(out.iterdir())
