"""What organ segmentation adds to the slice store: label codes, file names, readers.

``toolkit prepare`` writes the real masks it finds; ``toolkit segment`` writes the label maps
and the per-slice organ visibility. All are aligned row by row with ``images.npy``::

    store/
      masks.npy          uint8 (n_slices, S, S): real organ masks, 0 = background or no mask
      manifest.csv       + mask_source: "rsna" | "totalsegmentator" | "" (the series has no mask)
      organ_labels.npy   uint8 (n_slices, S, S): an organ label map for every slice (toolkit segment)
      organs.csv         one row per slice: label_source, area_<organ> (pixels), vis_<organ> in [0, 1]
      segmenter/         the trained localizer and its Dice (see :mod:`seg.run`)

Label codes are RSNA 2023's (its ``segmentations/*.nii``): :data:`SEG_LABELS`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# prepare writes the real masks; seg reads them with prepare's own reader (re-exported for seg's modules).
from toolkit.data.masks import MASKS_FILE, STORE_LABELS, has_mask, load_masks  # noqa: F401
from toolkit.errors import DataError

SEG_LABELS: dict[str, int] = STORE_LABELS
"""Label code of each organ in masks and label maps (RSNA 2023's, as ``prepare`` stores them); 0 is background."""

SEG_ORGANS: tuple[str, ...] = tuple(SEG_LABELS)
NUM_CLASSES = len(SEG_LABELS) + 1  # with background

MASK_SOURCE = "mask_source"
LABELS_FILE = "organ_labels.npy"
ORGANS_FILE = "organs.csv"
SEGMENTER_DIR = "segmenter"
PREDICTED = "predicted"  # organs.csv label_source of a slice whose label map is the localizer's

AREA_COLUMNS: tuple[str, ...] = tuple(f"area_{o}" for o in SEG_ORGANS)
VIS_COLUMNS: tuple[str, ...] = tuple(f"vis_{o}" for o in SEG_ORGANS)
ORGANS_COLUMNS: tuple[str, ...] = ("patient_id", "series_id", "instance", "split", "label_source") + AREA_COLUMNS + (
    VIS_COLUMNS
)

def read_organ_labels(store_dir: str | Path) -> np.ndarray:
    """``store/organ_labels.npy``: uint8 (n_slices, S, S) label maps, memory-mapped."""
    path = Path(store_dir) / LABELS_FILE
    if not path.exists():
        raise DataError(f"no organ label maps in the store ({path}); run `toolkit segment`")
    return np.load(path, mmap_mode="r")


def read_organs(store_dir: str | Path, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """``store/organs.csv``: per-slice organ areas and visibility, one row per store slice.

    Parameters
    ----------
    store_dir : path
        The slice store.
    manifest : DataFrame, optional
        The store's manifest; when given, rows must match it (series_id, instance) in order.

    Returns
    -------
    DataFrame of n_slices rows
        :data:`ORGANS_COLUMNS`: ``vis_<organ>`` is the organ's area on the slice divided by its
        largest area in the series (0 everywhere in a series where the organ was not found).
    """
    path = Path(store_dir) / ORGANS_FILE
    if not path.exists():
        raise DataError(f"no organ visibility in the store ({path}); run `toolkit segment`")
    table = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in ORGANS_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; re-run `toolkit segment --force`")
    if manifest is not None:
        same = len(table) == len(manifest) and all(
            np.array_equal(table[c].to_numpy(), manifest[c].to_numpy()) for c in ("series_id", "instance")
        )
        if not same:
            raise DataError(
                f"{path} does not match the store's manifest.csv row by row; re-run `toolkit segment --force`"
            )
    return table


def visibility(labels: np.ndarray, series_id: np.ndarray, min_pixels: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice organ areas and visibility (area / the organ's largest area in its series).

    Parameters
    ----------
    labels : ndarray of shape (n_slices, S, S), dtype=uint8
        Label maps (:data:`SEG_LABELS` codes); may be a memory map.
    series_id : ndarray of shape (n_slices,)
        Series of each slice.
    min_pixels : float, default=0
        An organ whose largest area in a series is below this is "not found" there: visibility 0.

    Returns
    -------
    area : ndarray of shape (n_slices, n_organs), dtype=int64
        Pixels of each organ of :data:`SEG_ORGANS` on each slice.
    vis : ndarray of shape (n_slices, n_organs), dtype=float32
        In [0, 1]; the maximum over a series is 1 for every organ found in it, else 0.
    """
    series_id = np.asarray(series_id)
    area = np.zeros((len(series_id), len(SEG_ORGANS)), np.int64)
    for start in range(0, len(series_id), 256):
        chunk = np.asarray(labels[start : start + 256])
        for k, code in enumerate(SEG_LABELS.values()):
            area[start : start + len(chunk), k] = (chunk == code).sum(axis=(1, 2))
    largest = pd.DataFrame(area).groupby(series_id).transform("max").to_numpy()
    found = (largest >= max(min_pixels, 1)).astype(bool)
    vis = np.where(found, area / np.maximum(largest, 1), 0.0).astype(np.float32)
    return area, vis
