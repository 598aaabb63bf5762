"""Conflict statistics as a layer × module-type grid and heatmap (used by the CLI and the study report)."""

from __future__ import annotations

import re
from pathlib import Path

from edgefuse.io import atomic_write_png


def _layer_type(name: str) -> tuple[str, str]:
    m = re.search(r"layers\.(\d+)\.", name)
    return (m.group(1) if m else "-"), name.rsplit(".", 1)[-1]


def conflict_grid(stats: dict, key: str = "score"):
    """Per-layer × module-type table of a conflict statistic (missing cells are None)."""
    layers, types, cells = [], [], {}
    for name, e in stats["modules"].items():
        layer, typ = _layer_type(name)
        layers.append(layer) if layer not in layers else None
        types.append(typ) if typ not in types else None
        cells[(layer, typ)] = e.get(key)
    layers.sort(key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0))
    return layers, types, cells


def plot_heatmap(stats: dict, path: Path, key: str = "score") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, types, cells = conflict_grid(stats, key)
    grid = np.array([[np.nan if cells.get((y, t)) is None else cells[(y, t)] for t in types] for y in layers])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(types), 1.5 + 0.25 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(f"adapter conflict ({key})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    atomic_write_png(fig, path, dpi=120)
    plt.close(fig)
