"""Prompt tokenization (`edgefuse.tokens`): the first segment of a scored or trained sequence starts with the
tokenizer's default BOS, exactly once, and later segments carry none; tokenizers that add no BOS by default
(GPT-2 style: the tiny one, SmolLM2's) give the same ids as before the helper existed."""

from __future__ import annotations

import pytest
import torch
from helpers.bos_tokenizer import with_default_bos

from edgefuse.data.mmlu import MMLUDataset
from edgefuse.data.mmlu_cd import build_instances
from edgefuse.data.prompts import answer_text, cloze_continuation, cloze_prompt, mc_prompt
from edgefuse.edge.batching import encode_cloze_items, encode_items
from edgefuse.evaluate import mmlu_cd as cd
from edgefuse.evaluate.cloze import ClozeScorer, encode_choices, encode_pair
from edgefuse.evaluate.scoring import LetterScorer
from edgefuse.tokens import bos_prefix, encode_bare, encode_prompt, encode_prompts, keep_end

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bos_tok(tiny):
    return with_default_bos(tiny[1])


@pytest.fixture(scope="module")
def items(mmlu):
    return [it for it in mmlu.items if len(it.question) < 200][:6]


def starts_with_one_bos(ids, bos):
    return ids[:1] == [bos] and bos not in ids[1:]


def test_a_bos_that_is_also_the_eos_is_not_added(tiny):
    tok = with_default_bos(tiny[1])
    tok.eos_token = tok.bos_token
    assert tok("a").input_ids[:1] == [tok.bos_token_id] and bos_prefix(tok) == []
    assert encode_prompt(tok, "Answer:") == tok("Answer:", add_special_tokens=False).input_ids


def test_bos_prefix_is_what_the_tokenizer_adds_by_default(tiny, bos_tok):
    tok = tiny[1]
    assert bos_prefix(tok) == [] and tok("Answer:").input_ids == tok("Answer:", add_special_tokens=False).input_ids
    assert bos_prefix(bos_tok) == [bos_tok.bos_token_id] == [tok.bos_token_id]
    text = "Question: why?\nAnswer:"
    assert encode_prompt(bos_tok, text) == bos_tok(text).input_ids  # what the tokenizer does by default
    assert encode_bare(bos_tok, [text]) == [tok(text, add_special_tokens=False).input_ids]
    assert encode_prompts(bos_tok, []) == []


def test_keep_end_keeps_the_bos_of_over_long_sequences():
    assert keep_end([1, 10, 11, 12, 13], 3, [1]) == [1, 12, 13]
    assert keep_end([1, 10, 11], 3, [1]) == [1, 10, 11]
    assert keep_end([10, 11, 12, 13], 2) == [12, 13]
    assert keep_end([1, 10, 11], 1, [1]) == [11]  # no room for the BOS and a token: the end wins


def test_contexts_start_with_one_bos_and_continuations_carry_none(bos_tok, items):
    bos = bos_tok.bos_token_id
    for it in items:
        context, conts = cloze_prompt(it), [cloze_continuation(it, c) for c in range(4)]
        ctx, tails = encode_choices(bos_tok, context, conts)
        assert starts_with_one_bos(ctx, bos) and all(bos not in t for t in tails)
        for cont, tail in zip(conts, tails):
            assert ctx + tail == bos_tok(context + cont).input_ids
            assert encode_pair(bos_tok, context, cont) == (ctx, tail)
    # lm-eval's boundary rule still moves a trailing space into the continuation
    ctx, tail = encode_pair(bos_tok, "Question: why?\nAnswer: ", "because")
    assert ctx == bos_tok("Question: why?\nAnswer:").input_ids and bos not in tail
    assert ctx + tail == bos_tok("Question: why?\nAnswer: because").input_ids


def test_every_encoder_starts_sequences_with_one_bos(tiny, bos_tok, items, mmlu):
    model = tiny[0]
    bos = bos_tok.bos_token_id
    prompts = [mc_prompt(it) for it in items]
    for seq in LetterScorer(model, bos_tok).encode(prompts):
        assert starts_with_one_bos(seq, bos)
    ctxs, conts = ClozeScorer(model, bos_tok).encode([cloze_prompt(it) for it in items],
                                                     [[cloze_continuation(it, c) for c in range(4)] for it in items])
    assert all(starts_with_one_bos(c, bos) for c in ctxs) and all(bos not in t for cs in conts for t in cs)
    # training and LoraHub batches
    for seq, p in zip(encode_items(bos_tok, items, 512), prompts):
        assert seq == bos_tok(p).input_ids
    seqs, n_answer = encode_cloze_items(bos_tok, items, 512)
    for seq, n, it in zip(seqs, n_answer, items):
        assert seq == bos_tok(cloze_prompt(it) + cloze_continuation(it, it.answer)).input_ids
        assert seq[-n:] == bos_tok(cloze_prompt(it) + cloze_continuation(it, it.answer)).input_ids[-n:]
        assert n == len(seq) - len(bos_tok(cloze_prompt(it)).input_ids)
    # over-long training prompts keep the BOS and their end
    short = encode_items(bos_tok, items, 16)
    for seq, p in zip(short, prompts):
        full = bos_tok(p).input_ids
        assert seq == [bos] + full[-15:]
    # MMLU-CD: the prefix is the first segment, the answer cues are later ones
    ds = MMLUDataset([it for it in mmlu.items if len(it.question) + sum(map(len, it.choices)) < 250], "short")
    instances = cd.resolve(build_instances(ds, k=3, n=3, seed=0), ds)
    prefixes, cues = cd.ChainedScorer(model, bos_tok).encode(instances)
    for p, inst in zip(prefixes, instances):
        assert p == bos_tok(cd.cd_prefix(inst)).input_ids and starts_with_one_bos(p, bos)
    assert cues and all(bos not in c for c in cues)


