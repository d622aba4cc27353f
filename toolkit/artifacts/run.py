"""The run folder: what ``toolkit train`` writes and ``compare``, ``predict``, ``explain`` and ``demo`` read.

One definition of the layout; nothing else names these files::

    runs/<name>/config.yaml                        resolved config of the train command
    runs/<name>/run.json                           RunInfo: name, split_hash, synthetic_ratio, seed, folds,
                                                   organs, model, image_size, windows, epoch_size, epochs,
                                                   generators, settings (each organ's resolved train
                                                   settings, OrganSettings), inputs (what each organ
                                                   read: organ crops or stored slices), complete
    runs/<name>/<organ>/fold_<k>/model.safetensors + config.json   best checkpoint of fold k
    runs/<name>/<organ>/fold_<k>/metrics.csv       epoch, train_loss, val_loss, val_auc, val_patient_auc, lr,
                                                   seconds, slices_per_s
    runs/<name>/<organ>/fold_<k>/val_predictions.csv   validation slices scored by the best checkpoint
    runs/<name>/<organ>/fold_<k>/test_predictions.csv  test slices scored by it, written last (= fold done)
    runs/<name>/<organ>/fold_<k>/summary.json      best epoch, optimizer steps, samples per source
    runs/<name>/<organ>/fold_<k>/last/             resume state (removed when the fold is done)
    runs/<name>/<organ>/learning_curve.png         train/val loss and val AUC per epoch, one line per fold
    runs/<name>/<organ>/oof.csv                    patient_id, series_id, instance, fold, label, prob
    runs/<name>/<organ>/oof_patients.csv           patient_id, fold, label, grade, prob
    runs/<name>/<organ>/test_folds.csv             patient_id, series_id, instance, label, fold, prob
    runs/<name>/<organ>/test_slices.csv            patient_id, series_id, instance, label, prob (fold mean), row
    runs/<name>/<organ>/test_patients.csv          patient_id, label, grade, prob, prob_fold_0..K-1

Slice files carry the slice label; patient files the patient label (``<organ>_patient > 0``)
and grade. Fold prediction files hold :data:`PREDICTION_COLUMNS` (``row`` is the store row).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from toolkit.config import Config, TrainConfig
from toolkit.errors import ContractError, DataError

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"  # of a fold checkpoint (train.model.WEIGHTS_NAME)
LEARNING_CURVE_FILE = "learning_curve.png"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
STATE_DIR = "last"
PREDICTION_FILES = {"val": "val_predictions.csv", "test": "test_predictions.csv"}

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "val_patient_auc", "lr", "seconds", "slices_per_s")
PREDICTION_COLUMNS = ("row", "patient_id", "series_id", "instance", "fold", "label", "prob")
SLICE_KEYS = ("patient_id", "series_id", "instance")  # one stored slice (an organ crop set may hold two rows of it)
# An organ's prediction tables, columns in file order (test_patients adds prob_fold_0..K-1).
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "oof": ("patient_id", "series_id", "instance", "fold", "label", "prob"),
    "oof_patients": ("patient_id", "fold", "label", "grade", "prob"),
    "test_folds": ("patient_id", "series_id", "instance", "label", "fold", "prob"),
    "test_slices": ("patient_id", "series_id", "instance", "label", "prob"),
    "test_patients": ("patient_id", "label", "grade", "prob"),
}
# Train keys that change no result (workers, memory, how often the resume state is written): a resumed run
# may change them.
RESULT_NEUTRAL_TRAIN_KEYS = ("num_workers", "feature_cache_mb", "checkpoint_every_s")
# Train keys that belong to the run, not to one organ (``train.organs`` cannot set them), and the neutral ones.
RUN_LEVEL_TRAIN_KEYS = ("synthetic_ratio", "folds", "organs", *RESULT_NEUTRAL_TRAIN_KEYS)


# ------------------------------------------------------------------ run.json
@dataclass(frozen=True)
class OrganSettings:
    """The train settings one organ's classifiers were trained with: ``train`` plus its ``train.organs`` override.

    Every key of :class:`toolkit.config.TrainConfig` but :data:`RUN_LEVEL_TRAIN_KEYS`.
    """

    model: str
    pretrained: bool
    weights: str | None
    image_size: int
    epochs: int
    epoch_size: int
    batch_size: int
    lr: float
    weight_decay: float
    trainable_blocks: int
    synthetic_max_repeat: int
    matched_negatives: float
    patience: int
    select_on: str
    augment: bool
    aggregate: str
    top_k: int
    mixed_precision: str
    synthetic_resize: bool = False  # added later: older run.json files lack it
    synthetic_pairs: bool = False  # added later: older run.json files lack it
    input: str = "slices"  # added with organ crops (train.input); older run.json files lack it

    @classmethod
    def from_train(cls, train: TrainConfig) -> OrganSettings:
        """The settings of a resolved train section (``train.run.organ_config(cfg, organ).train``)."""
        return cls(**{f.name: getattr(train, f.name) for f in fields(cls)})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OrganSettings:
        """Inverse of :meth:`to_dict`; raises ``KeyError`` naming a missing key (keys added later, with a
        default, may be absent)."""
        return cls(**{f.name: values[f.name] for f in fields(cls)
                      if f.name in values or f.default is dataclasses.MISSING})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunInfo:
    """``run.json``: what a run is, how it was trained, and whether every organ finished.

    ``generators`` maps organ -> {generator_id, synthetic_dir, audit} of the synthetic set it
    trained with; ``settings`` maps organ -> its :class:`OrganSettings`; ``inputs`` maps organ -> what its
    classifiers read: ``{"input": "slices"}`` (the stored slices) or ``{"input": "crops", "crop_id",
    "size", "margin", "min_visibility", "segmenter_dir"}`` (its crop set; ``predict`` segments and crops
    a new series with these). ``image_size``,
    ``model``, ``epochs`` and ``epoch_size`` are the run-level values (before per-organ overrides).
    """

    name: str
    split_hash: str | None
    synthetic_ratio: float
    seed: int
    folds: int
    organs: list[str]
    model: str
    image_size: int
    windows: list[list[float]]
    epoch_size: int
    epochs: int
    generators: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, OrganSettings] = field(default_factory=dict)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # added with organ crops
    complete: bool = False

    @classmethod
    def from_config(
        cls,
        name: str,
        cfg: Config,
        *,
        split_hash: str | None,
        folds: int,
        organs: list[str],
        organ_train: Mapping[str, TrainConfig],
        generators: Mapping[str, dict[str, Any]] | None = None,
        inputs: Mapping[str, dict[str, Any]] | None = None,
    ) -> RunInfo:
        """A run's info from its resolved config; ``organ_train`` is each organ's resolved train section."""
        tc = cfg.train
        return cls(
            name=name,
            split_hash=split_hash,
            synthetic_ratio=tc.synthetic_ratio,
            seed=cfg.seed,
            folds=folds,
            organs=list(organs),
            model=tc.model,
            image_size=tc.image_size,
            windows=cfg.data.windows,
            epoch_size=tc.epoch_size,
            epochs=tc.epochs,
            generators=dict(generators or {}),
            settings={o: OrganSettings.from_train(t) for o, t in organ_train.items()},
            inputs=dict(inputs or {}),
        )

    def input(self, organ: str) -> dict[str, Any]:
        """What ``organ``'s classifiers read (``inputs``); runs from before organ crops read stored slices."""
        return dict(self.inputs.get(organ) or {"input": "slices"})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["settings"] = {o: s.to_dict() for o, s in self.settings.items()}
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: Path | str = RUN_FILE) -> RunInfo:
        """Inverse of :meth:`to_dict`. A run.json without ``settings`` (older toolkit) reads with none."""
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in values]
        if missing:
            raise ContractError(
                f"{source} lacks '{missing[0]}' (written by an older toolkit); re-run `toolkit train --force`"
            )
        kwargs = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        try:
            kwargs["settings"] = {o: OrganSettings.from_dict(s) for o, s in (values.get("settings") or {}).items()}
        except KeyError as exc:
            raise ContractError(
                f"{source} settings lack {exc} (written by an older toolkit); re-run `toolkit train --force`"
            ) from None
        kwargs["generators"] = dict(values.get("generators") or {})
        kwargs["inputs"] = dict(values.get("inputs") or {})
        return cls(**kwargs)


