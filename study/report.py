"""The study report: per organ, AUC against synthetic ratio and against real-data fraction (PNG),
the table of every arm, and the Holm-corrected verdicts of the primary comparisons.

Rendered from a :class:`~study.collect.StudyResult` into ``report.md`` and a self-contained
``report.html`` (plots embedded) by the block renderer of :mod:`eval.report`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from eval.report import Block, render_html, render_markdown
from study.collect import STUDY_JSON, Interval, OrganResult, StudyResult, collect_study
from study.run import open_study
from toolkit.config import Config
from toolkit.reporting import Reporter
from toolkit.workspace import Workspace

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "n/a" if p is None or not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _level(level: float) -> str:
    return f"{100 * level:.4g}%"


def _interval(iv: Interval, signed: bool = False) -> str:
    est = f"{iv.estimate:+.3f}" if signed and math.isfinite(iv.estimate) else _f(iv.estimate)
    return f"{est} [{_f(iv.low)}, {_f(iv.high)}]"


# ------------------------------------------------------------------ figures
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _line(ax, xs: list[float], ivs: list[Interval], label: str, color: str) -> None:
    est = np.array([iv.estimate for iv in ivs], dtype=float)
    low = np.array([iv.low if math.isfinite(iv.low) else iv.estimate for iv in ivs], dtype=float)
    high = np.array([iv.high if math.isfinite(iv.high) else iv.estimate for iv in ivs], dtype=float)
    ax.plot(xs, est, "-o", color=color, label=label, linewidth=1.6, markersize=4)
    ax.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)


def plot_auc_vs_ratio(result: StudyResult, organ: OrganResult, path: Path) -> Path:
    """Patient-level AUC against synthetic ratio, one line per real-data fraction (one panel per generator)."""
    generators = sorted({(a.mode, a.backend) for a in organ.arms if a.ratio > 0})
    fig = _figure(4.6 * len(generators), 4.0)
    for j, (mode, backend) in enumerate(generators):
        ax = fig.add_subplot(1, len(generators), j + 1)
        for k, (fraction, n) in enumerate(result.fractions.items()):
            arms = [a for a in organ.arms if f"{a.fraction:g}" == fraction
                    and (a.ratio == 0 or (a.mode, a.backend) == (mode, backend))]
            arms.sort(key=lambda a: a.ratio)
            _line(ax, [a.ratio for a in arms], [a.auc for a in arms], f"fraction {fraction} ({n} patients)", f"C{k}")
        ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("synthetic ratio r (0 = control)")
        ax.set_ylabel("test AUC, patient level (mean over seeds)")
        ax.set_title(f"{organ.organ}: {mode} / {backend}", fontsize=10)
        ax.legend(fontsize=7, title=f"band: {_level(result.ci)} interval", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_auc_vs_fraction(result: StudyResult, organ: OrganResult, path: Path) -> Path:
    """Patient-level AUC against real-data fraction: the control and each synthetic arm."""
    fig = _figure(5.4, 4.0)
    ax = fig.add_subplot()
    kinds = list(dict.fromkeys(a.kind for a in organ.arms))
    for k, kind in enumerate(kinds):
        arms = sorted((a for a in organ.arms if a.kind == kind), key=lambda a: a.fraction)
        _line(ax, [a.fraction for a in arms], [a.auc for a in arms], kind, "black" if kind == "control" else f"C{k}")
    ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("real-data fraction (share of training patients)")
    ax.set_ylabel("test AUC, patient level (mean over seeds)")
    ax.set_title(f"{organ.organ}: AUC against real-data size", fontsize=10)
    ax.legend(fontsize=7, title=f"band: {_level(result.ci)} interval", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_plots(result: StudyResult, out_dir: Path) -> dict[str, Path]:
    """Both curves of every organ; returns {figure name: PNG path}."""
    images = {}
    for organ in result.organs.values():
        images[f"ratio_{organ.organ}"] = plot_auc_vs_ratio(result, organ, out_dir / f"auc_vs_ratio_{organ.organ}.png")
        images[f"fraction_{organ.organ}"] = plot_auc_vs_fraction(
            result, organ, out_dir / f"auc_vs_fraction_{organ.organ}.png")
    return images


# ------------------------------------------------------------------ text
METHODS = (
    "Every arm trained {seeds} classifier(s) per organ (seeds {seed_list}) under the same {folds}-fold "
    "cross-validation and was scored on the same held-out test patients (fold-ensemble patient scores). A "
    "real-data fraction is a nested, patient-level subset of the training patients, stratified by fold and "
    "injury, the same for every arm and organ; it restricts training and validation folds alike, and each "
    "fraction's generator trained on that subset only. The control at a fraction (r = 0) trains on exactly "
    "those patients for the same number of samples. An arm's AUC is the mean over seeds of the patient-level "
    "test AUC; its interval adds two variances, the patient-bootstrap variance of the seed mean ({boot} "
    "resamples, shared by every model of an organ) and the seed-to-seed variance / seeds (pooled over the arms "
    "of an organ at one fraction), as mean +/- sqrt(z^2 v_patients + t^2 v_seeds) with t on the pooled seed "
    "variance's degrees of freedom (Banerjee's interval: never narrower than its level says). A change is the "
    "mean over seeds of AUC(arm) - AUC(control), with the same construction (seed part doubled). "
    "Verdicts are given only for the {m} primary comparison(s) declared in study.yaml before any job ran, and "
    "are corrected for multiplicity with Holm's step-down procedure across organs x primary arms, keeping the "
    "chance of any false verdict at or below {alpha}: 'improved' ('worse') needs the Holm-adjusted p < {alpha} "
    "and the interval at the level that comparison was tested at (the 'level' column) entirely above (below) 0. "
    "Everything else (other arms, other fractions, the curves, slice-level AUCs) is descriptive: it carries no "
    "verdict, whatever its interval or unadjusted p shows. 'realism AUC' is the arm's synthetic set's own audit "
    "(lesion sets): a small network trained to tell its synthetic injured crops from real injured ones, "
    "cross-validated by patient (0.5 = indistinguishable)."
)


def _arm_rows(result: StudyResult, organ: OrganResult) -> list[list[str]]:
    rows = []
    for a in sorted(organ.arms, key=lambda a: (-a.fraction, a.kind != "control", a.kind)):
        fraction = f"{a.fraction:g} ({result.fractions[f'{a.fraction:g}']})"
        rows.append([fraction, a.kind, ", ".join(_f(v) for v in a.auc.per_seed), _f(a.auc.estimate),
                     _f(a.auc.sd_seeds), f"[{_f(a.auc.low)}, {_f(a.auc.high)}]",
                     "control" if a.vs_control is None else _interval(a.vs_control, signed=True),
                     "" if a.p is None else _p(a.p), "" if a.realism_auc is None else _f(a.realism_auc),
                     _f(a.slice_auc)])
    return rows


def build_blocks(result: StudyResult, images: dict[str, Path]) -> list[Block]:
    """The report as blocks (:func:`eval.report.render_html` and ``render_markdown`` render them)."""
    first = next(iter(result.organs.values()))
    fractions = ", ".join(f"{f} ({n} patients)" for f, n in result.fractions.items())
    blocks: list[Block] = [
        ("h1", f"Study '{result.name}': synthetic share and real-data size"),
        ("p", f"Organs: {', '.join(result.organs)}. Real-data fractions: {fractions}. Synthetic ratios: "
              f"{', '.join(f'{r:g}' for r in result.ratios)}. Training seeds per arm: {len(result.seeds)}. "
              f"Test set: {first.n_test_patients} patients, the same for every arm."),
    ]
    for note in result.notes:
        blocks.append(("warn", note))
    low = [o for o in result.organs.values() if o.low_power]
    for organ in low:
        blocks.append(("warn", organ.note))

    blocks.append(("h2", "Primary comparisons (the only verdicts)"))
    blocks.append(("p", f"{result.family_size} comparison(s) declared in study.yaml before any job ran, each a "
                        f"synthetic arm against the control at its real-data fraction, corrected for multiplicity "
                        f"with {result.multiplicity}'s procedure across organs x arms (family-wise error rate "
                        f"<= {result.alpha:g}). Each interval has the level its comparison was tested at."))
    rows = [[p.organ, p.arm, p.control, _interval(p.delta, signed=True), _level(p.delta.level), _p(p.p),
             _p(p.p_holm), p.verdict] for p in result.primary]
    blocks.append(("table", ["organ", "arm", "vs control", "Δ AUC, mean over seeds [interval]", "level", "p",
                             "p (Holm)", "verdict"], rows))

    for organ in result.organs.values():
        blocks.append(("h2", organ.organ))
        blocks.append(("p", f"Test set: {organ.n_test_patients} patients ({organ.n_injured} injured)."))
        if organ.note:
            blocks.append(("warn", organ.note))
        blocks.append(("img", f"ratio_{organ.organ}", f"{organ.organ}: AUC against synthetic ratio"))
        blocks.append(("img", f"fraction_{organ.organ}", f"{organ.organ}: AUC against real-data fraction"))
        blocks.append(("h3", "Every arm (descriptive)"))
        level = _level(result.ci)
        blocks.append(("table", ["fraction (patients)", "arm", "AUC per seed", "mean AUC", "SD over seeds",
                                 f"{level} interval", f"Δ vs control [{level}, descriptive]",
                                 "p (unadjusted)", "realism AUC", "slice AUC (descriptive)"],
                       _arm_rows(result, organ)))
    blocks.append(("h2", "Methods"))
    blocks.append(("p", METHODS.format(seeds=len(result.seeds), seed_list=", ".join(map(str, result.seeds)),
                                       folds=result.folds, boot=result.bootstrap, m=result.family_size,
                                       alpha=f"{result.alpha:g}")))
    blocks.append(("h2", "Caveats"))
    blocks.append(("li", "A generator is trained once per organ, mode, backend and fraction (with the study's seed): "
                         "the seeds vary the classifiers, not the generators, so generator-to-generator variation "
                         "is not in the intervals."))
    blocks.append(("li", "Patient scores are slice aggregates; the intervals assume test patients are a random "
                         "sample of the population the claim is about."))
    return blocks


def write_report(result: StudyResult, out_dir: Path) -> Path:
    """``study.json``, both curves per organ, ``report.md`` and ``report.html`` in ``out_dir``; returns the HTML."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.write_json(out_dir / STUDY_JSON)
    images = write_plots(result, out_dir)
    blocks = build_blocks(result, images)
    (out_dir / REPORT_MD).write_text(render_markdown(blocks, images))
    html = out_dir / REPORT_HTML
    html.write_text(render_html(blocks, images, title=f"toolkit study {result.name}"))
    return html



def collect_and_report(ws: Workspace, cfg: Config, reporter: Reporter | None = None) -> tuple[StudyResult, Path]:
    """``toolkit study --collect``: finish the runs, compute the figures, write ``studies/<name>/report/``.

    Returns
    -------
    result : StudyResult
    html : Path
        The report page.
    """
    study = open_study(ws, cfg, reporter=reporter)
    result = collect_study(ws, study, reporter)
    return result, write_report(result, study.folder.report_dir)
