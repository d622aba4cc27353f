"""Patient-level split: a held-out test set, then cross-validation folds over the rest.

Both steps stratify on a per-patient key so that rare injuries reach every part:
the key is the patient's rarest injured organ (``"healthy"`` when uninjured).
Classes too small for the step (fewer than 2 patients for the test hold-out,
fewer than ``folds`` for the folds) are merged into ``"injured"``; if that is
still too small, the step stratifies on ``any_injury``, and last of all not at
all. Folds come from :class:`sklearn.model_selection.StratifiedGroupKFold`
grouped by ``patient_id``, so a patient's slices never straddle two folds.

The split depends only on the patients, their labels and the seed (not on
image size or slice counts), so stores rebuilt with other settings share it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from toolkit import ORGANS
from toolkit.errors import ToolkitError

SPLIT_COLUMNS: tuple[str, ...] = ("patient_id", "split", "fold")


def _patient_grades(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per patient with an injury flag per organ, from grade, ``_patient`` or RSNA columns."""
    if "patient_id" not in labels.columns:
        raise ToolkitError("labels for the split need a 'patient_id' column")
    first = labels.groupby("patient_id", sort=True).first().reset_index()
    out = pd.DataFrame({"patient_id": first["patient_id"].astype(np.int64)})
    for organ in ORGANS:
        for col in (f"{organ}_patient", organ, f"{organ}_injury"):
            if col in first.columns:
                out[organ] = (first[col].to_numpy() > 0).astype(np.int64)
                break
        else:
            if f"{organ}_healthy" in first.columns:
                out[organ] = (first[f"{organ}_healthy"].to_numpy() == 0).astype(np.int64)
            else:
                raise ToolkitError(f"labels for the split have no column for organ '{organ}'")
    return out


def _strata(injured: pd.DataFrame, min_count: int, max_classes: int | None = None) -> np.ndarray:
    """Per-patient stratification key: every class has >= ``min_count`` patients (all zeros if impossible).

    Tried in order: rarest injured organ (small classes merged into ``"injured"``), ``any_injury``.
    """
    flags = injured[list(ORGANS)].to_numpy()
    rarity = np.argsort(flags.sum(axis=0), kind="stable")  # rarest organ first
    key = np.full(len(injured), "healthy", dtype=object)
    for j in rarity[::-1]:  # rarer organs overwrite the key of commoner ones
        key[flags[:, j] > 0] = ORGANS[j]
    classes, counts = np.unique(key, return_counts=True)
    small = set(classes[counts < min_count]) - {"healthy"}
    fine = np.array(["injured" if k in small else k for k in key], dtype=object)
    binary = np.where(flags.sum(axis=1) > 0, "injured", "healthy").astype(object)
    for candidate in (fine, binary):
        classes, counts = np.unique(candidate, return_counts=True)
        fits = max_classes is None or len(classes) <= max_classes
        if len(classes) > 1 and counts.min() >= min_count and fits:
            return candidate
    return np.full(len(injured), "all", dtype=object)


def split_patients(labels: pd.DataFrame, test_fraction: float, folds: int, seed: int) -> pd.DataFrame:
    """Assign every patient to the test set or to one cross-validation fold.

    Parameters
    ----------
    labels : DataFrame
        ``patient_id`` plus, per organ, a grade column (``<organ>_patient`` or ``<organ>``) or the
        RSNA one-hot columns. One row per patient, or one per slice (grouped by ``patient_id``).
    test_fraction : float
        Share of patients held out as the test set, in [0, 1).
    folds : int
        Number of cross-validation folds over the remaining patients (>= 2).
    seed : int
        Seed for both steps; the same inputs and seed give the same split.

    Returns
    -------
    DataFrame with one row per patient, sorted by ``patient_id``: ``patient_id`` (int64),
    ``split`` ({"train", "test"}), ``fold`` (int64, 0..folds-1 for train, -1 for test).

    Raises
    ------
    ToolkitError
        Bad ``test_fraction``/``folds``, or too few patients for the folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    if not 0.0 <= float(test_fraction) < 1.0:
        raise ToolkitError(f"data.test_fraction must be in [0, 1), got {test_fraction}")
    if int(folds) < 2:
        raise ToolkitError(f"data.folds must be at least 2, got {folds}")
    injured = _patient_grades(labels)
    n = len(injured)
    ids = injured["patient_id"].to_numpy()
    n_test = int(np.ceil(test_fraction * n)) if test_fraction > 0 else 0
    if n - n_test < folds:
        raise ToolkitError(
            f"{n} patient(s) leave {n - n_test} for {folds}-fold cross-validation after holding out "
            f"{n_test} for testing; need at least {folds}: add patients or lower data.folds or "
            "data.test_fraction"
        )
    is_test = np.zeros(n, dtype=bool)
    if n_test:
        # train_test_split needs >= 2 patients per class and a class count <= each side's size.
        key = _strata(injured, min_count=2, max_classes=min(n_test, n - n_test))
        stratify = key if len(np.unique(key)) > 1 else None
        _, test_idx = train_test_split(
            np.arange(n), test_size=n_test, random_state=seed, shuffle=True, stratify=stratify
        )
        is_test[test_idx] = True
    fold = np.full(n, -1, dtype=np.int64)
    train_idx = np.flatnonzero(~is_test)
    key = _strata(injured.iloc[train_idx], min_count=folds).astype(str)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(train_idx)), key, groups=ids[train_idx])):
        fold[train_idx[val]] = k
    return pd.DataFrame({"patient_id": ids, "split": np.where(is_test, "test", "train"), "fold": fold})


def split_hash(split: pd.DataFrame) -> str:
    """First 16 hex digits of the sha256 of the split table sorted by patient (order-independent)."""
    table = split[list(SPLIT_COLUMNS)].sort_values("patient_id").reset_index(drop=True)
    table = table.astype({"patient_id": np.int64, "split": str, "fold": np.int64})
    return hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()[:16]
