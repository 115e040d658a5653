"""Report figures as PNG files: ROC and precision-recall curves, reliability diagram, confusion.

Uses matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global backend
state is touched, so importing this module changes nothing for the caller.
Each function takes ``panels``: one subplot per entry (a class), each holding named series
(a fold or "pooled"), and returns the written path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_curve,
)

__all__ = ["plot_confusion", "plot_pr", "plot_reliability", "plot_roc"]

Series = Mapping[str, tuple[np.ndarray, np.ndarray]]  # name -> (y 0/1, probability)
_POOLED = "pooled"


def _figure(n_panels: int, size: float = 3.6) -> tuple[Figure, list]:
    cols = min(n_panels, 3)
    rows = int(np.ceil(n_panels / cols))
    fig = Figure(figsize=(size * cols, size * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def _style(name: str) -> dict:
    if name == _POOLED:
        return {"color": "black", "linewidth": 2.2, "zorder": 3}
    return {"linewidth": 1.0, "alpha": 0.75}


def _two_classes(y: np.ndarray) -> bool:
    return 0 < int(np.sum(y)) < len(y)


def plot_roc(panels: Mapping[str, Series], path: str | Path) -> Path:
    """ROC curves (scikit-learn ``roc_curve``), AUROC in the legend; one-class series skipped."""
    fig, axes = _figure(len(panels))
    for ax, (title, series) in zip(axes, panels.items(), strict=True):
        for name, (y, p) in series.items():
            if not _two_classes(y):
                continue
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{name} ({auc(fpr, tpr):.2f})", **_style(name))
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8)
        ax.set(
            title=title, xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01)
        )
        ax.legend(fontsize=7, loc="lower right", title="AUROC", title_fontsize=7)
    return _save(fig, path)


def plot_pr(panels: Mapping[str, Series], path: str | Path) -> Path:
    """Precision-recall curves, average precision in the legend; prevalence as a baseline."""
    fig, axes = _figure(len(panels))
    for ax, (title, series) in zip(axes, panels.items(), strict=True):
        for name, (y, p) in series.items():
            if int(np.sum(y)) == 0:
                continue
            prec, rec, _ = precision_recall_curve(y, p)
            ap = average_precision_score(y, p)
            ax.step(rec, prec, where="post", label=f"{name} ({ap:.2f})", **_style(name))
            if name == _POOLED or len(series) == 1:
                ax.axhline(float(np.mean(y)), linestyle=":", color="grey", linewidth=0.8)
        ax.set(
            title=title,
            xlabel="sensitivity (recall)",
            ylabel="PPV (precision)",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        ax.legend(fontsize=7, loc="lower left", title="AUPRC", title_fontsize=7)
    return _save(fig, path)


def plot_reliability(curves: Mapping[str, Mapping], path: str | Path) -> Path:
    """Reliability diagram from :func:`medtl.evaluation.calibration.reliability_curve` dicts."""
    fig, axes = _figure(len(curves))
    for ax, (title, cur) in zip(axes, curves.items(), strict=True):
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8, label="perfect")
        sizes = 10 + 90 * np.asarray(cur["count"], float) / max(1, max(cur["count"] or [1]))
        ax.plot(cur["prob_pred"], cur["prob_true"], color="black", linewidth=1.2)
        ax.scatter(
            cur["prob_pred"], cur["prob_true"], s=sizes, color="tab:blue", zorder=3, label="bins"
        )
        ax.set(
            title=f"{title} (ECE {cur['ece']:.3f})",
            xlabel="mean predicted probability",
            ylabel="observed frequency",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_confusion(
    panels: Mapping[str, tuple[Sequence[Sequence[int]], Sequence[str]]], path: str | Path
) -> Path:
    """Confusion matrices (rows: true class, columns: predicted), counts in the cells."""
    fig, axes = _figure(len(panels), size=3.4)
    for ax, (title, (counts, labels)) in zip(axes, panels.items(), strict=True):
        cm = np.asarray(counts)
        ax.imshow(cm, cmap="Blues")
        hi = cm.max() if cm.size else 0
        for (i, j), v in np.ndenumerate(cm):
            ax.text(
                j, i, str(v), ha="center", va="center", color="white" if v > hi / 2 else "black"
            )
        ticks = range(len(labels))
        ax.set_xticks(ticks, labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(ticks, labels, fontsize=8)
        ax.set(title=title, xlabel="predicted", ylabel="true")
    return _save(fig, path)
