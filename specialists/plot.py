"""Heatmap of the prediction covariance with the specialists' class groups outlined."""

from __future__ import annotations

import os
import io
from pathlib import Path

import numpy as np

from kdens.artifacts import atomic_write_bytes
from kdens.errors import ConfigError


def class_order(num_classes: int, groups: list[list[int]]) -> list[int]:
    """Classes reordered so that each group is contiguous; ungrouped classes come last."""
    grouped = [c for g in groups for c in g]
    seen = set(grouped)
    return grouped + [c for c in range(num_classes) if c not in seen]


def save_covariance_heatmap(
    cov,
    groups: list[list[int]],
    class_names: list[str],
    path: str | os.PathLike,
    title: str = "Covariance of generalist predictions",
) -> Path:
    """Draw ``cov`` with classes reordered so each group is a block, and outline the blocks.

    The file is written atomically (``kdens.artifacts.atomic_write_bytes``), so a reader
    never sees half a PNG.

    Args:
        cov: covariance matrix, shape (C, C).
        groups: disjoint class groups to outline.
        class_names: C names for the axis labels.
        path: output image; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
        title: figure title.

    Returns:
        The written path.
    """
    # Agg and the object API: no display needed and no global pyplot state touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    cov = np.asarray(cov, dtype=np.float64)
    c = cov.shape[0]
    if cov.shape != (c, c) or len(class_names) != c:
        raise ConfigError(
            f"cov must be square (C, C) with C class names; got cov {cov.shape} and {len(class_names)} names"
        )
    grouped = [k for g in groups for k in g]
    if len(set(grouped)) != len(grouped) or any(not 0 <= k < c for k in grouped):
        raise ConfigError(f"groups {groups} must be disjoint class ids in [0, {c - 1}]")
    order = class_order(c, groups)
    m = cov[np.ix_(order, order)]  # (C, C) reordered
    lim = float(np.abs(m).max()) or 1.0

    fig = Figure(figsize=(1.0 + 0.45 * c, 0.6 + 0.45 * c), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    names = [class_names[i] for i in order]
    ax.set_xticks(range(c), names, rotation=90)
    ax.set_yticks(range(c), names)
    start = 0
    for g in groups:
        ax.add_patch(
            Rectangle((start - 0.5, start - 0.5), len(g), len(g), fill=False, edgecolor="black", linewidth=2.0)
        )
        start += len(g)
    ax.set_title(title)
    fig.tight_layout()

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png")
    return atomic_write_bytes(path, buf.getvalue())
