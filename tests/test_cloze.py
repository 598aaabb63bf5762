"""Cloze-form scoring: the cached, batched scorer must equal a naive one-forward-per-choice reference,
MMLU-CD's chained cloze scoring must equal full recomputation, acc_norm must be lm-eval's, and bad
``--format`` / ``--metric`` input must fail in one line before the model loads."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from helpers.choices import assert_same_choices
from helpers.cloze_reference import naive_scores

from edgefuse.data.mmlu import MMLUDataset, MMLUItem, select
from edgefuse.data.mmlu_cd import build_instances
from edgefuse.data.prompts import cloze_continuation, cloze_prompt
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate import mmlu_cd as cd
from edgefuse.evaluate.cloze import ClozeScorer, choice_lengths, choose, encode_pair, normalised
from edgefuse.evaluate.mmlu import evaluate_mmlu

pytestmark = pytest.mark.unit

def lengths_of(continuations):
    return torch.tensor([choice_lengths(cs) for cs in continuations], dtype=torch.float32)


def assert_same(got, ref, continuations, atol=1e-4):
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.allclose(got, ref, atol=atol), (got - ref).abs().max()
    lengths = lengths_of(continuations)
    assert_same_choices(got, ref, atol)  # acc: the raw log-likelihoods
    assert_same_choices(normalised(got, lengths), normalised(ref, lengths), atol)  # acc_norm (lengths ≥ 1)


@pytest.fixture(scope="module")
def short_items(mmlu):
    """Items with short questions and choices (the tiny model is slow per token only in Python)."""
    pool = [it for it in mmlu.items if len(it.question) < 160 and max(map(len, it.choices)) < 60]
    return random.Random(0).sample(pool, 11)


@pytest.fixture(scope="module")
def cloze_inputs(short_items):
    contexts = [cloze_prompt(it) for it in short_items]
    contexts[3] = contexts[3][-40:]  # varied lengths, down to a few tokens
    contexts[5] = contexts[5] + " "  # trailing space: moves to the continuation (lm-eval's rule)
    conts = [[cloze_continuation(it, c) for c in range(4)] for it in short_items]
    return contexts, conts


# ---------------------------------------------------------------- single items


@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_cloze_scorer_equals_naive_reference(tiny, cloze_inputs, batch_size):
    model, tok = tiny
    contexts, conts = cloze_inputs
    ref = naive_scores(model, tok, contexts, conts)
    scorer = ClozeScorer(model, tok, batch_size=batch_size)
    got = scorer.score(contexts, conts)
    assert_same(got, ref, conts)
    assert (got < 0).all()
    assert scorer.tokens_scored > 0


def test_single_token_continuations_and_order(tiny, cloze_inputs):
    """Continuations of one token need no cached forward; order of inputs does not change scores."""
    model, tok = tiny
    contexts, _ = cloze_inputs
    conts = [[" A", " B", " C", " D"]] * len(contexts)
    ref = naive_scores(model, tok, contexts, conts)
    assert torch.allclose(ClozeScorer(model, tok, batch_size=4).score(contexts, conts), ref, atol=1e-4)
    perm = list(range(len(contexts)))
    random.Random(2).shuffle(perm)
    got = ClozeScorer(model, tok, batch_size=3).score([contexts[i] for i in perm], [conts[i] for i in perm])
    assert torch.allclose(got, ref[perm], atol=1e-4)


def test_encode_pair_moves_trailing_space(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "Question: why?\nAnswer: ", "because")
    assert ctx == tok("Question: why?\nAnswer:", add_special_tokens=False).input_ids
    assert ctx + cont == tok("Question: why?\nAnswer: because", add_special_tokens=False).input_ids


def test_cloze_scorer_through_a_peft_wrapper(tiny, cloze_inputs):
    import copy

    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    contexts, conts = cloze_inputs[0][:5], cloze_inputs[1][:5]
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.eval()
    ref = naive_scores(peft_model, tok, contexts, conts)
    got = ClozeScorer(peft_model, tok, batch_size=2).score(contexts, conts)
    assert_same(got, ref, conts)
    assert not torch.allclose(got, naive_scores(model, tok, contexts, conts), atol=1e-3)


# ---------------------------------------------------------------- acc_norm, worked by hand


def test_acc_norm_worked_example(tiny, monkeypatch):
    """Choice texts of 5, 6, 4 and 16 characters (the leading space is not counted, as in lm-eval)."""
    item = MMLUItem("geo-1", "high_school_geography", "What is the capital of France?",
                    ("Paris", "London", "Rome", "A city in France"), 3)
    conts = [cloze_continuation(item, c) for c in range(4)]
    assert conts[0] == " Paris" and choice_lengths(conts) == [5, 6, 4, 16]
    ll = torch.tensor([[-6.0, -6.6, -5.0, -12.8]])
    # per character: -1.2, -1.1, -1.25, -0.8 → acc picks "Rome", acc_norm "A city in France"
    assert torch.allclose(normalised(ll, [[5, 6, 4, 16]]), torch.tensor([[-1.2, -1.1, -1.25, -0.8]]))
    assert choose(ll, [[5, 6, 4, 16]], "acc").item() == 2
    assert choose(ll, [[5, 6, 4, 16]], "acc_norm").item() == 3

    model, tok = tiny
    monkeypatch.setattr(ClozeScorer, "score", lambda self, ctx, cont, progress=None: ll.clone())
    res = evaluate_mmlu(model, tok, [item], fmt="cloze")
    rec = res["items"][0]
    assert (rec["pred"], rec["correct"], rec["pred_norm"], rec["correct_norm"]) == ("C", False, "D", True)
    assert rec["scores"] == [-6.0, -6.6, -5.0, -12.8]
    assert res["accuracy"]["overall"]["acc"] == 0.0 and res["accuracy_norm"]["overall"]["acc"] == 1.0


def test_results_documents(tiny, short_items):
    model, tok = tiny
    items = short_items[:6]
    letters = evaluate_mmlu(model, tok, items, batch_size=4)
    assert letters["format"] == "letters" and "accuracy_norm" not in letters
    assert set(letters["items"][0]) == {"id", "subject", "answer", "pred", "correct", "scores"}
    cloze = evaluate_mmlu(model, tok, items, batch_size=4, fmt="cloze")
    assert cloze["format"] == "cloze" and cloze["shots"] == 0 and cloze["n"] == 6
    assert set(cloze["accuracy"]) == set(cloze["accuracy_norm"]) == set(letters["accuracy"])
    ref = naive_scores(model, tok, [cloze_prompt(it) for it in items],
                       [[cloze_continuation(it, c) for c in range(4)] for it in items])
    for it, rec, row in zip(items, cloze["items"], ref):
        assert set(rec) == {"id", "subject", "answer", "pred", "correct", "pred_norm", "correct_norm", "scores"}
        assert rec["scores"] == pytest.approx(row.tolist(), abs=1e-4)
        s = torch.tensor(rec["scores"])
        assert rec["pred"] == "ABCD"[int(s.argmax())]
        assert rec["pred_norm"] == "ABCD"[int((s / torch.tensor([len(c) for c in it.choices])).argmax())]
        assert rec["correct"] == (rec["pred"] == rec["answer"])
        assert rec["correct_norm"] == (rec["pred_norm"] == rec["answer"])
    acc = sum(r["correct_norm"] for r in cloze["items"]) / 6
    assert cloze["accuracy_norm"]["overall"]["acc"] == pytest.approx(acc)
    with pytest.raises(EdgefuseError, match="zero-shot"):
        evaluate_mmlu(model, tok, items, shots=1, fmt="cloze")
    with pytest.raises(EdgefuseError, match="unknown scoring format 'bogus'"):
        evaluate_mmlu(model, tok, items, fmt="bogus")


# ---------------------------------------------------------------- MMLU-CD, cloze form


@pytest.fixture(scope="module")
def short(mmlu):
    return MMLUDataset([it for it in mmlu.items if len(it.question) + sum(map(len, it.choices)) < 250], "short")


def reference_cloze_chain(model, tok, items, metric, specials=False):
    """Every growing context built as text (the model's own earlier choices) and scored naively."""
    chosen, rows = [], []
    for j, it in enumerate(items):
        conts = [[cloze_continuation(it, c) for c in range(4)]]
        ll = naive_scores(model, tok, [cd.cloze_cd_text(items, chosen)], conts, specials)
        rows.append(ll[0])
        chosen.append(int(choose(ll, lengths_of(conts), metric)[0]))
    return torch.stack(rows)


def test_cloze_instance_layout(short):
    items = cd.resolve(build_instances(short, k=2, n=1, seed=0), short)[0]
    text = cd.cloze_cd_text(items, [1, 2])
    s1, s2 = (it.subject.replace("_", " ") for it in items)
    assert text == (f"The following are questions (with answers) about {s1} and {s2}.\n\n"
                    f"Question 1: {items[0].question.strip()}\n\nQuestion 2: {items[1].question.strip()}\n\n"
                    f"Answer 1: {items[0].choices[1]}\nAnswer 2: {items[1].choices[2]}")
    assert cd.cloze_cd_text(items, []) == cd.cloze_cd_prefix(items)


@pytest.mark.parametrize("metric", ["acc", "acc_norm"])
@pytest.mark.parametrize("k, batch_size", [(2, 1), (3, 4)])
def test_chained_cloze_equals_full_recomputation(tiny, short, k, batch_size, metric):
    model, tok = tiny
    instances = cd.resolve(build_instances(short, k=k, n=5, seed=3), short)
    got = cd.ChainedClozeScorer(model, tok, batch_size=batch_size, metric=metric).score(instances)
    assert got.shape == (5, k, 4)
    for r, items in enumerate(instances):
        ref = reference_cloze_chain(model, tok, items, metric)
        assert torch.allclose(got[r], ref, atol=1e-4), (got[r] - ref).abs().max()


def test_chain_stays_exact_when_cached_tokens_must_be_replaced(tiny, short, monkeypatch):
    """The path for tokenizers that merge across the boundary: pretend the last two cached tokens
    differ, so they are masked out of the cache and fed again at the same positions."""
    model, tok = tiny
    instances = cd.resolve(build_instances(short, k=3, n=3, seed=1), short)
    real = cd.common_prefix
    monkeypatch.setattr(cd, "common_prefix", lambda a, b: max(0, real(a, b) - 2))
    got = cd.ChainedClozeScorer(model, tok, batch_size=3).score(instances)
    for r, items in enumerate(instances):
        assert torch.allclose(got[r], reference_cloze_chain(model, tok, items, "acc"), atol=1e-4)


def test_evaluate_mmlu_cd_cloze_document_and_reuse(tiny, short):
    model, tok = tiny
    doc = build_instances(short, k=2, n=4, seed=2)
    res = cd.evaluate_mmlu_cd(model, tok, doc, short, fmt="cloze", metric="acc_norm")
    assert res["format"] == "cloze" and res["metric"] == "acc_norm" and res["k"] == 2
    for rec, items in zip(res["instances"], cd.resolve(doc, short)):
        s = torch.tensor(rec["scores"])
        lengths = torch.tensor([[len(c) for c in it.choices] for it in items], dtype=torch.float32)
        assert rec["preds"] == ["ABCD"[i] for i in (s / lengths).argmax(-1).tolist()]
    alone = {r["id"]: r for r in res["single_items"]}
    assert all("correct_norm" in r for r in alone.values())
    for rec in res["instances"]:
        assert rec["single_preds"] == [alone[i]["pred_norm"] for i in rec["items"]]
    # cloze records of an earlier run are reused, letter records are not
    used = [alone[i] for i in alone]
    again = cd.evaluate_mmlu_cd(model, tok, doc, short, fmt="cloze", metric="acc_norm", single_items=used[:3])
    for key in ("strict", "single", "penalty", "per_position"):
        assert again[key] == res[key], key
    letters = cd.evaluate_mmlu_cd(model, tok, doc, short)
    assert letters["format"] == "letters" and letters["metric"] == "acc"
    mixed = cd.evaluate_mmlu_cd(model, tok, doc, short, fmt="cloze", single_items=letters["single_items"])
    assert all("correct_norm" in r for r in mixed["single_items"])
    with pytest.raises(EdgefuseError, match="acc_norm"):
        cd.evaluate_mmlu_cd(model, tok, doc, short, metric="acc_norm")


def test_packed_and_chained_cloze_equal_their_references_with_a_bos_tokenizer(tiny, cloze_inputs, short):
    """With a tokenizer that adds its BOS by default, each context starts with it once (the reference
    encodes as the tokenizer does by default) and the continuations carry none, packed or chained."""
    from helpers.bos_tokenizer import with_default_bos

    model, tok = tiny
    btok = with_default_bos(tok)
    contexts, conts = cloze_inputs
    ref = naive_scores(model, btok, contexts, conts, specials=True)
    got = ClozeScorer(model, btok, batch_size=3).score(contexts, conts)
    assert_same(got, ref, conts)
    assert not torch.allclose(got, naive_scores(model, tok, contexts, conts), atol=1e-3)  # the BOS is seen
    instances = cd.resolve(build_instances(short, k=3, n=3, seed=4), short)
    for metric in ("acc", "acc_norm"):
        chained = cd.ChainedClozeScorer(model, btok, batch_size=2, metric=metric).score(instances)
        for r, items in enumerate(instances):
            ref = reference_cloze_chain(model, btok, items, metric, specials=True)
            assert torch.allclose(chained[r], ref, atol=1e-4), (chained[r] - ref).abs().max()


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("args, msg", [
    (["eval", "mmlu", "--model", "tiny-llama", "--format", "bogus"], "unknown scoring format 'bogus'"),
    (["eval", "mmlu", "--model", "tiny-llama", "--format", "cloze", "--shots", "2"], "zero-shot only"),
    (["eval", "mmlu-cd", "--bench", "cd.jsonl", "--model", "tiny-llama", "--format", "bogus"],
     "unknown scoring format 'bogus'"),
    (["eval", "mmlu-cd", "--bench", "cd.jsonl", "--model", "tiny-llama", "--metric", "acc_norm"],
     "metric 'acc_norm' is not produced by the letters format"),
    (["eval", "mmlu-cd", "--bench", "cd.jsonl", "--format", "cloze", "--metric", "f1"],
     "metric 'f1' is not produced by the cloze format"),
])
def test_cli_bad_format_or_metric_is_one_line_before_the_model_loads(args, msg, monkeypatch, capsys):
    from typer.testing import CliRunner

    import edgefuse.cli as cli
    import edgefuse.commands.evaluate as ev_cmd
    import edgefuse.commands.mmlu_cd as cd_cmd

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ev_cmd, "load_with_adapter", no_model)
    monkeypatch.setattr(cd_cmd, "load_with_adapter", no_model)
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code != 0 and isinstance(r.exception, EdgefuseError) and msg in str(r.exception)
    # through the real entry point: one line on stderr, non-zero exit
    monkeypatch.setattr(sys, "argv", ["edgefuse", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err


# ---------------------------------------------------------------- the real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from edgefuse.models import load_model

    return load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_cloze_scorer_equals_naive_reference(smollm2, mmlu):
    model, tok = smollm2
    items = select(mmlu, "test", limit=12, seed=0)  # 48 continuations, each one unbatched forward in the reference
    contexts = [cloze_prompt(it) for it in items]
    conts = [[cloze_continuation(it, c) for c in range(4)] for it in items]
    ref = naive_scores(model, tok, contexts, conts)
    got = ClozeScorer(model, tok, batch_size=8).score(contexts, conts)
    assert_same(got, ref, conts)



@pytest.mark.slow
@pytest.mark.parametrize("metric", ["acc", "acc_norm"])
def test_smollm2_chained_cloze_equals_full_recomputation(smollm2, metric):
    model, tok = smollm2
    from edgefuse.data.mmlu import load_mmlu

    ds = load_mmlu()
    short = MMLUDataset([it for it in ds.items if len(it.question) + sum(map(len, it.choices)) < 200], "short")
    instances = cd.resolve(build_instances(short, k=2, n=3, seed=0), short)
    got = cd.ChainedClozeScorer(model, tok, batch_size=2, metric=metric).score(instances)
    for r, items in enumerate(instances):
        ref = reference_cloze_chain(model, tok, items, metric)
        assert torch.allclose(got[r], ref, atol=1e-4), (got[r] - ref).abs().max()
