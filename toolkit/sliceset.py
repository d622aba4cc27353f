"""The one data type that flows through the pipeline.

A :class:`SliceSet` is an array of CT slices in Hounsfield units plus a table
with one row per slice. ``prepare`` writes the real store as one, ``gen`` writes
synthetic slices as one, ``train`` and ``compare`` read them.

On disk a slice set is a folder::

    images.npy     int16 HU, shape (n_slices, H, W), memory-mappable (np.load(mmap_mode="r"))
    manifest.csv   one row per slice (columns below)
    meta.json      size, spacing, provenance, toolkit version
    masks.npy      real store only: uint8 organ masks, shape (n_slices, H, W), row i on images[i];
                   codes 1 liver, 2 spleen, 3 left kidney, 4 right kidney, 5 bowel (RSNA's), 0 elsewhere
                   and on every slice of a series without a mask; read with toolkit.data.masks.load_masks

Manifest columns (real store):

    patient_id      int, the pseudonymous id of the label CSV (never a DICOM tag value)
    series_id       int
    instance        int, the DICOM InstanceNumber of the source file
    z               float, position along the patient axis in mm (slices are sorted by it)
    <organ>         int grade used as the slice's training label: 0 healthy, 1 injured/low, 2 high
    <organ>_patient int grade of the patient from train.csv (evaluation is at patient level)
    split           "train" or "test"
    fold            int cross-validation fold of a train patient, -1 for test patients
    source          "real" or "synthetic"
    aortic_hu, incomplete_organ   from train_series_meta.csv when given
    field_top, field_left, field_side
                    int, the square of the source image (pixels; may reach outside it, read as
                    air) resampled into the stored slice: maps masks onto stored slices
    mask_source     "rsna" or "totalsegmentator": where the series' masks.npy masks came from;
                    empty (NaN when read back from CSV) for a series without one
    <organ>_image_level
                    int 1 where the slice's <organ> label comes from image_level_labels.csv rows
                    (the series has rows for that organ), else 0 (the patient grade)

Synthetic sets add ``generator_id`` and ``near_copy`` (bool, flagged by the audit).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from toolkit import ORGANS
from toolkit.errors import ToolkitError

IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.csv"
META_FILE = "meta.json"

REQUIRED_COLUMNS: tuple[str, ...] = ("patient_id", "series_id", "instance", "z", "source")
FIELD_COLUMNS: tuple[str, ...] = ("field_top", "field_left", "field_side")


@dataclass
class SliceSet:
    """Slices in Hounsfield units and one table row per slice.

    Parameters
    ----------
    images : ndarray of shape (n_slices, H, W), dtype=int16
        Hounsfield units, unwindowed. May be a read-only memory map.
    table : DataFrame of n_slices rows
        The manifest; row ``i`` describes ``images[i]``.
    meta : dict
        Free-form provenance (size, spacing, checksums, config, versions).
    """

    images: np.ndarray
    table: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 3:
            raise ToolkitError(f"slice set images must have shape (n, H, W), got {self.images.shape}")
        if len(self.images) != len(self.table):
            raise ToolkitError(
                f"slice set has {len(self.images)} images but {len(self.table)} manifest rows"
            )
        self.table = self.table.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, rows: np.ndarray | Sequence[int] | pd.Series) -> SliceSet:
        """Rows selected by a boolean mask or integer positions (images are copied into memory)."""
        rows = np.asarray(rows)
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        return SliceSet(np.asarray(self.images[idx]), self.table.iloc[idx].reset_index(drop=True), dict(self.meta))

    def labels(self, organ: str, level: str = "slice") -> np.ndarray:
        """Binary injury labels, shape (n_slices,), dtype=int64.

        ``level="slice"`` uses the slice's training label, ``"patient"`` the patient's.
        """
        col = organ if level == "slice" else f"{organ}_patient"
        if col not in self.table.columns:
            raise ToolkitError(f"slice set has no column '{col}'; re-run `toolkit prepare`")
        return (self.table[col].to_numpy() > 0).astype(np.int64)

    # ------------------------------------------------------------------ I/O
    def save(self, directory: str | Path, force: bool = False) -> Path:
        """Write ``images.npy``, ``manifest.csv`` and ``meta.json`` into ``directory``."""
        directory = Path(directory)
        if (directory / MANIFEST_FILE).exists() and not force:
            raise ToolkitError(f"{directory} already holds a slice set; pass --force to overwrite it")
        directory.mkdir(parents=True, exist_ok=True)
        # Write to temporary names first so an interrupted save never leaves a half set.
        tmp_images = directory / (IMAGES_FILE + ".tmp.npy")
        np.save(tmp_images, np.ascontiguousarray(self.images, dtype=np.int16))
        tmp_images.replace(directory / IMAGES_FILE)
        self.table.to_csv(directory / (MANIFEST_FILE + ".tmp"), index=False)
        meta = {**self.meta, "n_slices": len(self), "size": list(self.size)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        (directory / (MANIFEST_FILE + ".tmp")).replace(directory / MANIFEST_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> SliceSet:
        """Read a slice set folder; images are memory-mapped unless ``mmap=False``."""
        directory = Path(directory)
        manifest = directory / MANIFEST_FILE
        if not manifest.exists():
            raise ToolkitError(f"no slice set at {directory} (missing {MANIFEST_FILE}); run the stage that makes it")
        images = np.load(directory / IMAGES_FILE, mmap_mode="r" if mmap else None)
        table = pd.read_csv(manifest)
        meta_path = directory / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
        if missing:
            raise ToolkitError(f"{manifest} lacks column(s) {', '.join(missing)}; re-create it")
        return cls(images, table, meta)

    @staticmethod
    def concat(sets: Sequence[SliceSet]) -> SliceSet:
        """Stack slice sets of the same image size; tables are concatenated (missing columns become NaN)."""
        sets = [s for s in sets if len(s)]
        if not sets:
            raise ToolkitError("nothing to concatenate: every slice set is empty")
        sizes = {s.size for s in sets}
        if len(sizes) > 1:
            raise ToolkitError(f"cannot concatenate slice sets of different sizes {sorted(sizes)}")
        images = np.concatenate([np.asarray(s.images) for s in sets])
        table = pd.concat([s.table for s in sets], ignore_index=True)
        return SliceSet(images, table, dict(sets[0].meta))


def organ_columns() -> list[str]:
    """Label columns every real manifest carries, in order."""
    return [c for o in ORGANS for c in (o, f"{o}_patient")]


def image_level_column(organ: str) -> str:
    """The manifest column that is 1 where ``organ``'s slice label comes from image-level rows."""
    return f"{organ}_image_level"


def image_level_columns() -> list[str]:
    """``<organ>_image_level`` columns of a real manifest (written by prepare since organ crops), in order."""
    return [image_level_column(o) for o in ORGANS]
