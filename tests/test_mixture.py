"""Output mixtures of LoRA adapters and mixed-adapter batches (edgefuse.compose.mixture).

References are independent of the code under test: PEFT applying one adapter, the same mixture run one
row at a time, and the base model with the weighted dense updates (from PEFT's own get_delta_weight)
merged into its weights. Adapters are random PEFT LoRAs of different ranks, scales and target sets.
"""

import copy
import math

import pytest
import torch

from edgefuse.adapters import LoraAdapter, load_adapter
from edgefuse.compose import LoraMixture, softmax_weights, top_k_weights, uniform_weights, weight_matrix
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.scoring import make_batch
from edgefuse.models import tiny_model

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402 - after importorskip
from peft.tuners.lora import LoraLayer  # noqa: E402
from helpers.peft_adapters import save_random_adapters  # noqa: E402 - imports peft

pytestmark = pytest.mark.unit

TOL = 1e-5
CONFIGS = [  # ranks 2, 4, 8 and a per-module rank (3, o_proj 5); rsLoRA; different targets
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]),
    dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    dict(r=3, lora_alpha=6, rank_pattern={"o_proj": 5}, target_modules=["q_proj", "o_proj", "down_proj"]),
]
TEXTS = [
    "Question: what is the answer? A. one B. two",
    "The following are multiple choice questions about law.",
    "abc",
    "science and medicine, 0123456789",
    "Answer: C",
]


def report(name, err):
    print(f"\n{name}: max |d logits| = {err:.3e}")


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    return save_random_adapters(tmp_path_factory.mktemp("mixture"), CONFIGS, seed=100)


@pytest.fixture(scope="module")
def adapters(adapter_dirs):
    return [load_adapter(d) for d in adapter_dirs]


@pytest.fixture(scope="module")
def batch(tiny):
    _, tok = tiny
    seqs = tok(TEXTS, add_special_tokens=False).input_ids
    return seqs, make_batch(seqs, tok.pad_token_id, "right", "cpu")


@torch.inference_mode()
def logits(model, b):
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits


def real(x, b):
    """Logits at real (non-padding) positions only."""
    return x[b.attention_mask.bool()]


def mixed_logits(model, adapters, weights, b):
    with LoraMixture(model, adapters) as mix:
        mix.set_weights(weights)
        return logits(model, b)


def peft_deltas(directory):
    """Dense ΔW per module from PEFT itself (an independent reading of the adapter files)."""
    pm = PeftModel.from_pretrained(tiny_model()[0], str(directory))
    return {key.removeprefix("base_model.model."): mod.get_delta_weight("default").detach().clone()
            for key, mod in pm.named_modules() if isinstance(mod, LoraLayer)}


def test_adapters_have_different_ranks(adapters):
    ranks = [sorted({m.rank for m in a.modules.values()}) for a in adapters]
    assert ranks == [[2], [4], [8], [3, 5]]


def test_weights_by_hand():
    assert uniform_weights(4).tolist() == [0.25] * 4
    e1, e2, e3 = math.exp(0.9 / 0.5), math.exp(0.1 / 0.5), math.exp(0.5 / 0.5)
    got = softmax_weights([0.9, 0.1, 0.5], temperature=0.5)
    assert got.tolist() == pytest.approx([e1 / (e1 + e2 + e3), e2 / (e1 + e2 + e3), e3 / (e1 + e2 + e3)], abs=1e-7)
    sims = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.0, 0.3, -0.2, 0.8]])
    assert top_k_weights(sims, 2).tolist() == [[0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5]]
    soft = top_k_weights(sims, 2, "softmax", temperature=0.5)
    a, b = math.exp(0.9 / 0.5), math.exp(0.5 / 0.5)
    c, d = math.exp(0.3 / 0.5), math.exp(0.8 / 0.5)
    hand = torch.tensor([[a / (a + b), 0, b / (a + b), 0], [0, c / (c + d), 0, d / (c + d)]])
    torch.testing.assert_close(soft, hand, rtol=0, atol=1e-7)
    assert top_k_weights(sims, 1).tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]
    torch.testing.assert_close(weight_matrix([{0: 0.7, 2: 0.3}, {1: 1.0}], 3), torch.tensor([[0.7, 0, 0.3], [0, 1, 0]]))


@pytest.mark.parametrize("call", [
    lambda: uniform_weights(0),
    lambda: softmax_weights([1.0, 2.0], temperature=0.0),
    lambda: top_k_weights(torch.zeros(2, 3), 4),
    lambda: top_k_weights(torch.zeros(2, 3), 0),
    lambda: top_k_weights(torch.zeros(2, 3), 2, "max"),
    lambda: weight_matrix([{3: 1.0}], 3),
])
def test_weight_helpers_refuse_bad_input(call):
    with pytest.raises(EdgefuseError):
        call()