# ------------------------------------------------------------------ folders
@dataclass(frozen=True)
class FoldFolder:
    """``runs/<name>/<organ>/fold_<k>/``: one fold's checkpoint, metrics, predictions and resume state."""

    path: Path
    fold: int

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def state_dir(self) -> Path:
        """Resume state after the last completed epoch (gone once the fold is done)."""
        return self.path / STATE_DIR

    def predictions_path(self, split: str) -> Path:
        """``val_predictions.csv`` or ``test_predictions.csv``."""
        return self.path / PREDICTION_FILES[split]

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / WEIGHTS_FILE).exists()

    @property
    def done(self) -> bool:
        """The fold finished: its test predictions (written last) exist."""
        return self.predictions_path("test").exists()

    def write_metrics(self, history: list[dict[str, float]]) -> Path:
        """One row per completed epoch, :data:`METRIC_COLUMNS`."""
        pd.DataFrame(history, columns=list(METRIC_COLUMNS)).to_csv(self.metrics_path, index=False)
        return self.metrics_path

    def read_metrics(self) -> pd.DataFrame:
        return _read_csv(self.metrics_path, METRIC_COLUMNS)

    def write_predictions(self, split: str, frame: pd.DataFrame) -> Path:
        """Scored slices of ``split`` ("val" or "test"), :data:`PREDICTION_COLUMNS`.

        Written to a temp file then renamed: the test file marks the fold done, so it is never half-written.
        """
        path = self.predictions_path(split)
        tmp = path.with_name(path.name + ".tmp")
        _columns(frame, PREDICTION_COLUMNS, path).to_csv(tmp, index=False)
        tmp.replace(path)
        return path

    def read_predictions(self, split: str) -> pd.DataFrame:
        return _read_csv(self.predictions_path(split), PREDICTION_COLUMNS)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        self.summary_path.write_text(json.dumps(summary, indent=2))
        return self.summary_path

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text())


