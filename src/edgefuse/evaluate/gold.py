"""The gold answer's score, a continuous companion to accuracy.

Why: accuracy moves only when an item's argmax flips, so a 1-point effect needs thousands of items to resolve.
The gold answer's log-likelihood (per character in cloze form, the quantity acc_norm compares) and its margin over
the best wrong answer move on every item, so paired intervals on them resolve small effects with the same items
(issue 22, item 5). Both come from the per-choice scores every MMLU results document already keeps.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from edgefuse.data.mmlu import LETTERS
from edgefuse.evaluate.stats import paired_diff_ci


def gold_scores(records: Iterable[dict], items: Mapping[str, object], fmt: str) -> dict[str, list[float]]:
    """``{item id: [gold score, margin]}`` of an MMLU results document's per-item ``records``.

    The gold score is the answer's log-likelihood: per character of the choice text in cloze form (lm-eval's
    acc_norm normalisation, as `edgefuse.evaluate.cloze.normalised`), of the answer letter in letters form. The
    margin is the gold score minus the best wrong choice's: positive exactly when the item is answered right.
    Plain Python, so the report (which imports no tensor library) can use this module."""
    out = {}
    for r in records:
        scores = [float(x) for x in r["scores"]]
        if fmt == "cloze":
            scores = [x / len(c) if c else -math.inf for x, c in zip(scores, items[r["id"]].choices)]
        gold = LETTERS.index(r["answer"])
        best_wrong = max(x for j, x in enumerate(scores) if j != gold)
        out[r["id"]] = [round(scores[gold], 6), round(scores[gold] - best_wrong, 6)]
    return out


GOLD, MARGIN = 0, 1  # the two entries of each item's ``gold`` record


def gold_of(ev: dict | None) -> dict | None:
    """The per-item gold records of an evaluation summary's MMLU part (None when it has none)."""
    return ((ev or {}).get("mmlu") or {}).get("gold")


def gold_diff(ev: dict, ref: dict, which: int = GOLD, ids: list[str] | None = None) -> dict | None:
    """Paired Δ (ev − ref) of the gold score (``which``: GOLD or MARGIN) over the items both were scored on."""
    a, b = gold_of(ev), gold_of(ref)
    if not a or not b:
        return None
    ids = sorted(set(a) & set(b)) if ids is None else [i for i in ids if i in a and i in b]
    return paired_diff_ci([a[i][which] for i in ids], [b[i][which] for i in ids]) if ids else None
