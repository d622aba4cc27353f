"""``toolkit compare``: did synthetic data change test AUC, beyond chance?

Every run is scored on the same held-out test patients (checked: same split
hash, same patients, same labels). Per organ and per run we compute at patient
level (the headline) and at slice level:

* AUC with a percentile bootstrap CI that resamples patients;
* the change vs the real-only baseline: paired DeLong test and a paired
  patient bootstrap CI of the difference;
* the full-sensitivity operating point (the original study's) and Youden's point;
* the mean AUC of single fold models vs the fold-ensemble AUC;
* the RSNA 2023 weighted log loss on the label groups the run can score.

A verdict is never read off a point estimate: "improved" needs the delta CI
above 0 *and* p < alpha, "worse" the mirror image, otherwise "no evidence of change".
Verdicts are given at patient level only, Holm-adjusted across every organ x compared
run (:mod:`eval.multiplicity`): the p-value is Holm's adjusted one and the delta CI is
computed at the level that comparison was tested at. Slice-level deltas are descriptive.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval import metrics
from eval.multiplicity import METHOD, holm
from eval.runs import Run, list_runs, load_run, settings_mismatch
from toolkit import ORGANS
from toolkit.artifacts.comparison import (
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    AUCInterval,
    Comparison,
    Delta,
    EvalSettings,
    GeneratorRecord,
    LevelComparison,
    LogLoss,
    OrganComparison,
    Roc,
    RunRecord,
    RunScores,
)
from toolkit.artifacts.run import RunFolder, test_slice_keys
from toolkit.config import Config, save_config
from toolkit.errors import ToolkitError
from toolkit.workspace import Workspace

IMPROVED = "improved"
WORSE = "worse"
NO_EVIDENCE = "no evidence of change"
DESCRIPTIVE = "descriptive"  # the verdict field of figures that are not tested (slice level)


def verdict(delta_low: float, delta_high: float, p: float, alpha: float) -> str:
    """Plain-language verdict from the paired-bootstrap CI of the delta and the DeLong p-value.

    ``"improved"`` when the whole CI is above 0 and ``p < alpha``; ``"worse"`` when
    it is below 0 and ``p < alpha``; otherwise ``"no evidence of change"`` (also
    when either figure is NaN).
    """
    if not (np.isfinite(delta_low) and np.isfinite(delta_high) and np.isfinite(p)):
        return NO_EVIDENCE
    if delta_low > 0 and p < alpha:
        return IMPROVED
    if delta_high < 0 and p < alpha:
        return WORSE
    return NO_EVIDENCE


@dataclass
class LevelScores:
    """Labels, scores and resampling groups of one run, organ and level, aligned across runs."""

    y: np.ndarray
    prob: np.ndarray
    groups: np.ndarray
    fold_aucs: list[float] = field(default_factory=list)


def _fmt_hashes(runs: list[Run]) -> str:
    return ", ".join(f"{r.name}={r.info.split_hash}" for r in runs)


def select_runs(ws: Workspace, baseline: str, runs: list[str] | None) -> tuple[list[Run], list[str]]:
    """The baseline first, then the other runs; returns (runs, notes about skipped runs)."""
    notes: list[str] = []
    if not RunFolder(ws.run_dir(baseline)).exists:
        raise ToolkitError(
            f"baseline run '{baseline}' not found in {ws.runs_dir}; create it with "
            f"`toolkit train --synthetic-ratio 0 --name {baseline}` (or pass --baseline NAME)"
        )
    if runs:
        names = [baseline] + [n for n in dict.fromkeys(runs) if n != baseline]
    else:
        names = [baseline] + [n for n in list_runs(ws) if n != baseline]
        partial = [n for n in list_runs(ws, complete_only=False) if n not in names]
        if partial:
            notes.append(f"skipped incomplete run(s): {', '.join(partial)} (finish with `toolkit train --resume`)")
    loaded = [load_run(ws, n) for n in names]
    for run in loaded:
        if not run.complete:
            raise ToolkitError(
                f"run '{run.name}' is incomplete (run.json complete=false); finish it with "
                f"`toolkit train --name {run.name} --resume` before comparing"
            )
    if len(loaded) < 2:
        raise ToolkitError(
            f"nothing to compare: only the baseline '{baseline}' was found or selected in {ws.runs_dir}; "
            "train a synthetic run, e.g. `toolkit train --synthetic-ratio 0.5`, or pass --runs NAME"
        )
    return loaded, notes


def check_comparable(runs: list[Run], allow_mismatch: bool = False) -> dict[str, dict[str, Any]]:
    """Refuse runs on different splits; refuse (or with ``allow_mismatch``, return) differing settings."""
    hashes = {r.info.split_hash for r in runs}
    if len(hashes) > 1 or None in hashes:
        raise ToolkitError(
            f"runs were trained on different patient splits (split_hash {_fmt_hashes(runs)}); "
            "retrain them on the same store"
        )
    mismatch = settings_mismatch(runs)
    if mismatch and not allow_mismatch:
        parts = "; ".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in vals.items()) for k, vals in mismatch.items())
        raise ToolkitError(
            f"runs differ in more than the synthetic data ({parts}); retrain with identical settings "
            "or pass --allow-mismatch to compare anyway (recorded in the report)"
        )
    return mismatch


def _fold_columns(df: pd.DataFrame) -> list[str]:
    cols = [c for c in df.columns if c.startswith("prob_fold_")]
    return sorted(cols, key=lambda c: int(c.rsplit("_", 1)[1]))


def load_level_scores(runs: list[Run], organ: str) -> dict[str, dict[str, LevelScores]]:
    """Patient- and slice-level scores of every run for ``organ``, aligned to the baseline's rows.

    Raises ToolkitError when runs were tested on different patients/slices or labels.
    """
    base = runs[0]
    out: dict[str, dict[str, LevelScores]] = {"patient": {}, "slice": {}}
    ref_p = base.table(organ, "test_patients").sort_values("patient_id").reset_index(drop=True)
    ref_s = base.table(organ, "test_slices")
    keys = test_slice_keys(ref_s, *(run.table(organ, "test_slices") for run in runs))
    ref_s = ref_s.sort_values(keys).reset_index(drop=True)
    for run in runs:
        tp = run.table(organ, "test_patients")
        if set(tp["patient_id"]) != set(ref_p["patient_id"]) or len(tp) != len(ref_p):
            only_a = len(set(ref_p["patient_id"]) - set(tp["patient_id"]))
            only_b = len(set(tp["patient_id"]) - set(ref_p["patient_id"]))
            raise ToolkitError(
                f"runs '{base.name}' and '{run.name}' were tested on different patients for {organ} "
                f"({only_a} only in '{base.name}', {only_b} only in '{run.name}'); retrain on the same store"
            )
        tp = ref_p[["patient_id"]].merge(tp, on="patient_id", how="left")
        if not np.array_equal(tp["label"].to_numpy(), ref_p["label"].to_numpy()):
            raise ToolkitError(
                f"runs '{base.name}' and '{run.name}' disagree on {organ} test labels; retrain on the same store"
            )
        y = tp["label"].to_numpy().astype(np.int64)
        fold_aucs = [metrics.auc(y, tp[c].to_numpy()) for c in _fold_columns(tp)]
        out["patient"][run.name] = LevelScores(y, tp["prob"].to_numpy(float), tp["patient_id"].to_numpy(), fold_aucs)

        ts = run.table(organ, "test_slices")
        merged = ref_s[keys + ["label"]].merge(ts, on=keys, how="left", suffixes=("", "_run"))
        if len(ts) != len(ref_s) or merged["prob"].isna().any():
            raise ToolkitError(
                f"runs '{base.name}' and '{run.name}' were tested on different {organ} slices "
                f"({len(ref_s)} vs {len(ts)} rows in test_slices.csv); retrain on the same store"
            )
        y_s = merged["label"].to_numpy().astype(np.int64)
        folds = run.table(organ, "test_folds", required=False)
        slice_fold_aucs = []
        if folds is not None:
            for _, part in folds.groupby("fold"):
                slice_fold_aucs.append(metrics.auc(part["label"].to_numpy(), part["prob"].to_numpy(float)))
        out["slice"][run.name] = LevelScores(
            y_s, merged["prob"].to_numpy(float), merged["patient_id"].to_numpy(), slice_fold_aucs
        )
    return out


def score_level(
    scores: dict[str, LevelScores],
    baseline: str,
    level: str,
    cfg: Config,
    seed: int,
    on_run: Callable[[str], None] | None = None,
) -> LevelComparison:
    """Every figure of one organ at one level, for every run (baseline first).

    The verdicts are the unadjusted rule at the nominal level; :func:`adjust_verdicts` replaces the
    patient-level ones by Holm's across organs and runs and marks the slice level descriptive.
    ``on_run(name)`` is called after each run is scored (progress reporting).
    """
    ev = cfg.eval
    base = scores[baseline]
    groups = None if level == "patient" else base.groups
    y = base.y
    reason = metrics.undefined_auc_reason(y)
    runs_out: dict[str, RunScores] = {}
    for name, sc in scores.items():
        ci = metrics.bootstrap_auc_ci(y, sc.prob, groups, ev.bootstrap, ev.ci, seed)
        _, var = metrics.delong_roc_variance(y, sc.prob)
        finite_folds = [a for a in sc.fold_aucs if np.isfinite(a)]
        fpr, tpr, _ = metrics.roc_curve(y, sc.prob)
        entry = RunScores(
            auc=AUCInterval(**ci.to_dict()),
            auc_reason=reason,
            delong_se=float(np.sqrt(var)) if np.isfinite(var) else float("nan"),
            fold_aucs=[float(a) for a in sc.fold_aucs],
            mean_fold_auc=float(np.mean(finite_folds)) if finite_folds else float("nan"),
            full_sensitivity=metrics.operating_point_full_sensitivity(y, sc.prob),
            youden=metrics.youden_point(y, sc.prob),
            roc=Roc(fpr.tolist(), tpr.tolist()),
        )
        if name != baseline:
            test = metrics.delong_paired_test(y, base.prob, sc.prob)
            dci = metrics.bootstrap_auc_delta_ci(y, base.prob, sc.prob, groups, ev.bootstrap, ev.ci, seed)
            entry.vs_baseline = Delta(
                delta=test.delta,
                ci_low=dci.low,
                ci_high=dci.high,
                se=test.se,
                z=test.z,
                p=test.p,
                n_valid_boot=dci.n_valid,
                verdict=verdict(dci.low, dci.high, test.p, ev.alpha),
                ci_level=ev.ci,
            )
        runs_out[name] = entry
        if on_run is not None:
            on_run(name)
    return LevelComparison(
        n=int(len(y)), n_positive=int(y.sum()), n_patients=int(len(np.unique(base.groups))), runs=runs_out
    )


def adjust_verdicts(
    organs: dict[str, OrganComparison],
    patient_scores: dict[str, dict[str, LevelScores]],
    baseline: str,
    cfg: Config,
    seeds: dict[str, int],
) -> None:
    """Holm across every organ x compared run at patient level; slice-level verdicts become descriptive.

    Each patient-level delta gets Holm's adjusted p-value, a paired-bootstrap CI at the level it was
    tested at (``1 - alpha_j``, :func:`eval.multiplicity.holm`) and the verdict of :func:`verdict` on those.

    Parameters
    ----------
    organs : dict
        organ -> its comparison from :func:`score_level` (changed in place).
    patient_scores : dict
        organ -> run -> the patient-level scores the comparison was computed from.
    seeds : dict
        organ -> the bootstrap seed its comparison used (the same resamples, other quantiles).
    """
    ev = cfg.eval
    family = [(organ, name) for organ, res in organs.items() for name, e in res.patient.runs.items()
              if e.vs_baseline is not None]
    result = holm([organs[o].patient.runs[n].vs_baseline.p for o, n in family], ev.alpha)
    for (organ, name), p_adjusted, level in zip(family, result.adjusted, result.levels, strict=True):
        vs = organs[organ].patient.runs[name].vs_baseline
        base, run = patient_scores[organ][baseline], patient_scores[organ][name]
        dci = metrics.bootstrap_auc_delta_ci(base.y, base.prob, run.prob, None, ev.bootstrap, float(level),
                                             seeds[organ])
        vs.ci_low, vs.ci_high, vs.n_valid_boot = dci.low, dci.high, dci.n_valid
        vs.ci_level, vs.p_adjusted = float(level), float(p_adjusted)
        vs.verdict = verdict(dci.low, dci.high, float(p_adjusted), ev.alpha)
    for res in organs.values():
        for entry in res.slice.runs.values():
            if entry.vs_baseline is not None:
                entry.vs_baseline.verdict = DESCRIPTIVE


def rsna_scores(runs: list[Run], organs: list[str]) -> dict[str, LogLoss]:
    """RSNA weighted log loss per run on the patients every compared organ was tested on."""
    out = {}
    for run in runs:
        grades, p_inj, p_graded = {}, {}, {}
        tables = {o: run.table(o, "test_patients").sort_values("patient_id") for o in organs if run.has_organ(o)}
        if not tables:
            continue
        common = sorted(set.intersection(*(set(t["patient_id"]) for t in tables.values())))
        for organ, df in tables.items():
            df = df.set_index("patient_id").loc[common]
            grades[organ] = df["grade"].to_numpy().astype(np.int64)
            p_inj[organ] = df["prob"].to_numpy(float)
            if {"prob_healthy", "prob_low", "prob_high"} <= set(df.columns):
                p_graded[organ] = df[["prob_healthy", "prob_low", "prob_high"]].to_numpy(float)
        out[run.name] = LogLoss(**metrics.rsna_weighted_log_loss(grades, p_inj, p_graded).to_dict())
    return out


def report_dir(ws: Workspace, name: str | None = None) -> Path:
    """The report folder ``reports/<name>/`` (default ``compare``) that :func:`compare_runs` writes."""
    return ws.reports_dir / (name or "compare")


def compare_runs(
    ws: Workspace,
    cfg: Config,
    runs: list[str] | None = None,
    out_name: str | None = None,
    force: bool = False,
    allow_mismatch: bool = False,
    progress: Any | None = None,
) -> Comparison:
    """Compare the baseline with synthetic runs and write the report folder ``report_dir(ws, out_name)``.

    Parameters
    ----------
    ws : Workspace
    cfg : Config
        ``cfg.eval`` gives baseline name, bootstrap resamples, CI level, alpha;
        ``cfg.seed`` seeds the bootstrap.
    runs : list of str, optional
        Runs to compare; the baseline is added first. Default: every complete run.
    out_name : str, optional
        Report folder name under ``reports/`` (default ``compare``).
    force : bool, default=False
        Replace an existing report folder.
    allow_mismatch : bool, default=False
        Compare runs whose settings differ in more than the synthetic data
        (the differences are recorded in the report).
    progress : rich.progress.Progress, optional
        Shows one step per organ, level (patient, slice) and run.

    Returns
    -------
    Comparison
        Every figure; the report folder holds it as report.json, rendered as report.md and
        report.html, with plots and config.yaml.
    """
    from eval import plots, report

    out_dir = report_dir(ws, out_name)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ToolkitError(
            f"report folder {out_dir} already exists; pass --force to replace it or --name to pick another"
        )
    selected, notes = select_runs(ws, cfg.eval.baseline, runs)
    mismatch = check_comparable(selected, allow_mismatch)
    baseline = selected[0]
    organs = [o for o in ORGANS if baseline.has_organ(o)]
    if not organs:
        raise ToolkitError(
            f"baseline run '{baseline.name}' has no organ with test_patients.csv; re-run `toolkit train`"
        )
    if baseline.synthetic_ratio > 0:
        notes.append(
            f"the baseline '{baseline.name}' itself trained with synthetic ratio {baseline.synthetic_ratio:g}; "
            "a real-only baseline needs `toolkit train --synthetic-ratio 0`"
        )
    for run in selected[1:]:
        missing = [o for o in organs if not run.has_organ(o)]
        if missing:
            notes.append(f"run '{run.name}' has no results for {', '.join(missing)}")

    steps = sum(2 * sum(r.has_organ(o) for r in selected) for o in organs)
    task = progress.add_task("bootstrap", total=steps) if progress is not None else None
    organ_results: dict[str, OrganComparison] = {}
    patient_scores: dict[str, dict[str, LevelScores]] = {}
    seeds = {organ: cfg.seed + 1000 * i for i, organ in enumerate(organs)}
    for organ in organs:
        present = [r for r in selected if r.has_organ(organ)]
        levels = load_level_scores(present, organ)
        scored: dict[str, LevelComparison] = {}
        for level in ("patient", "slice"):

            def advance(name: str, organ: str = organ, level: str = level) -> None:
                if progress is not None:
                    progress.update(task, advance=1, info=f"{organ} {level} {name}")

            # One seed per organ and level, shared by every run, so runs are paired.
            scored[level] = score_level(levels[level], baseline.name, level, cfg, seeds[organ], advance)
        patient_scores[organ] = levels["patient"]
        n_pos = scored["patient"].n_positive
        low_power = n_pos < cfg.eval.min_positives
        organ_results[organ] = OrganComparison(
            patient=scored["patient"],
            slice=scored["slice"],
            low_power=low_power,
            note=(f"only {n_pos} injured test patient(s): the comparison has little power and its intervals "
                  "cover less often than their level says") if low_power else "",
            # Runs match on these (``organs`` is a match key), so the baseline's stand for all.
            settings=baseline.organ_settings(organ),
            generators={
                r.name: GeneratorRecord(r.generator_id(organ), r.generator_summary(organ), r.generator_audit(organ))
                for r in present
                if r.name != baseline.name
            },
        )

    adjust_verdicts(organ_results, patient_scores, baseline.name, cfg, seeds)

    result = Comparison(
        baseline=baseline.name,
        runs={r.name: RunRecord.from_info(r.info) for r in selected},
        settings_mismatch=mismatch,
        notes=notes,
        eval=EvalSettings(
            bootstrap=cfg.eval.bootstrap,
            ci=cfg.eval.ci,
            alpha=cfg.eval.alpha,
            min_positives=cfg.eval.min_positives,
            seed=cfg.seed,
            multiplicity=METHOD,
        ),
        organs=organ_results,
        rsna_log_loss=rsna_scores(selected, organs),
    )

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    images = plots.write_plots(result, out_dir)
    result.write_json(out_dir / REPORT_JSON)
    report.write_markdown(result, out_dir / REPORT_MD, images)
    report.write_html(result, out_dir / REPORT_HTML, images)
    save_config(cfg, out_dir / "config.yaml")
    return result
