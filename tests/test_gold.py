"""The continuous scores beside accuracy (issue 22, item 5): the gold answer's log-likelihood and margin, the
retention of an edge's gain under fusion, and whether interference predicts what a fusion loses.

References: hand-worked examples, the evaluation's own acc_norm choices on the tiny model, and scipy's Spearman.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgefuse.evaluate.gold import GOLD, MARGIN, gold_scores
from edgefuse.evaluate.stats import bootstrap_ci, paired_diff_ci, ratio_ci

pytestmark = pytest.mark.unit


class Item:
    def __init__(self, choices):
        self.choices = choices


def test_gold_scores_by_hand():
    items = {"q/1": Item(("ab", "abcd", "abcde", "x"))}
    # cloze: per character -1, -1.5, -0.8, -3; gold C = -0.8, best wrong A = -1: margin +0.2
    cloze = gold_scores([{"id": "q/1", "answer": "C", "scores": [-2.0, -6.0, -4.0, -3.0]}], items, "cloze")
    assert cloze["q/1"] == pytest.approx([-0.8, 0.2])
    # letters: the letter's own log-likelihood; gold A = -1.2, best wrong B = -0.5: margin -0.7
    letters = gold_scores([{"id": "q/1", "answer": "A", "scores": [-1.2, -0.5, -2.0, -3.0]}], items, "letters")
    assert letters["q/1"] == pytest.approx([-1.2, -0.7])


@pytest.mark.integration
def test_margin_is_positive_exactly_on_the_items_acc_norm_gets_right(tiny, mmlu):
    from edgefuse.evaluate.mmlu import evaluate_mmlu

    items = mmlu.items[:24]
    res = evaluate_mmlu(*tiny, items, fmt="cloze", batch_size=8)
    gold = gold_scores(res["items"], {it.id: it for it in items}, "cloze")
    for r in res["items"]:
        ll = r["scores"][items[[it.id for it in items].index(r["id"])].answer]
        it = next(i for i in items if i.id == r["id"])
        assert gold[r["id"]][GOLD] == pytest.approx(ll / len(it.choices[it.answer]), abs=1e-6)
        if abs(gold[r["id"]][MARGIN]) > 1e-5:  # a near tie may go either way at the 6 stored decimals
            assert (gold[r["id"]][MARGIN] > 0) == r["correct_norm"], r


def test_ratio_ci():
    r = ratio_ci([1, 0, 1, 1], [1, 1, 1, 0])
    assert r["ratio"] == pytest.approx(1.0) and r["n"] == 4 and r["lo"] <= 1.0 <= r["hi"]
    same = ratio_ci([0.3, 0.3, 0.3], [0.6, 0.6, 0.6])  # no spread: the interval is the point
    assert (same["ratio"], same["lo"], same["hi"]) == pytest.approx((0.5, 0.5, 0.5))
    scaled, ref = ratio_ci([0.1, 0.5, 0.2, 0.9], [2, 2, 2, 2]), bootstrap_ci([0.1, 0.5, 0.2, 0.9])
    assert ref["lo"] / 2 - 0.05 <= scaled["lo"] <= scaled["ratio"] <= scaled["hi"] <= ref["hi"] / 2 + 0.05
    unresolved = ratio_ci([1, 0, -1, 0], [1, -1, 0, 0])  # the denominator's mean is 0: unbounded
    assert math.isnan(unresolved["ratio"]) and unresolved["lo"] == -math.inf and unresolved["hi"] == math.inf


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    from edgefuse.report.gold import spearman

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    y[:10] = x[:10] * 2  # some monotone part
    x[5] = x[6]  # a tie
    assert spearman(list(x), list(y)) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 9, 8, 1]) == pytest.approx(-1.0)


def _ev(gold: dict, correct: dict) -> dict:
    return {"mmlu": {"gold": {i: [g, g + 1] for i, g in gold.items()}, "correct": correct}}


def _doc() -> dict:
    """Two edges (stem: college_physics; humanities: philosophy), two items each; base, edges alone and one fused
    model, with gold scores chosen for hand-worked retention."""
    ids = ["college_physics/1", "college_physics/2", "philosophy/1", "philosophy/2"]
    base = _ev(dict(zip(ids, [-1.0, -2.0, -1.0, -1.0])), dict(zip(ids, [0, 0, 1, 0])))
    stem = _ev(dict(zip(ids, [-0.5, -1.0, -1.2, -1.0])), dict(zip(ids, [1, 1, 1, 0])))
    hum = _ev(dict(zip(ids, [-1.0, -2.0, -0.5, -0.5])), dict(zip(ids, [0, 0, 1, 1])))
    fused = _ev(dict(zip(ids, [-0.8, -1.4, -0.75, -1.0])), dict(zip(ids, [1, 0, 1, 1])))
    return {"config": {"edges": {"stem": ["stem"], "humanities": ["humanities"]},
                       "benchmarks": {"format": "cloze"}},
            "base": base, "seeds": [{"seed": 0, "edges": [{"edge": "stem", "eval": stem}, {"edge": "humanities", "eval": hum}],
                                     "fused": [{"name": "task_arithmetic", "eval": fused}]}],
            "interference": {"models": [{"name": "task_arithmetic", "seed": 0, "round": 1, "domains": [
                {"domain": "stem", "deviation": 0.4}, {"domain": "humanities", "deviation": 0.9}]}]}}


def test_retention_by_hand():
    from edgefuse.report.gold import retention, retention_table

    [row] = retention(_doc())
    # stem: fused gain (0.2 + 0.6) / 2 = 0.4 over the edge's (0.5 + 1.0) / 2 = 0.75 → 0.5333; accuracy (1 + 0) / (1 + 1)
    assert row["cells"]["stem"]["gold"]["ratio"] == pytest.approx(0.4 / 0.75)
    assert row["cells"]["stem"]["acc"]["ratio"] == pytest.approx(0.5)
    # humanities: fused (0.25 + 0) / 2 over the edge's (0.5 + 0.5) / 2 → 0.25; accuracy 1 / 1
    assert row["cells"]["humanities"]["gold"]["ratio"] == pytest.approx(0.25)
    assert row["cells"]["humanities"]["acc"]["ratio"] == pytest.approx(1.0)
    assert row["cells"]["stem"]["edge_gain"] == paired_diff_ci([-0.5, -1.0], [-1.0, -2.0])
    # pooled over both domains (each edge's own gain is positive on both of its items, so resolved):
    # fused gains (0.2 + 0.6 + 0.25 + 0) / 4 over the edges' (0.5 + 1.0 + 0.5 + 0.5) / 4 → 0.42
    assert row["resolved"] == ["stem", "humanities"] and row["pooled"]["ratio"] == pytest.approx(1.05 / 2.5)
    table = retention_table(_doc())
    assert "| task_arithmetic | 42 [" in table and "| 53 [" in table and "| 25 [" in table


def test_prediction_and_gold_table_by_hand():
    from edgefuse.report.gold import gold_table, prediction

    doc = _doc()
    assert prediction(doc) is None  # two (model, domain) points: no correlation is claimed
    ids = ["college_physics/1", "college_physics/2", "philosophy/1", "philosophy/2"]
    doc["seeds"][0]["fused"].append({"name": "ties", "eval": _ev(dict(zip(ids, [-0.9, -1.9, -1.0, -1.0])),
                                                                  dict(zip(ids, [0, 0, 1, 0])))})
    doc["interference"]["models"].append({"name": "ties", "seed": 0, "round": 1, "domains": [
        {"domain": "stem", "deviation": 1.2}, {"domain": "humanities", "deviation": 1.5}]})
    p = prediction(doc)
    # (deviation, Δ gold vs base on the domain): (0.4, 0.4), (0.9, 0.125), (1.2, 0.1), (1.5, 0.0): strictly falling
    assert [q["deviation"] for q in p["points"]] == pytest.approx([0.4, 0.9, 1.2, 1.5])
    assert [q["vs_base"] for q in p["points"]] == pytest.approx([0.4, 0.125, 0.1, 0.0])
    assert p["vs_base"]["rho"] == pytest.approx(-1.0) and p["vs_base"]["n"] == 4
    # against the edge alone: stem −0.35 (TA), −0.65 (TIES); humanities −0.375, −0.5
    assert [q["vs_edge"] for q in p["points"]] == pytest.approx([-0.35, -0.375, -0.65, -0.5])
    table = gold_table(doc, [{"model": "base", "ev": doc["base"]}, {"model": "ta", "ev": doc["seeds"][0]["fused"][0]["eval"]}])
    d = paired_diff_ci([-0.8, -1.4, -0.75, -1.0], [-1.0, -2.0, -1.0, -1.0])
    assert "| ta | -0.988 [" in table and f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] *" in table