def test_calibration_prompts_start_with_the_bos(tiny, bos_tok, items):
    """Pruning's calibration pass runs each prompt with the tokenizer's default BOS (one token more each)."""
    from edgefuse.edge.importance import CALIB_MAX_TOKENS, collect_stats

    model, tok = tiny
    prompts = [mc_prompt(it) for it in items[:3]]
    plain = collect_stats(model, tok, prompts, influence=True)
    with_bos = collect_stats(model, bos_tok, prompts, influence=True)
    lengths = [len(tok(p).input_ids) for p in prompts]
    assert plain.tokens == sum(min(n, CALIB_MAX_TOKENS) for n in lengths)
    assert with_bos.tokens == sum(min(n + 1, CALIB_MAX_TOKENS) for n in lengths)


def test_tokenizers_without_a_default_bos_are_unchanged(tiny, items, mmlu):
    """The ids every encoder gives for the tiny (GPT-2-style) tokenizer equal the bare encodings used before."""
    model, tok = tiny

    def bare(texts):
        return tok(list(texts), add_special_tokens=False).input_ids

    prompts = [mc_prompt(it) for it in items]
    assert LetterScorer(model, tok).encode(prompts) == bare(prompts)
    assert encode_items(tok, items, 40) == [e[-40:] for e in bare(prompts)]
    wholes = bare([cloze_prompt(it) + cloze_continuation(it, it.answer) for it in items])
    ctxs = bare([cloze_prompt(it) for it in items])
    assert encode_cloze_items(tok, items, 48) == ([w[-48:] for w in wholes],
                                                  [min(max(1, len(w) - len(c)), 47) for w, c in zip(wholes, ctxs)])
    for it in items:
        context, conts = cloze_prompt(it), [cloze_continuation(it, c) for c in range(4)]
        ctx = bare([context])[0]
        assert encode_choices(tok, context, conts) == (ctx, [w[len(ctx):] for w in bare([context + c for c in conts])])
    ds = MMLUDataset([it for it in mmlu.items if len(it.question) + sum(map(len, it.choices)) < 250], "short")
    instances = cd.resolve(build_instances(ds, k=2, n=3, seed=0), ds)
    prefixes, cues = cd.ChainedScorer(model, tok).encode(instances)
    assert prefixes == bare([cd.cd_prefix(inst) for inst in instances]) and cues == bare([cd.answer_cue(2)])


def test_the_bos_changes_what_the_model_sees(tiny, bos_tok, items):
    """Not a no-op: with the BOS-adding tokenizer the same model scores the same prompts differently."""
    model, tok = tiny
    prompts = [mc_prompt(it)[-300:] for it in items[:3]]
    plain = LetterScorer(model, tok).score(prompts)
    with_bos = LetterScorer(model, bos_tok).score(prompts)
    assert not torch.allclose(plain, with_bos, atol=1e-4)
    assert answer_text(0) == " A"


# ---------------------------------------------------------------- the embedded models' own tokenizers


def embedded_tokenizer(name):
    """The cached tokenizer of an embedded model (no model load when the cache exists)."""
    from transformers import AutoTokenizer

    from edgefuse.assets import embedded_gguf
    from edgefuse.models import gguf_cache_dir, load_model

    cached = gguf_cache_dir(embedded_gguf(name))
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    return load_model(name, device="cpu")[1]


@pytest.mark.slow
def test_smollm2_tokenizer_ids_are_unchanged(items):
    """As transformers converts it from the GGUF, SmolLM2's tokenizer prepends ``<|im_start|>`` by default, which
    is also its EOS; the GGUF says ``add_bos_token: false`` and SmolLM2 was never scored with it: no BOS."""
    from gguf import GGUFReader

    from edgefuse.assets import embedded_gguf

    tok = embedded_tokenizer("smollm2-135m")
    assert GGUFReader(str(embedded_gguf("smollm2-135m"))).fields["tokenizer.ggml.add_bos_token"].contents() is False
    prompts = [mc_prompt(it) for it in items] + [cloze_prompt(it) for it in items]
    assert bos_prefix(tok) == []
    assert encode_prompts(tok, prompts) == tok(prompts, add_special_tokens=False).input_ids


@pytest.mark.slow
def test_gemma_tokenizer_gets_its_bos_once(items):
    tok = embedded_tokenizer("gemma3-270m")
    assert bos_prefix(tok) == [tok.bos_token_id] and tok.convert_ids_to_tokens(tok.bos_token_id) == "<bos>"
    for it in items:
        context, conts = cloze_prompt(it), [cloze_continuation(it, c) for c in range(4)]
        ctx, tails = encode_choices(tok, context, conts)
        assert starts_with_one_bos(ctx, tok.bos_token_id) and all(tok.bos_token_id not in t for t in tails)
        assert encode_prompt(tok, mc_prompt(it)) == tok(mc_prompt(it)).input_ids
