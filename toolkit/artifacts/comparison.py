"""The comparison result: what ``toolkit compare`` computes and :mod:`eval.report` renders.

:class:`Comparison` holds, per organ and per level (patient, slice), each run's AUC with its
bootstrap CI, operating points, fold AUCs and (for every run but the baseline) the change vs
the baseline with its CI, DeLong p-value and verdict; the settings the organ's classifiers
were trained with; the generator audits; and run-level records, notes and the RSNA log loss.
``report.json`` is :meth:`Comparison.to_dict` with NaN written as ``null``;
:meth:`Comparison.read_json` reads it back (``null`` -> NaN)::

    reports/<name>/report.json   Comparison.to_dict()
    reports/<name>/report.md     rendered by eval.report
    reports/<name>/report.html   the same, self-contained (plots embedded)
    reports/<name>/*.png         roc_<organ>.png, auc_delta.png
    reports/<name>/config.yaml   resolved config of the compare command
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from toolkit.artifacts.run import OrganSettings, RunInfo

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LEVELS = ("patient", "slice")


def _num(x: Any) -> float:
    """A float from JSON, where NaN was written as null."""
    return float("nan") if x is None else float(x)


def _nums(xs: list[Any]) -> list[float]:
    return [_num(x) for x in xs]


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, so the JSON is standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return json_safe(obj.item())
    return obj


@dataclass
class AUCInterval:
    """An AUC with its percentile bootstrap interval (``eval.metrics.BootstrapCI``)."""

    estimate: float
    low: float
    high: float
    ci: float  # confidence level
    n_boot: int
    n_valid: int  # resamples in which both classes were present
    unit: str  # what was resampled: "patient" or "row"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AUCInterval:
        return cls(_num(d["estimate"]), _num(d["low"]), _num(d["high"]), float(d["ci"]), int(d["n_boot"]),
                   int(d["n_valid"]), str(d["unit"]))


@dataclass
class OperatingPoint:
    """A decision threshold (injured when ``score >= threshold``) and its figures (``eval.metrics`` finds them)."""

    rule: str
    threshold: float
    sensitivity: float
    specificity: float
    accuracy: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OperatingPoint:
        return cls(str(d["rule"]), _num(d["threshold"]), _num(d["sensitivity"]), _num(d["specificity"]),
                   _num(d["accuracy"]))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Roc:
    """ROC curve points (false and true positive rates), in threshold order."""

    fpr: list[float]
    tpr: list[float]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Roc:
        return cls(_nums(d["fpr"]), _nums(d["tpr"]))


@dataclass
class Delta:
    """A run's AUC change vs the baseline: paired DeLong test, paired bootstrap CI, verdict.

    At patient level the verdict is Holm's across organs x runs: ``p_adjusted`` is the adjusted
    p-value and the CI has the level the comparison was tested at (``ci_level``). At slice level
    the figures are descriptive (verdict ``"descriptive"``, no adjusted p-value).
    """

    delta: float  # AUC(run) - AUC(baseline)
    ci_low: float
    ci_high: float
    se: float
    z: float
    p: float  # two-sided DeLong p-value, unadjusted
    n_valid_boot: int
    verdict: str  # "improved" | "worse" | "no evidence of change" | "descriptive" (eval.compare)
    ci_level: float = float("nan")  # confidence level of [ci_low, ci_high]
    p_adjusted: float = float("nan")  # Holm-adjusted p-value (patient level)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Delta:
        return cls(_num(d["delta"]), _num(d["ci_low"]), _num(d["ci_high"]), _num(d["se"]), _num(d["z"]),
                   _num(d["p"]), int(d["n_valid_boot"]), str(d["verdict"]), _num(d.get("ci_level")),
                   _num(d.get("p_adjusted")))


@dataclass
class RunScores:
    """One run's figures for one organ at one level; ``vs_baseline`` is None for the baseline."""

    auc: AUCInterval
    auc_reason: str | None  # why the AUC is undefined (one class only), else None
    delong_se: float
    fold_aucs: list[float]  # each fold model alone
    mean_fold_auc: float
    full_sensitivity: OperatingPoint
    youden: OperatingPoint
    roc: Roc
    vs_baseline: Delta | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunScores:
        vs = d.get("vs_baseline")
        return cls(
            auc=AUCInterval.from_dict(d["auc"]),
            auc_reason=d.get("auc_reason"),
            delong_se=_num(d["delong_se"]),
            fold_aucs=_nums(d["fold_aucs"]),
            mean_fold_auc=_num(d["mean_fold_auc"]),
            full_sensitivity=OperatingPoint.from_dict(d["full_sensitivity"]),
            youden=OperatingPoint.from_dict(d["youden"]),
            roc=Roc.from_dict(d["roc"]),
            vs_baseline=None if vs is None else Delta.from_dict(vs),
        )


