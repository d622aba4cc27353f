"""``toolkit study --collect``: check every job is done, finish the runs, compute the study's figures.

Per organ, every run's patient-level test scores are read from its ``test_patients.csv``
(:mod:`toolkit.artifacts.run`); all models of an organ are bootstrapped on the same patient
resamples, and each arm gets its mean AUC over seeds with an interval that includes the test
patients and the seed-to-seed variation (:mod:`study.stats`). Only the primary comparisons,
declared in ``study.yaml`` before any job ran, get a p-value and a verdict: Holm-adjusted across
organs x primary arms (:mod:`eval.multiplicity`), each with its interval at the level it was tested
at. Every other difference is descriptive. The result is :class:`StudyResult` (``study.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval import metrics
from eval.compare import verdict
from eval.multiplicity import METHOD, holm
from study.plan import Arm, primary_arms, run_name, study_arms, training_seeds
from study.run import Study, run_config
from study.stats import SeedMean, bootstrap_models, per_seed_aucs, pooled_seed_variance, seed_mean_auc, seed_mean_delta
from toolkit.artifacts.comparison import json_safe
from toolkit.artifacts.run import RunFolder, test_slice_keys
from toolkit.errors import ToolkitError
from toolkit.reporting import Reporter, as_reporter
from toolkit.workspace import Workspace

STUDY_JSON = "study.json"
NO_VERDICT_ONE_SEED = "no verdict (one seed)"


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


@dataclass
class Interval:
    """A mean over seeds with its interval (:class:`study.stats.SeedMean` at one level)."""

    estimate: float
    low: float
    high: float
    level: float
    sd_seeds: float  # spread of the per-seed values (NaN with one seed)
    se_patients: float
    se_seeds: float
    df: float  # degrees of freedom of the seed part (inf: one seed, none)
    per_seed: list[float]

    @classmethod
    def of(cls, mean: SeedMean, level: float, bounds: tuple[float, float] = (-1.0, 1.0)) -> Interval:
        """``mean`` at ``level``, the interval clipped to ``bounds`` (an AUC lies in [0, 1], a change in [-1, 1])."""
        low, high = (float(np.clip(v, *bounds)) if math.isfinite(v) else v for v in mean.interval(level))
        return cls(mean.estimate, low, high, level, mean.sd_seeds, math.sqrt(max(mean.var_patients, 0.0)),
                   math.sqrt(mean.var_seeds), mean.df, [float(v) for v in mean.per_seed])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Interval:
        return cls(_nan(d["estimate"]), _nan(d["low"]), _nan(d["high"]), float(d["level"]), _nan(d["sd_seeds"]),
                   _nan(d["se_patients"]), _nan(d["se_seeds"]), _nan(d["df"]) if d["df"] is not None else math.inf,
                   [_nan(v) for v in d["per_seed"]])


@dataclass
class ArmResult:
    """One arm of one organ: AUC over seeds, and (synthetic arms) the descriptive change vs its control."""

    arm: str  # Arm.name
    kind: str  # Arm.kind: the curve it belongs to
    fraction: float
    ratio: float
    mode: str | None
    backend: str | None
    runs: list[str]
    auc: Interval  # patient level, at eval.ci
    slice_auc: float  # mean over seeds of the slice-level AUC (descriptive)
    vs_control: Interval | None = None  # descriptive, at eval.ci
    p: float | None = None  # of vs_control, unadjusted (descriptive unless the arm is a primary comparison)
    realism_auc: float | None = None  # the synthetic set's real-vs-synthetic two-sample AUC (audit.json), if any

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArmResult:
        vs = d.get("vs_control")
        return cls(d["arm"], d["kind"], float(d["fraction"]), float(d["ratio"]), d.get("mode"), d.get("backend"),
                   list(d["runs"]), Interval.from_dict(d["auc"]), _nan(d["slice_auc"]),
                   None if vs is None else Interval.from_dict(vs),
                   None if d.get("p") is None else _nan(d["p"]),
                   None if d.get("realism_auc") is None else _nan(d["realism_auc"]))


@dataclass
class PrimaryResult:
    """One declared comparison: an arm vs its control for one organ, with its Holm verdict."""

    organ: str
    arm: str
    control: str
    delta: Interval  # at the Holm-matched level
    p: float  # unadjusted
    p_holm: float
    verdict: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrimaryResult:
        return cls(d["organ"], d["arm"], d["control"], Interval.from_dict(d["delta"]), _nan(d["p"]),
                   _nan(d["p_holm"]), d["verdict"])


@dataclass
class OrganResult:
    """One organ: its test set and every arm."""

    organ: str
    n_test_patients: int
    n_injured: int
    low_power: bool
    note: str
    arms: list[ArmResult]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OrganResult:
        return cls(d["organ"], int(d["n_test_patients"]), int(d["n_injured"]), bool(d["low_power"]), d["note"],
                   [ArmResult.from_dict(a) for a in d["arms"]])


@dataclass
class StudyResult:
    """What a study found (``report/study.json``)."""

    name: str
    seeds: list[int]
    folds: int
    fractions: dict[str, int]  # fraction -> training patients
    ratios: list[float]
    alpha: float
    ci: float
    bootstrap: int
    multiplicity: str
    family_size: int
    organs: dict[str, OrganResult]
    primary: list[PrimaryResult]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyResult:
        return cls(
            name=d["name"], seeds=list(d["seeds"]), folds=int(d["folds"]), fractions=dict(d["fractions"]),
            ratios=[float(r) for r in d["ratios"]], alpha=float(d["alpha"]), ci=float(d["ci"]),
            bootstrap=int(d["bootstrap"]), multiplicity=d["multiplicity"], family_size=int(d["family_size"]),
            organs={o: OrganResult.from_dict(r) for o, r in d["organs"].items()},
            primary=[PrimaryResult.from_dict(p) for p in d["primary"]], notes=list(d.get("notes") or []),
        )

    def write_json(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(json_safe(self.to_dict()), indent=2))
        return Path(path)

    @classmethod
    def read_json(cls, path: Path) -> StudyResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------ finishing the runs
def unfinished_jobs(ws: Workspace, study: Study) -> list[str]:
    """Ids of training jobs whose fold has no test predictions yet."""
    missing = []
    for job in study.jobs:
        if job.kind == "train":
            folder = RunFolder(study.folder.workspace(ws, job.arm).run_dir(job.run))
            if not folder.fold(job.organ, job.fold).done:
                missing.append(job.id)
    return missing


def finish_runs(ws: Workspace, study: Study, reporter: Reporter | None = None) -> None:
    """Write every run's organ tables and completion flag once all of its folds are trained.

    :func:`train.run.train_run` with ``resume=True`` trains nothing when every fold is done and
    writes what a shard that finished the last fold may have raced another for.
    """
    from train.run import train_run

    missing = unfinished_jobs(ws, study)
    if missing:
        total = sum(j.kind == "train" for j in study.jobs)
        raise ToolkitError(
            f"{len(missing)} of {total} training jobs of study '{study.cfg.study.name}' are not done (first: "
            f"{missing[0]}); run `toolkit study` (or the shards that hold them) again, then --collect"
        )
    for organ in study.cfg.study.organs:
        for arm in study_arms(study.cfg.study):
            for seed in training_seeds(study.cfg):
                sws = study.folder.workspace(ws, arm)
                name = run_name(organ, arm, seed)
                if RunFolder(sws.run_dir(name)).state() != "complete":
                    train_run(sws, run_config(study.cfg, arm, seed), name=name, organs=[organ], resume=True,
                              train_patients=study.patients(arm.fraction), reporter=reporter)


# ------------------------------------------------------------------ figures
def _scores(folder: RunFolder, organ: str, table: str, keys: list[str], reference: pd.DataFrame) -> np.ndarray:
    """``prob`` of ``table`` aligned to ``reference``'s rows; refuses other patients or labels."""
    frame = folder.read_table(organ, table)
    merged = reference.merge(frame, on=keys, how="left", suffixes=("", "_run"))
    if len(frame) != len(reference) or merged["prob"].isna().any() \
            or not np.array_equal(merged["label"].to_numpy(), merged["label_run"].to_numpy()):
        raise ToolkitError(f"run {folder.path} was tested on other {organ} patients or labels than the study's "
                           "other runs; was the store re-prepared? pass --force to start the study over")
    return merged["prob"].to_numpy(np.float64)


