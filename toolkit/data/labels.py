"""RSNA 2023 label CSVs -> patient grades and per-slice training labels.

Grades, one integer per organ: ``bowel`` and ``extravasation`` 0 healthy / 1 injury;
``kidney``, ``liver``, ``spleen`` 0 healthy / 1 low / 2 high (from train.csv's one-hot columns).

Slice labels (the ``<organ>`` manifest column; ``<organ>_patient`` is always the patient grade):

- ``bowel``, ``extravasation``: when ``image_level_labels.csv`` has ANY row for the slice's series,
  the label is 1 exactly on the listed instance numbers (``Bowel`` -> bowel,
  ``Active_Extravasation`` -> extravasation) and 0 on every other slice of that series. A series
  without image-level rows takes the patient grade on every slice.
- ``kidney``, ``liver``, ``spleen``: the patient grade on every slice, as RSNA gives no slice labels
  for them. This toolkit also reads ``Kidney``, ``Liver`` and ``Spleen`` rows (slice annotations of
  your own data, or the demo phantom's): where a series has rows for the organ, the label is the
  patient grade (at least 1) on the listed instances and 0 on the series' other slices.

``<organ>_image_level`` is 1 on every slice of a series whose ``<organ>`` label comes from
image-level rows (by the rules above), else 0: later stages let those labels win over their own
(``toolkit crop``'s soft targets).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from toolkit import GRADED_ORGANS, ORGANS
from toolkit.errors import DataError
from toolkit.sliceset import image_level_column

TRAIN_CSV = "train.csv"
SERIES_META_CSV = "train_series_meta.csv"
IMAGE_LABELS_CSV = "image_level_labels.csv"

BINARY_ORGANS: tuple[str, ...] = tuple(o for o in ORGANS if o not in GRADED_ORGANS)

TRAIN_COLUMNS: tuple[str, ...] = ("patient_id",) + tuple(
    f"{o}_{state}"
    for o in ORGANS
    for state in (("healthy", "low", "high") if o in GRADED_ORGANS else ("healthy", "injury"))
)
SERIES_META_COLUMNS: tuple[str, ...] = ("patient_id", "series_id")
SERIES_META_OPTIONAL: tuple[str, ...] = ("aortic_hu", "incomplete_organ")
IMAGE_LABEL_COLUMNS: tuple[str, ...] = ("patient_id", "series_id", "instance_number", "injury_name")

INJURY_NAMES: dict[str, str] = {
    "Bowel": "bowel",
    "Active_Extravasation": "extravasation",
    "Kidney": "kidney",
    "Liver": "liver",
    "Spleen": "spleen",
}
"""``injury_name`` values of image_level_labels.csv -> organ."""


def read_csv(path: Path, required: tuple[str, ...], integer: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a label CSV, checking that ``required`` columns exist and ``integer`` ones hold integers."""
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; the RSNA layout needs it") from None
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{path} is empty (not even a header row); re-export it with the columns {', '.join(required)}"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        why = " ".join(str(exc).split())[:120]
        raise DataError(f"{path} is not a readable CSV ({why}); fix or re-export it") from None
    df.columns = [str(c).strip() for c in df.columns]
    for col in required:
        if col not in df.columns:
            raise DataError(f"{path} is missing column '{col}'; add it (RSNA 2023 header) and re-run")
    for col in integer:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | (values != values.round())
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{path} column '{col}' has a non-integer value {df[col].iloc[row]!r} on data row {row + 1}; "
                "fix that row"
            )
        df[col] = values.astype(np.int64)
    return df


def read_patient_grades(path: Path) -> pd.DataFrame:
    """train.csv -> one row per patient: ``patient_id``, ``<organ>`` grade for each organ, ``any_injury``.

    Raises
    ------
    DataError
        A missing column, a non-0/1 label, an organ group without exactly one 1, a duplicated patient_id.
    """
    df = read_csv(path, TRAIN_COLUMNS, integer=TRAIN_COLUMNS)
    if df.empty:
        raise DataError(f"{path} has a header but no rows; add one row per patient")
    for col in TRAIN_COLUMNS[1:]:
        if not df[col].isin([0, 1]).all():
            raise DataError(f"{path} column '{col}' must hold only 0 or 1; fix the labels")
    for organ in ORGANS:
        # One-hot: liver_low=1 with liver_high=1 (or no 1 at all) has no grade; taking either would
        # train on a label the annotator did not give.
        group = [c for c in TRAIN_COLUMNS if c.startswith(f"{organ}_")]
        ones = df[group].sum(axis=1).to_numpy()
        bad = np.flatnonzero(ones != 1)
        if len(bad):
            row = int(bad[0])
            on = [c for c in group if df[c].iloc[row] == 1]
            what = f"{' and '.join(on)} are {'both' if len(on) == 2 else 'all'} 1" if on else "no column is 1"
            more = f" ({len(bad)} such rows)" if len(bad) > 1 else ""
            raise DataError(
                f"{path} data row {row + 1} (patient_id {int(df['patient_id'].iloc[row])}): {what}, but "
                f"{', '.join(group)} must hold exactly one 1{more}; fix the labels"
            )
    dup = df["patient_id"].duplicated()
    if dup.any():
        raise DataError(
            f"{path} lists patient_id {int(df['patient_id'][dup].iloc[0])} more than once; "
            "keep one row per patient"
        )
    out = pd.DataFrame({"patient_id": df["patient_id"].astype(np.int64)})
    for organ in ORGANS:
        if organ in GRADED_ORGANS:
            grade = np.where(df[f"{organ}_high"] == 1, 2, np.where(df[f"{organ}_low"] == 1, 1, 0))
        else:
            grade = df[f"{organ}_injury"].to_numpy()
        out[organ] = grade.astype(np.int64)
    out["any_injury"] = (out[list(ORGANS)] > 0).any(axis=1).astype(np.int64)
    return out.sort_values("patient_id").reset_index(drop=True)


