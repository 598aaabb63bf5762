"""Honest statistics: percentile bootstrap intervals for accuracies and paired differences."""

from __future__ import annotations

from typing import Sequence

import numpy as np

N_BOOT = 2000


def bootstrap_ci(correct: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of 0/1 outcomes with a percentile bootstrap interval (``{"acc", "lo", "hi", "n"}``)."""
    x = np.asarray(correct, dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"acc": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    a = (1 - level) / 2
    return {"acc": float(x.mean()), "lo": float(np.quantile(means, a)), "hi": float(np.quantile(means, 1 - a)), "n": n}


def paired_diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Mean of a − b over the same items, resampling items jointly (the right interval for 'vs base')."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape:
        raise ValueError("paired outcomes must have the same length")
    d = xa - xb
    out = bootstrap_ci(d, n_boot, seed, level)
    return {"diff": out["acc"], "lo": out["lo"], "hi": out["hi"], "n": out["n"]}


def ratio_ci(num: Sequence[float], den: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
             level: float = 0.95) -> dict:
    """mean(num) / mean(den) over the same items, with a percentile bootstrap interval resampling items jointly
    (retention: a fused model's gain over an edge's own gain, both paired against the base on one domain's items).

    A resample whose denominator is 0 gives ±inf or nan there; the interval is then unbounded, which is the honest
    answer when the edge's own gain is not resolved."""
    xn, xd = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if xn.shape != xd.shape:
        raise ValueError("ratio outcomes must have the same length")
    n = len(xn)
    if n == 0:
        return {"ratio": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = xn[idx].mean(axis=1) / xd[idx].mean(axis=1)
        point = xn.mean() / xd.mean()
    ratios = np.where(np.isnan(ratios), np.inf, ratios)  # 0/0: unresolved, as unbounded as x/0
    a = (1 - level) / 2  # order statistics (no interpolation, which is undefined between infinities)
    lo, hi = (float(np.quantile(ratios, q, method="inverted_cdf")) for q in (a, 1 - a))
    return {"ratio": float(point), "lo": lo, "hi": hi, "n": n}


def fmt_ci(r: dict, pct: bool = True) -> str:
    """'34.5 [28.0, 41.0]' style text for tables, of a `bootstrap_ci` interval (its value is "acc") or a
    `paired_ci` one (its value is "diff")."""
    k = 100.0 if pct else 1.0
    v = r["diff"] if "diff" in r else r["acc"]
    return f"{v * k:.1f} [{r['lo'] * k:.1f}, {r['hi'] * k:.1f}]"


def fmt_raw(r: dict | None, digits: int = 3) -> str:
    """``-1.234 [-1.300, -1.170]`` of a bootstrap interval (``acc``) or a paired one (``diff``, signed, ``*`` when
    it excludes 0)."""
    if not r:
        return "–"
    if "diff" in r:
        sig = "" if r["lo"] <= 0 <= r["hi"] else " *"
        return f"{r['diff']:+.{digits}f} [{r['lo']:+.{digits}f}, {r['hi']:+.{digits}f}]{sig}"
    return f"{r['acc']:.{digits}f} [{r['lo']:.{digits}f}, {r['hi']:.{digits}f}]"