def _realism_auc(synthetic_dir: Path) -> float | None:
    """The realism two-sample AUC a synthetic set's audit recorded (lesion mode), else None."""
    path = synthetic_dir / "audit.json"
    if not path.exists():
        return None
    auc = (json.loads(path.read_text()).get("realism") or {}).get("auc")
    return None if auc is None else float(auc)


def collect_study(ws: Workspace, study: Study, reporter: Reporter | None = None) -> StudyResult:
    """Finish the runs and compute every figure of the study (see module docstring).

    Raises
    ------
    ToolkitError
        A training job is not done yet (naming it), or runs were tested on different patients.
    """
    finish_runs(ws, study, reporter)
    cfg = study.cfg
    ev, design = cfg.eval, cfg.study
    seeds = training_seeds(cfg)
    arms = study_arms(design)
    organs: dict[str, OrganResult] = {}
    deltas: dict[tuple[str, str], SeedMean] = {}
    for i, organ in enumerate(design.organs):
        runs = {(arm.name, seed): RunFolder(study.folder.workspace(ws, arm).run_dir(run_name(organ, arm, seed)))
                for arm in arms for seed in seeds}
        first = next(iter(runs.values()))
        patients = first.read_table(organ, "test_patients").sort_values("patient_id")[["patient_id", "label"]]
        slice_tables = [folder.read_table(organ, "test_slices") for folder in runs.values()]
        slice_keys = test_slice_keys(*slice_tables)
        slices = slice_tables[0].sort_values(slice_keys)[[*slice_keys, "label"]]
        y = patients["label"].to_numpy().astype(np.int64)
        y_slice = slices["label"].to_numpy().astype(np.int64)
        models = [(arm.name, seed) for arm in arms for seed in seeds]
        scores = np.stack([_scores(runs[m], organ, "test_patients", ["patient_id"], patients) for m in models])
        boot = bootstrap_models(y, scores, ev.bootstrap, cfg.seed + 1000 * i)  # one resample set per organ: paired
        rows = {m: j for j, m in enumerate(models)}
        of_arm = {arm.name: [rows[(arm.name, s)] for s in seeds] for arm in arms}
        aucs = {name: per_seed_aucs(y, scores[index]) for name, index in of_arm.items()}
        arm_boot = {name: boot[index] for name, index in of_arm.items()}
        pooled = {f: pooled_seed_variance([aucs[a.name] for a in arms if a.fraction == f]) for f in design.fractions}

        results = []
        for arm in arms:
            slice_aucs = [metrics.auc(y_slice, _scores(runs[(arm.name, s)], organ, "test_slices", slice_keys, slices))
                          for s in seeds]
            vs_control, p, realism = None, None, None
            if not arm.is_control:
                control = arm.control()
                mean = seed_mean_delta(aucs[arm.name], aucs[control.name], arm_boot[arm.name],
                                       arm_boot[control.name], pooled[arm.fraction])
                deltas[(organ, arm.name)] = mean
                vs_control, p = Interval.of(mean, ev.ci), mean.p_value()
                realism = _realism_auc(study.folder.workspace(ws, arm).synthetic_dir(organ))
            results.append(ArmResult(
                arm=arm.name, kind=arm.kind, fraction=arm.fraction, ratio=arm.ratio, mode=arm.mode,
                backend=arm.backend, runs=[run_name(organ, arm, s) for s in seeds],
                auc=Interval.of(seed_mean_auc(aucs[arm.name], arm_boot[arm.name], pooled[arm.fraction]), ev.ci,
                                bounds=(0.0, 1.0)),
                slice_auc=float(np.mean(slice_aucs)), vs_control=vs_control, p=p, realism_auc=realism,
            ))
        n_pos = int(y.sum())
        low = n_pos < ev.min_positives
        organs[organ] = OrganResult(
            organ=organ, n_test_patients=len(y), n_injured=n_pos, low_power=low,
            note=(f"only {n_pos} injured test patient(s) of {organ} (fewer than {ev.min_positives}): intervals "
                  "cover less often than their level says and the comparisons have little power") if low else "",
            arms=results,
        )

    primary = primary_comparisons(deltas, design.organs, primary_arms(design), ev.alpha, len(seeds))
    notes = []
    if len(seeds) < 2:
        notes.append("one training seed per arm: intervals leave out retraining noise and no verdict is given; "
                     "set study.repeats >= 2")
    as_reporter(reporter).info(f"study '{design.name}': {len(primary)} primary comparison(s), Holm-corrected")
    return StudyResult(
        name=design.name, seeds=seeds, folds=study.n_folds,
        fractions={f"{f:g}": len(study.patients(f)) for f in design.fractions}, ratios=list(design.ratios),
        alpha=ev.alpha, ci=ev.ci, bootstrap=ev.bootstrap, multiplicity=METHOD, family_size=len(primary),
        organs=organs, primary=primary, notes=notes,
    )


def primary_comparisons(deltas: dict[tuple[str, str], SeedMean], organs: list[str], arms: list[Arm], alpha: float,
                        n_seeds: int) -> list[PrimaryResult]:
    """Holm across organs x primary arms: adjusted p-values, matched-level intervals and verdicts.

    Parameters
    ----------
    deltas : dict
        (organ, arm name) -> the arm's change vs its control (:func:`study.stats.seed_mean_delta`).
    n_seeds : int
        With fewer than two, every verdict is withheld (retraining noise cannot be told from a change).
    """
    family = [(organ, arm) for organ in organs for arm in arms]
    result = holm([deltas[(organ, arm.name)].p_value() for organ, arm in family], alpha)
    out = []
    for (organ, arm), p_holm, level in zip(family, result.adjusted, result.levels, strict=True):
        mean = deltas[(organ, arm.name)]
        interval = Interval.of(mean, float(level))
        decided = verdict(interval.low, interval.high, float(p_holm), alpha)
        out.append(PrimaryResult(organ=organ, arm=arm.name, control=arm.control().name, delta=interval,
                                 p=mean.p_value(), p_holm=float(p_holm),
                                 verdict=decided if n_seeds >= 2 else NO_VERDICT_ONE_SEED))
    return out