def read_series_meta(path: Path) -> pd.DataFrame:
    """train_series_meta.csv -> ``patient_id``, ``series_id``, ``aortic_hu``, ``incomplete_organ``.

    ``aortic_hu`` and ``incomplete_organ`` are optional in the file (NaN when absent).
    """
    df = read_csv(path, SERIES_META_COLUMNS, integer=SERIES_META_COLUMNS)
    if df.empty:
        raise DataError(
            f"{path} has a header but no rows; add one row per series (patient_id, series_id), "
            "or delete the file to take the series from the train_images/<patient_id>/<series_id>/ folders"
        )
    dup = df["series_id"].duplicated()
    if dup.any():
        raise DataError(
            f"{path} lists series_id {int(df['series_id'][dup].iloc[0])} more than once; "
            "keep one row per series"
        )
    for col in SERIES_META_OPTIONAL:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else np.nan
    return df[list(SERIES_META_COLUMNS + SERIES_META_OPTIONAL)].reset_index(drop=True)


def read_image_labels(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """image_level_labels.csv -> (rows, unknown injury names).

    Rows have ``patient_id``, ``series_id``, ``instance_number``, ``organ``.

    Rows whose ``injury_name`` is not in :data:`INJURY_NAMES` are dropped; their names are returned
    so the caller can warn.
    """
    df = read_csv(path, IMAGE_LABEL_COLUMNS, integer=IMAGE_LABEL_COLUMNS[:3])
    names = df["injury_name"].astype(str).str.strip()
    unknown = sorted(set(names) - set(INJURY_NAMES))
    df = df.assign(organ=names.map(INJURY_NAMES))
    return df.dropna(subset=["organ"])[["patient_id", "series_id", "instance_number", "organ"]], unknown


def unmatched_image_labels(image_labels: pd.DataFrame, instances: dict[int, set[int]]) -> pd.DataFrame:
    """Rows of image_level_labels.csv whose series is read but has no slice with their instance number.

    Parameters
    ----------
    image_labels : DataFrame
        ``patient_id``, ``series_id``, ``instance_number`` (:func:`read_image_labels`).
    instances : dict
        series_id -> InstanceNumbers of the series' readable files. Rows of series not in it
        (series not in the study) are not checked.

    Returns
    -------
    DataFrame
        The unmatched rows, in file order.
    """
    pairs = zip(image_labels["series_id"], image_labels["instance_number"], strict=True)
    missing = [int(s) in instances and int(i) not in instances[int(s)] for s, i in pairs]
    return image_labels[np.asarray(missing, dtype=bool)]


def slice_labels(
    slices: pd.DataFrame, grades: pd.DataFrame, image_labels: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per-slice ``<organ>`` and ``<organ>_patient`` columns (rule in the module docstring).

    Parameters
    ----------
    slices : DataFrame of n_slices rows
        ``patient_id``, ``series_id``, ``instance``.
    grades : DataFrame
        One row per patient: ``patient_id`` and a grade column per organ (:func:`read_patient_grades`).
    image_labels : DataFrame, optional
        ``series_id``, ``instance_number``, ``organ`` (:func:`read_image_labels`).

    Returns
    -------
    DataFrame of n_slices rows, columns ``bowel, bowel_patient, ..., spleen, spleen_patient`` and
    ``<organ>_image_level`` for each organ (int64), aligned with ``slices``.
    """
    patient = slices[["patient_id"]].merge(grades, on="patient_id", how="left", validate="many_to_one")
    if patient[list(ORGANS)].isna().any().any():
        missing = sorted(set(slices["patient_id"][patient[ORGANS[0]].isna().to_numpy()]))
        raise DataError(f"no train.csv labels for patient_id {missing[:5]}")
    out = pd.DataFrame(index=slices.index)
    labelled_series = set() if image_labels is None else set(image_labels["series_id"].astype(np.int64))
    has_image_labels = slices["series_id"].isin(labelled_series).to_numpy()
    keys = pd.MultiIndex.from_arrays([slices["series_id"], slices["instance"]])
    from_rows: dict[str, np.ndarray] = {}
    for organ in ORGANS:
        patient_grade = patient[organ].to_numpy().astype(np.int64)
        label = patient_grade.copy()
        annotated = np.zeros(len(slices), bool)
        if image_labels is not None and has_image_labels.any():
            rows = image_labels[image_labels["organ"] == organ]
            on_list = keys.isin(pd.MultiIndex.from_arrays([rows["series_id"], rows["instance_number"]]))
            if organ in BINARY_ORGANS:
                annotated = has_image_labels
                label = np.where(has_image_labels, on_list.astype(np.int64), patient_grade)
            else:  # only series annotated for this organ; RSNA's bowel/extravasation rows say nothing of it
                annotated = slices["series_id"].isin(set(rows["series_id"].astype(np.int64))).to_numpy()
                label = np.where(annotated, np.where(on_list, np.maximum(patient_grade, 1), 0), patient_grade)
        out[organ] = label
        out[f"{organ}_patient"] = patient_grade
        from_rows[organ] = annotated.astype(np.int64)
    for organ in ORGANS:
        out[image_level_column(organ)] = from_rows[organ]
    return out
