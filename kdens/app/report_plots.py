"""Figures of the experiment report: training curves and confusion matrices.

Drawn with matplotlib's object API on the Agg canvas (no display, no pyplot global
state) and written atomically: the PNG is rendered in memory and handed to
``kdens.artifacts.atomic_write_bytes`` (a temp file in the same folder, then
``os.replace``), so a reader never sees half an image.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from kdens.artifacts import atomic_write_bytes

# history.json rows: epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr, seconds
CURVE_PANELS = (("train_loss", "train loss", True), ("val_loss", "validation loss (CE)", True),
                ("val_accuracy", "validation accuracy (%)", False))
# line style per stage kind: the teachers solid, hard-label baselines dashed, students dash-dot
KIND_STYLE = {"generalist": "-", "ensemble": ":", "baseline": "--", "student": "-."}


def figure(width: float, height: float, layout: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Render ``fig`` as PNG and write it atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(Path(path), buf.getvalue())


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one history column, skipping missing and non-finite values."""
    xs, ys = [], []
    for row in history:
        v = row.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(float(row.get("epoch", len(xs) + 1)))
            ys.append(100.0 * v if key.endswith("accuracy") else float(v))
    return xs, ys


def plot_training_curves(curves: list[tuple[str, str, list[dict]]], path: Path) -> Path:
    """Train loss, validation loss and validation accuracy per epoch, one line per run.

    Args:
        curves: ``(label, kind, history rows)`` per run; ``kind`` picks the line style
            (``KIND_STYLE``). A student's train loss is its distillation loss (with the
            T^2 factor), so it is not on the scale of a hard-label run's cross-entropy;
            the validation loss is cross-entropy on hard labels for every run.
        path: the PNG to write.

    Returns:
        The written path.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    # constrained layout leaves room for the legend under the panels, where it hides no line
    fig = figure(15.0, 4.8 + 0.22 * ((len(curves) + 4) // 5), layout="constrained")
    axes = [fig.add_subplot(1, len(CURVE_PANELS), i + 1) for i in range(len(CURVE_PANELS))]
    for i, (label, kind, history) in enumerate(curves):
        # ensemble members are many and alike: thinner, so the single runs stay readable
        member = kind == "ensemble"
        style = {"linestyle": KIND_STYLE.get(kind, "-"), "color": f"C{i % 10}", "linewidth": 1.0 if member else 1.8,
                 "alpha": 0.75 if member else 1.0, "marker": "o" if len(history) <= 12 else None, "markersize": 3}
        for ax, (key, _, _) in zip(axes, CURVE_PANELS):
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, label=label, **style)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, (key, title, logy) in zip(axes, CURVE_PANELS):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ys = [y for line in ax.lines for y in line.get_ydata()]
        # losses span decades when a run trains long: log scale, but with plain tick labels
        if logy and ys and min(ys) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
    handles, labels = {}, []
    for ax in axes:  # a run without validation still gets its legend entry from the loss panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center",
                   ncol=min(len(labels), 5), fontsize=9, frameon=False)
    return save_figure(fig, path)


def plot_confusion(cm: np.ndarray, class_names: list[str], title: str, path: Path) -> Path:
    """A confusion matrix: colours are row-normalized (recall per true class), cells show counts.

    Args:
        cm: counts (C, C), rows true classes, columns predictions (``kdens.metrics.confusion_matrix``).
        class_names: C axis labels.
        title: the figure title (which model, its accuracy).
        path: the PNG to write.

    Returns:
        The written path.
    """
    cm = np.asarray(cm, dtype=np.int64)
    c = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)  # (C, C)
    side = min(3.0 + 0.48 * c, 14.0)
    fig = figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(c), class_names, rotation=45 if max(map(len, class_names)) > 2 else 0, ha="right"
                  if max(map(len, class_names)) > 2 else "center")
    ax.set_yticks(range(c), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= 30:  # beyond that the counts are unreadable; the colours still tell the story
        size = 8 if c <= 12 else 6
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=size,
                            color="white" if share[i, j] > 0.55 else "black")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
