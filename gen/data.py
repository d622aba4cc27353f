"""Training data of one organ's generator: train-split slices, classes, windowing.

Only slices of ``split == "train"`` patients are used: test patients are never
seen by a generator, so synthetic slices cannot leak the test set into training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from toolkit import GRADED_ORGANS, ORGANS
from toolkit.config import Config
from toolkit.errors import ToolkitError
from toolkit.sliceset import SliceSet
from toolkit.transforms import resize_slices, window_hu

MIN_PER_CLASS = 8
"""Fewest training slices per class a generator is trained on."""

CONDITIONINGS = ("binary", "grade")


def class_names_for(organ: str, conditioning: str) -> list[str]:
    """Class names in label order: healthy/injured, or healthy/low/high for graded organs."""
    if conditioning not in CONDITIONINGS:
        raise ToolkitError(f"unknown gen.conditioning '{conditioning}'; choose one of {', '.join(CONDITIONINGS)}")
    if conditioning == "grade" and organ in GRADED_ORGANS:
        return ["healthy", "low", "high"]
    return ["healthy", "injured"]


def check_organ(organ: str) -> str:
    if organ not in ORGANS:
        raise ToolkitError(f"unknown organ '{organ}'; choose one of {', '.join(ORGANS)} or all")
    return organ


class WindowedSlices:
    """Lazy array-like view of int16 HU slices as windowed, resized float32 in [0, 1].

    ``view[idx]`` returns an ndarray of shape (k, image_size, image_size); nothing is
    held in memory beyond the (memory-mapped) HU array, so stores larger than RAM work.

    Parameters
    ----------
    hu : ndarray of shape (n, H, W), int16
    window : (level, width) in HU
    image_size : int
    """

    def __init__(self, hu: np.ndarray, window: tuple[float, float], image_size: int) -> None:
        self.hu = hu
        self.window = (float(window[0]), float(window[1]))
        self.image_size = int(image_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.hu), self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.hu)

    def __getitem__(self, idx: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self[np.array([idx])][0]
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        hu = np.asarray(self.hu[np.asarray(idx)])
        return resize_slices(window_hu(hu, [self.window])[:, 0], self.image_size)

    def to_array(self, chunk: int = 2048) -> np.ndarray:
        """Everything as one (n, S, S) float32 array (built chunk by chunk)."""
        out = np.empty(self.shape, dtype=np.float32)
        for start in range(0, len(self), chunk):
            out[start : start + chunk] = self[slice(start, start + chunk)]
        return out


@dataclass
class TrainingData:
    """One organ's generator training set.

    Attributes
    ----------
    images : WindowedSlices of shape (n, S, S), float in [0, 1]
    labels : ndarray of shape (n,), int64 class per slice (0 healthy, 1 injured/low, 2 high)
    patient_ids : ndarray of shape (n,), int64
    class_names : list of str
    window : (level, width) HU window the images are in
    """

    images: WindowedSlices
    labels: np.ndarray
    patient_ids: np.ndarray
    class_names: list[str]
    window: tuple[float, float]

    @property
    def train_patients(self) -> np.ndarray:
        return np.unique(self.patient_ids)

    def class_counts(self) -> dict[str, int]:
        return {name: int((self.labels == c).sum()) for c, name in enumerate(self.class_names)}


def train_patients_hash(patient_ids: np.ndarray) -> str:
    """sha256 of the sorted unique training patient ids, one per line."""
    text = "\n".join(str(int(p)) for p in np.unique(patient_ids))
    return hashlib.sha256(text.encode()).hexdigest()


def load_training_data(
    store: SliceSet, organ: str, cfg: Config, patients: Collection[int] | None = None
) -> TrainingData:
    """Select ``organ``'s training slices from the real store and check there are enough.

    Rows with a missing or negative label are left out (unlabelled for this organ).

    Parameters
    ----------
    patients : collection of int, optional
        Train only on these train-split patients (a study's real-data fraction); default: every one.
    """
    check_organ(organ)
    names = class_names_for(organ, cfg.gen.conditioning)
    table = store.table
    for column in (organ, "split", "patient_id"):
        if column not in table.columns:
            raise ToolkitError(f"slice store manifest has no column '{column}'; re-run `toolkit prepare --force`")
    if not cfg.data.windows:
        raise ToolkitError("data.windows is empty; the generator needs at least one (level, width) HU window")
    grade = table[organ].to_numpy(dtype=np.float64)
    allowed = table["split"].to_numpy() == "train"
    if patients is not None:
        allowed &= np.isin(table["patient_id"].to_numpy(), np.fromiter(patients, np.int64))
    keep = allowed & np.isfinite(grade) & (grade >= 0)
    n_train_patients = int(table.loc[allowed, "patient_id"].nunique())
    if not keep.any():
        raise ToolkitError(f"slice store has no labelled '{organ}' slices of split 'train'; re-run `toolkit prepare`")
    grade = grade[keep].astype(np.int64)
    labels = np.minimum(grade, len(names) - 1) if len(names) == 3 else (grade > 0).astype(np.int64)
    if not (labels > 0).any():
        raise ToolkitError(
            f"no injured {organ} slices among the {n_train_patients} training patients of the store; "
            f"a class-conditional {organ} generator needs positives (skip this organ or add injured patients)"
        )
    rows = np.flatnonzero(keep)
    window = (float(cfg.data.windows[0][0]), float(cfg.data.windows[0][1]))
    data = TrainingData(
        images=WindowedSlices(_take(store.images, rows), window, cfg.gen.image_size),
        labels=labels,
        patient_ids=table["patient_id"].to_numpy()[rows].astype(np.int64),
        class_names=names,
        window=window,
    )
    counts = data.class_counts()
    needed = max(2 * cfg.gen.batch_size, MIN_PER_CLASS * len(names))
    short = {k: v for k, v in counts.items() if v < MIN_PER_CLASS}
    if short or len(labels) < needed:
        shown = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise ToolkitError(
            f"too few {organ} training slices ({shown}); "
            f"need >= {MIN_PER_CLASS} per class and >= {needed} in all "
            f"(2 x gen.batch_size); add patients, lower gen.batch_size or use gen.conditioning=binary"
        )
    return data


class _RowView:
    """Rows of a (memory-mapped) array without copying it: ``view[idx] == base[rows[idx]]``."""

    def __init__(self, base: np.ndarray, rows: np.ndarray) -> None:
        self.base, self.rows = base, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.base[self.rows[idx]])


def _take(images: np.ndarray, rows: np.ndarray) -> np.ndarray | _RowView:
    # Small stores are copied into memory (fast fancy indexing); large memory maps stay on disk.
    if rows.size * images.shape[1] * images.shape[2] * 2 <= 2 * 1024**3:
        return np.asarray(images[rows])
    return _RowView(images, rows)