@dataclass
class LevelComparison:
    """Every run's figures for one organ at one level (baseline first), on ``n`` test items."""

    n: int  # patients or slices scored
    n_positive: int
    n_patients: int
    runs: dict[str, RunScores]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LevelComparison:
        return cls(int(d["n"]), int(d["n_positive"]), int(d["n_patients"]),
                   {name: RunScores.from_dict(r) for name, r in d["runs"].items()})


@dataclass
class GeneratorRecord:
    """The synthetic set a run trained one organ with: generator, audit summary and numeric audit figures."""

    generator_id: str | None
    summary: str | None
    audit: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GeneratorRecord:
        return cls(d.get("generator_id"), d.get("summary"), {k: _num(v) for k, v in (d.get("audit") or {}).items()})


@dataclass
class OrganComparison:
    """One organ: both levels, the power warning, the classifiers' settings and the generators compared."""

    patient: LevelComparison
    slice: LevelComparison
    low_power: bool  # fewer injured test patients than eval.min_positives
    note: str
    settings: OrganSettings  # the baseline's (compared runs match on them)
    generators: dict[str, GeneratorRecord] = field(default_factory=dict)  # run -> record, synthetic runs only

    def level(self, name: str) -> LevelComparison:
        """``"patient"`` or ``"slice"``."""
        if name not in LEVELS:
            raise ValueError(f"unknown level '{name}'; choose from {', '.join(LEVELS)}")
        return self.patient if name == "patient" else self.slice

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OrganComparison:
        return cls(
            patient=LevelComparison.from_dict(d["patient"]),
            slice=LevelComparison.from_dict(d["slice"]),
            low_power=bool(d["low_power"]),
            note=str(d["note"]),
            settings=OrganSettings.from_dict(d["settings"]),
            generators={name: GeneratorRecord.from_dict(g) for name, g in (d.get("generators") or {}).items()},
        )


@dataclass
class RunRecord:
    """What the report states about each compared run (from its run.json)."""

    split_hash: str | None
    synthetic_ratio: float
    seed: int
    folds: int
    model: str
    image_size: int
    epochs: int
    epoch_size: int

    @classmethod
    def from_info(cls, info: RunInfo) -> RunRecord:
        return cls(**{f.name: getattr(info, f.name) for f in fields(cls)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class EvalSettings:
    """How the comparison was computed (``cfg.eval``, the bootstrap seed, the multiplicity correction)."""

    bootstrap: int
    ci: float
    alpha: float
    min_positives: int
    seed: int
    multiplicity: str = "none"  # "Holm": across organs x compared runs at patient level (eval.multiplicity)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalSettings:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class LogLoss:
    """RSNA 2023 weighted log loss on the label groups a run could be scored on."""

    score: float  # mean of ``groups``; NaN when empty
    groups: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # group -> reason

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LogLoss:
        return cls(_num(d["score"]), {k: _num(v) for k, v in d["groups"].items()}, dict(d["left_out"]))


@dataclass
class Comparison:
    """The baseline vs the other runs, every organ: what report.json holds.

    ``runs`` and every level's ``runs`` list the baseline first.
    """

    baseline: str
    runs: dict[str, RunRecord]
    settings_mismatch: dict[str, dict[str, Any]]  # setting -> {run: value}, when allowed to differ
    notes: list[str]
    eval: EvalSettings
    organs: dict[str, OrganComparison]
    rsna_log_loss: dict[str, LogLoss]

    @property
    def others(self) -> list[str]:
        """The compared runs other than the baseline."""
        return [n for n in self.runs if n != self.baseline]

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists (NaN kept as float; :meth:`write_json` writes it as null)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparison:
        return cls(
            baseline=str(d["baseline"]),
            runs={name: RunRecord.from_dict(r) for name, r in d["runs"].items()},
            settings_mismatch={k: dict(v) for k, v in d["settings_mismatch"].items()},
            notes=list(d["notes"]),
            eval=EvalSettings.from_dict(d["eval"]),
            organs={organ: OrganComparison.from_dict(o) for organ, o in d["organs"].items()},
            rsna_log_loss={name: LogLoss.from_dict(ll) for name, ll in d["rsna_log_loss"].items()},
        )

    def write_json(self, path: Path) -> Path:
        """``report.json``: standard JSON (NaN -> null)."""
        Path(path).write_text(json.dumps(json_safe(self.to_dict()), indent=2))
        return Path(path)

    @classmethod
    def read_json(cls, path: Path) -> Comparison:
        return cls.from_dict(json.loads(Path(path).read_text()))
