"""Labelled image grids: one row per model (teacher, student, baselines), one column per (prompt, seed)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

__all__ = ["labelled_grid"]


def labelled_grid(rows: dict[str, list], columns: list[str], path, *, title: str = "", max_columns: int = 8,
                  dpi: int = 100) -> Path:
    """Write ``rows`` ({row label: PIL images}) as a grid with row labels and column titles; returns the path.

    Only the first ``max_columns`` columns are drawn (the numbers are computed on all of them).
    """
    from matplotlib.figure import Figure

    n_cols = min(len(columns), max_columns)
    n_rows = len(rows)
    side = 1.9
    fig = Figure(figsize=(1.6 + side * n_cols, 0.9 + side * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(np.asarray(images[c].convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(columns[c], 22)[:3]), fontsize=7.5)
            if c == 0:
                ax.set_ylabel(label, fontsize=9, rotation=90)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