@pytest.mark.parametrize("j", range(len(CONFIGS)))
def test_k1_equals_peft(tiny, adapters, adapter_dirs, batch, j):
    model, _ = tiny
    _, b = batch
    w = torch.zeros(len(TEXTS), len(adapters))
    w[:, j] = 1.0
    got = mixed_logits(model, adapters, w, b)
    ref = logits(PeftModel.from_pretrained(tiny_model()[0], str(adapter_dirs[j])), b)
    err = float((real(got, b) - real(ref, b)).abs().max())
    report(f"k=1 adapter {j} vs PEFT", err)
    assert err <= TOL
    assert float((real(got, b) - real(logits(model, b), b)).abs().max()) > 1e-2  # the adapter does change the model


def test_mixed_batch_equals_rows_alone(tiny, adapters, batch):
    model, tok = tiny
    seqs, b = batch
    mixtures = [{0: 1.0}, {1: 0.7, 2: 0.3}, {3: 0.25, 0: 0.75}, {2: 1.0}, {1: 0.5, 3: 0.5}]
    w = weight_matrix(mixtures, len(adapters))
    got = mixed_logits(model, adapters, w, b)
    worst = 0.0
    with LoraMixture(model, adapters) as mix:  # one context, a new union per row (also exercises the stack cache)
        for i, s in enumerate(seqs):
            alone = make_batch([s], tok.pad_token_id, "right", "cpu")
            mix.set_weights(w[i : i + 1])
            ref = logits(model, alone)[0]
            worst = max(worst, float((got[i, : len(s)] - ref).abs().max()))
    report("mixed batch vs rows alone", worst)
    assert worst <= TOL


def test_left_padding_and_every_position_use_the_row_weights(tiny, adapters, batch):
    model, tok = tiny
    seqs, right = batch
    left = make_batch(seqs, tok.pad_token_id, "left", "cpu")
    w = weight_matrix([{0: 0.5, 1: 0.5}, {2: 1.0}, {3: 0.9, 1: 0.1}, {0: 1.0}, {2: 0.4, 3: 0.6}], len(adapters))
    err = float((real(mixed_logits(model, adapters, w, left), left) - real(mixed_logits(model, adapters, w, right), right)).abs().max())
    report("left vs right padding", err)
    assert err <= TOL


@pytest.mark.parametrize("pair,ws", [((1, 2), (0.7, 0.3)), ((0, 3), (1.2, -0.4))])
def test_k2_equals_dense_merge(tiny, adapters, adapter_dirs, batch, pair, ws):
    model, _ = tiny
    seqs, _ = batch
    b = make_batch([seqs[0]], 0, "right", "cpu")
    w = torch.zeros(1, len(adapters))
    w[0, list(pair)] = torch.tensor(ws)
    got = mixed_logits(model, adapters, w, b)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for j, wj in zip(pair, ws):
            for name, delta in peft_deltas(adapter_dirs[j]).items():
                merged.get_submodule(name).weight += wj * delta
    err = float((got - logits(merged, b)).abs().max())
    report(f"k=2 {pair} weights {ws} vs dense merge", err)
    assert err <= TOL


def test_exit_restores_model_bit_identical(tiny, adapters, batch):
    model, _ = tiny
    _, b = batch
    before = logits(model, b)
    with LoraMixture(model, adapters) as mix:
        mix.set_weights(top_k_weights(torch.rand(len(TEXTS), len(adapters), generator=torch.Generator().manual_seed(0)), 2))
        assert not torch.equal(logits(model, b), before)
    assert torch.equal(logits(model, b), before)
    with pytest.raises(RuntimeError), LoraMixture(model, adapters) as mix:
        mix.set_weights(torch.ones(len(TEXTS), len(adapters)))
        raise RuntimeError("leaving through an exception also restores the model")
    assert torch.equal(logits(model, b), before)
    assert not any(m._forward_hooks for m in model.modules())


