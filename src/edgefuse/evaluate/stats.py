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


def fmt_ci(r: dict, pct: bool = True) -> str:
    """'34.5 [28.0, 41.0]' style text for tables, of a `bootstrap_ci` interval (its value is "acc") or a
    `paired_ci` one (its value is "diff")."""
    k = 100.0 if pct else 1.0
    v = r["diff"] if "diff" in r else r["acc"]
    return f"{v * k:.1f} [{r['lo'] * k:.1f}, {r['hi'] * k:.1f}]"