@dataclass(frozen=True)
class RunFolder:
    """``runs/<name>/``: paths of every file of a run, and their readers and writers."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def info_path(self) -> Path:
        return self.path / RUN_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def organ_dir(self, organ: str) -> Path:
        return self.path / organ

    def fold(self, organ: str, k: int) -> FoldFolder:
        return FoldFolder(self.organ_dir(organ) / f"fold_{k}", k)

    def checkpoints(self, organ: str) -> list[FoldFolder]:
        """The folds of ``organ`` that hold a checkpoint, ordered by fold."""
        found = []
        for p in self.organ_dir(organ).glob("fold_*"):
            k = p.name.removeprefix("fold_")
            if k.isdigit() and (p / WEIGHTS_FILE).exists():
                found.append(FoldFolder(p, int(k)))
        return sorted(found, key=lambda f: f.fold)

    def table_path(self, organ: str, table: str) -> Path:
        """``<organ>/<table>.csv``, ``table`` one of :data:`TABLE_COLUMNS`."""
        if table not in TABLE_COLUMNS:
            raise ValueError(f"unknown run table '{table}'; choose from {', '.join(TABLE_COLUMNS)}")
        return self.organ_dir(organ) / f"{table}.csv"

    def learning_curve_path(self, organ: str) -> Path:
        return self.organ_dir(organ) / LEARNING_CURVE_FILE

    # -------------------------------------------------------------- run.json + config.yaml
    @property
    def exists(self) -> bool:
        """The folder holds a run.json (a run was started here)."""
        return self.info_path.exists()

    def state(self) -> str:
        """``"missing"`` (no folder), ``"partial"`` (started, or run.json unreadable) or ``"complete"``."""
        if not self.path.exists():
            return "missing"
        if not self.exists:
            return "partial"
        try:
            return "complete" if self.read_info().complete else "partial"
        except (DataError, ContractError):
            return "partial"

    def read_info(self) -> RunInfo:
        """``run.json`` as a :class:`RunInfo`, or a one-line error naming the file."""
        if not self.info_path.exists():
            raise DataError(f"{self.info_path} does not exist; train the run with `toolkit train --name {self.name}`")
        try:
            values = json.loads(self.info_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.info_path} is not valid JSON ({exc.msg}); re-run `toolkit train`") from None
        return RunInfo.from_dict(values, self.info_path)

    def write_info(self, info: RunInfo) -> Path:
        """Write ``run.json`` (temp file, then renamed: an interrupted write leaves the old one).

        The temp file is unique to the call, so study shards that write one run's folds at once never
        rename each other's half-written file.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.info_path.with_name(f"{RUN_FILE}.{uuid.uuid4().hex[:12]}.tmp")
        tmp.write_text(json.dumps(info.to_dict(), indent=2, default=str))
        tmp.replace(self.info_path)
        return self.info_path

    def read_config(self) -> dict[str, Any]:
        """The saved config.yaml as a plain dict (empty when absent)."""
        if not self.config_path.exists():
            return {}
        return yaml.safe_load(self.config_path.read_text()) or {}

    # -------------------------------------------------------------- prediction tables
    def write_table(self, organ: str, table: str, frame: pd.DataFrame, extra: Sequence[str] = ()) -> Path:
        """Write ``<organ>/<table>.csv``: its :data:`TABLE_COLUMNS` in order, then the ``extra`` columns
        (``prob_fold_<k>`` of test_patients); other columns of ``frame`` are left out."""
        path = self.table_path(organ, table)
        path.parent.mkdir(parents=True, exist_ok=True)
        _columns(frame, (*TABLE_COLUMNS[table], *extra), path).to_csv(path, index=False)
        return path

    def read_table(self, organ: str, table: str, required: bool = True) -> pd.DataFrame | None:
        """Read ``<organ>/<table>.csv`` and check its columns; None when absent and not ``required``."""
        path = self.table_path(organ, table)
        if not path.exists():
            if required:
                raise DataError(f"run '{self.name}' has no {path}; re-run `toolkit train --resume`")
            return None
        return _read_csv(path, TABLE_COLUMNS[table])

    def has_table(self, organ: str, table: str) -> bool:
        return self.table_path(organ, table).exists()


def test_slice_keys(*frames: pd.DataFrame) -> list[str]:
    """Columns that identify a ``test_slices`` row in every one of ``frames``.

    ``row`` (the organ's data row) where all carry it: a kidney slice has two crops, left and right,
    so patient, series and instance do not tell its rows apart. Tables written before ``row`` fall
    back to those three and are refused where they hold two rows of one slice.
    """
    keys = ["row", *SLICE_KEYS] if all("row" in f.columns for f in frames) else list(SLICE_KEYS)
    for frame in frames:
        if frame.duplicated(keys).any():
            raise DataError(
                "a test_slices.csv holds two rows of one slice (two crops, e.g. left and right kidney) without a "
                "'row' column to tell them apart; re-run `toolkit train --force` for that run"
            )
    return keys


def _columns(frame: pd.DataFrame, columns: tuple[str, ...], path: Path) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:  # a writer bug, not user input
        raise ValueError(f"cannot write {path}: the frame lacks column(s) {', '.join(missing)}")
    return frame[list(columns)]


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; re-create it with `toolkit train`")
    return df