def one_line_error(call) -> str:
    with pytest.raises(EdgefuseError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_gives_one_clear_line(tiny, adapters, batch):
    model, _ = tiny
    _, b = batch
    good = adapters[0].modules["model.layers.0.self_attn.q_proj"]
    missing = LoraAdapter({"model.layers.7.self_attn.q_proj": good})
    assert "no module model.layers.7.self_attn.q_proj" in one_line_error(lambda: LoraMixture(model, [adapters[0], missing]))
    wrong = LoraAdapter({"model.layers.0.self_attn.k_proj": good})  # k_proj is 32x64 under GQA, q_proj 64x64
    assert "k_proj" in one_line_error(lambda: LoraMixture(model, [wrong]))
    assert "a mixture needs at least one adapter" in one_line_error(lambda: LoraMixture(model, []))
    with LoraMixture(model, adapters) as mix:
        assert "(rows, 4)" in one_line_error(lambda: mix.set_weights(torch.ones(len(TEXTS), 3)))
        assert "(rows, 4)" in one_line_error(lambda: mix.set_weights(torch.ones(4)))
        assert "NaN" in one_line_error(lambda: mix.set_weights(torch.full((len(TEXTS), 4), float("nan"))))
        assert "set_weights" in one_line_error(lambda: logits(model, b))
        mix.set_weights(torch.ones(2, 4))
        assert "set for 2 rows" in one_line_error(lambda: logits(model, b))
    peft_model = PeftModel.from_pretrained(tiny_model()[0], str(adapters[0].path))
    assert "not nn.Linear" in one_line_error(lambda: LoraMixture(peft_model.get_base_model(), adapters[:1]))


def test_dtype_follows_the_model(tiny, adapters, batch):
    model, _ = tiny
    _, b = batch
    w = weight_matrix([{0: 0.6, 2: 0.4}] * len(TEXTS), len(adapters))
    double = copy.deepcopy(model).double()
    got = mixed_logits(double, adapters, w, b)
    assert got.dtype == torch.float64
    err = float((real(got, b) - real(mixed_logits(model, adapters, w, b), b).double()).abs().max())
    report("float64 model vs float32 model", err)
    assert err <= TOL


def test_grad_mode_matches_inference_and_backpropagates(tiny, adapters, batch):
    model, _ = tiny
    _, b = batch
    trainable = copy.deepcopy(model)  # gradients must not land on the shared fixture
    w = weight_matrix([{0: 0.5, 1: 0.5}, {2: 1.0}, {3: 0.8, 0: 0.2}, {1: 1.0}, {2: 0.3, 3: 0.7}], len(adapters))
    with LoraMixture(trainable, adapters) as mix:
        mix.set_weights(w)
        out = trainable(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        out.sum().backward()
    err = float((real(out.detach(), b) - real(mixed_logits(model, adapters, w, b), b)).abs().max())
    report("grad mode (out-of-place add) vs inference (in-place add)", err)
    assert err <= TOL
    assert trainable.model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny, adapters, batch):
    model, _ = tiny
    _, b = batch
    w = weight_matrix([{0: 1.0}, {1: 0.7, 2: 0.3}, {3: 0.5, 0: 0.5}, {2: 1.0}, {1: 0.5, 3: 0.5}], len(adapters))
    cuda = copy.deepcopy(model).cuda()
    cb = type(b)(b.input_ids.cuda(), b.attention_mask.cuda(), b.position_ids.cuda(), b.last_index.cuda())
    got = mixed_logits(cuda, adapters, w, cb).cpu()
    err = float((real(got, b) - real(mixed_logits(model, adapters, w, b), b)).abs().max())
    report("CUDA vs CPU", err)
    assert err <= 1e-4


def test_per_token_weights_constant_over_a_row_equal_per_row_weights(tiny, adapters, batch):
    model, _ = tiny
    _, b = batch
    w = weight_matrix([{0: 1.0}, {1: 0.7, 2: 0.3}, {3: 0.25, 0: 0.75}, {2: 1.0}, {1: 0.5, 3: 0.5}], len(adapters))
    per_token = w[:, None, :].expand(-1, b.input_ids.shape[1], -1)
    err = float((real(mixed_logits(model, adapters, per_token, b), b)
                 - real(mixed_logits(model, adapters, w, b), b)).abs().max())
    report("per-token (constant) vs per-row weights", err)
    assert err <= TOL


def test_per_token_weights_equal_a_dense_per_token_reference(tiny, adapters, adapter_dirs, batch):
    """Each position gets its own mixture; the reference adds (Σᵢ wᵢ ΔWᵢ) x per token with PEFT's dense ΔW."""
    model, _ = tiny
    _, b = batch
    rows, T = b.input_ids.shape
    g = torch.Generator().manual_seed(3)
    w = torch.rand(rows, T, len(adapters), generator=g) * (torch.rand(rows, T, len(adapters), generator=g) > 0.4)
    got = mixed_logits(model, adapters, w, b)
    deltas = [peft_deltas(d) for d in adapter_dirs]

    def hook(name):
        def add(module, args, out):
            x = args[0]
            extra = torch.zeros_like(out)
            for j, d in enumerate(deltas):
                if name in d:
                    extra += w[:, :, j : j + 1] * (x @ d[name].T)
            return out + extra
        return add

    names = sorted({n for d in deltas for n in d})
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        ref = logits(model, b)
    finally:
        for h in handles:
            h.remove()
    err = float((real(got, b) - real(ref, b)).abs().max())
    report("per-token weights vs dense per-token reference", err)
    assert err <= TOL
    with LoraMixture(model, adapters) as mix:
        mix.set_weights(torch.ones(rows, T + 1, len(adapters)))
        assert f"set for {T + 1} tokens" in one_line_error(lambda: logits(model, b))
        assert "(rows, tokens, 4)" in one_line_error(lambda: mix.set_weights(torch.ones(rows, T, 2, 4)))
