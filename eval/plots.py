"""Report figures: matplotlib ``Figure`` objects on the Agg canvas (no pyplot state, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from toolkit.artifacts.comparison import Comparison, OrganComparison


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.3f}"


def plot_roc(organ: str, organ_result: OrganComparison, path: Path) -> Path:
    """Patient-level ROC curves of every run for one organ, overlaid."""
    fig = _new_figure(4.6, 4.4)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    level = organ_result.patient
    for name, entry in level.runs.items():
        a = entry.auc
        label = f"{name}: {_fmt(a.estimate)} [{_fmt(a.low)}, {_fmt(a.high)}]"
        # Straight segments between ROC points: correct for tied scores too.
        ax.plot(entry.roc.fpr, entry.roc.tpr, linewidth=1.6, label=label)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{organ}: test patients (n={level.n}, injured {level.n_positive})", fontsize=10)
    ax.legend(loc="lower right", fontsize=7, title="AUC [95% CI]", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_deltas(result: Comparison, path: Path) -> Path:
    """AUC change vs the baseline with its paired-bootstrap CI, per organ and synthetic run."""
    organs = list(result.organs)
    others = result.others
    fig = _new_figure(max(5.0, 1.3 * len(organs) + 2.0), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(others))
    for j, name in enumerate(others):
        xs, ys, lo, hi = [], [], [], []
        for i, organ in enumerate(organs):
            entry = result.organs[organ].patient.runs.get(name)
            vs = None if entry is None else entry.vs_baseline
            if vs is None or not np.isfinite(vs.delta):
                continue
            xs.append(i + (j - (len(others) - 1) / 2) * width)
            ys.append(vs.delta)
            low = vs.ci_low if np.isfinite(vs.ci_low) else vs.delta
            high = vs.ci_high if np.isfinite(vs.ci_high) else vs.delta
            lo.append(vs.delta - low)
            hi.append(high - vs.delta)
        ax.bar(xs, ys, width=width * 0.9, label=name, yerr=[lo, hi], capsize=3, alpha=0.85)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(organs)))
    ax.set_xticklabels(organs)
    ax.set_ylabel(f"AUC - AUC({result.baseline})")
    ax.set_title("Patient-level AUC change vs baseline (patient-bootstrap CI, Holm-matched level)", fontsize=10)
    if others:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_plots(result: Comparison, out_dir: Path) -> dict[str, Path]:
    """Write every figure of a comparison; returns {figure name: PNG path}."""
    images = {}
    for organ, organ_result in result.organs.items():
        images[f"roc_{organ}"] = plot_roc(organ, organ_result, out_dir / f"roc_{organ}.png")
    images["auc_delta"] = plot_deltas(result, out_dir / "auc_delta.png")
    return images
