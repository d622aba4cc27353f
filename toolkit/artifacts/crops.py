"""The crop set: one organ's slices cut to a square around the organ, with its mask and soft targets.

``toolkit crop`` writes one per organ of :data:`toolkit.CROP_ORGANS` (:func:`seg.crops.make_crop_sets`);
``train``, ``gen`` and ``explain`` read it with :meth:`CropSet.load` (or :func:`load_crop_set`). On disk
it is a slice set folder (:class:`toolkit.sliceset.SliceSet`) with the organ's mask beside every crop::

    store/crops/<organ>/images.npy    int16 HU, shape (n, size, size): the organ's square of a store slice
    store/crops/<organ>/masks.npy     uint8, shape (n, size, size): 1 on the organ (the crop's side for a
                                      kidney), 0 elsewhere; row i belongs to images[i]
    store/crops/<organ>/manifest.csv  one row per crop, :data:`CROP_COLUMNS`
    store/crops/<organ>/meta.json     the fields of :class:`CropSet` (+ provenance)

Manifest columns (beyond the store's ``patient_id``, ``series_id``, ``instance``, ``z``, ``split``,
``fold``, ``source`` and ``field_top``/``field_left``/``field_side``):

    side            "left" / "right" for a kidney crop, "" for liver and spleen
    store_row       the row of the store slice the crop was cut from
    crop_top, crop_left, crop_side
                    int, the organ's square in stored-slice pixels (one per series and side: a lesion keeps
                    its place from slice to slice); may reach outside the slice, which reads as air
    vis             the organ's visibility on the slice (store/organs.csv: area / its largest area in the series)
    target          float in [0, 1], the training target: where the series' <organ> label comes from
                    image-level rows (image_level 1), the slice label (0/1); else the patient's label (0/1)
                    times vis, as the RSNA 2023 1st-place solution did
    <organ>         int, the hard label (grade) the balancer stratifies on and generators condition on:
                    the grade where target >= :data:`HARD_THRESHOLD`, else 0
    <organ>_patient int, the patient grade (evaluation is at patient level, over all of a patient's crops)
    slice_label     int, the store's <organ> slice label
    image_level     int, 1 where the target comes from image-level rows
    label_source    "rsna" / "totalsegmentator" / "predicted": where the slice's organ label map came from
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from toolkit import CROP_ORGANS
from toolkit.errors import ContractError, DataError
from toolkit.sliceset import FIELD_COLUMNS, MANIFEST_FILE, META_FILE, SliceSet

ARTIFACT = "crops"
FORMAT_VERSION = 1
CROPS_DIR = "crops"
MASKS_FILE = "masks.npy"

HARD_THRESHOLD = 0.5
"""A crop is *injured* for the balancer (and a generator's class) when its target reaches this: the class
the soft target's BCE pushes it toward. An injured patient's crops at the organ's edge (visibility below
one half) count as healthy there, while their loss still sees their small positive target."""

SIDES: dict[str, dict[str, str]] = {
    "kidney": {"left": "kidney_left", "right": "kidney_right"},
    "liver": {"": "liver"},
    "spleen": {"": "spleen"},
}
"""Crop organ -> {side: the localizer's organ}: both kidneys go into the ``kidney`` set, one row per side."""

CROP_COLUMNS: tuple[str, ...] = (
    "patient_id", "series_id", "instance", "z", "side", "store_row", "split", "fold", "source",
    "crop_top", "crop_left", "crop_side", *FIELD_COLUMNS, "vis", "target", "slice_label", "image_level",
    "label_source",
)
"""Manifest columns every crop set has, besides ``<organ>`` and ``<organ>_patient``."""

_FIELDS = ("organ", "size", "margin", "min_visibility", "crop_id", "split_hash", "store_manifest_sha", "labels_sha")
_OWN_KEYS = {"artifact", "format_version", "source", *_FIELDS, "n_slices", "size"}


def reads_crops(stage_input: str, organ: str, crop_organs: Sequence[str]) -> bool:
    """Whether a stage set to ``stage_input`` (``train.input`` / ``gen.input``: crops or slices) reads
    ``organ``'s crop set: only organs with one (``crop.organs``); the others read the stored slices."""
    return stage_input == "crops" and organ in crop_organs


def crops_dir(store_dir: str | Path, organ: str) -> Path:
    """``store/crops/<organ>/``."""
    return Path(store_dir) / CROPS_DIR / organ


def file_sha(path: str | Path) -> str:
    """sha256 of a file's bytes (the store manifest, organs.csv): what a crop set was cut from."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_crop_id(organ: str, settings: dict[str, Any], store_manifest_sha: str, labels_sha: str) -> str:
    """``<organ>-crops-<hash8>``: the same settings cut from the same store and label maps give the same id."""
    key = {"organ": organ, "settings": settings, "store": store_manifest_sha, "labels": labels_sha,
           "format": FORMAT_VERSION}
    return f"{organ}-crops-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]}"


@dataclass
class CropSet:
    """One organ's crops and how they were cut.

    Attributes
    ----------
    slices : SliceSet
        ``images`` of shape (n, size, size), int16 HU; the manifest described in the module docstring.
    masks : ndarray of shape (n, size, size), dtype=uint8
        1 on the organ (the row's side for a kidney), else 0; may be a read-only memory map.
    organ : str
        One of :data:`toolkit.CROP_ORGANS`.
    size : int
        Pixels per side (``crop.size``).
    margin, min_visibility : float
        ``crop.margin`` and ``crop.min_visibility`` they were cut with.
    crop_id : str
        :func:`make_crop_id`; runs and synthetic sets record it.
    split_hash : str or None
        The store's split.
    store_manifest_sha, labels_sha : str
        sha256 of the store's ``manifest.csv`` and ``organs.csv`` the crops were cut from.
    provenance : dict
        Counts, missing series, seconds (meta.json).
    path : Path, optional
    """

    slices: SliceSet
    masks: np.ndarray
    organ: str
    size: int
    margin: float
    min_visibility: float
    crop_id: str
    split_hash: str | None
    store_manifest_sha: str
    labels_sha: str
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.masks.shape != self.slices.images.shape:
            raise ContractError(
                f"crop set of {self.organ}: masks {self.masks.shape} do not match images {self.slices.images.shape}"
            )

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def table(self) -> pd.DataFrame:
        return self.slices.table

    @property
    def images(self) -> np.ndarray:
        return self.slices.images

    @property
    def targets(self) -> np.ndarray:
        """Soft training targets, shape (n,), float32 in [0, 1]."""
        return self.table["target"].to_numpy(np.float32)

    @property
    def hard_labels(self) -> np.ndarray:
        """Binary labels the balancer stratifies on (target >= :data:`HARD_THRESHOLD`), shape (n,), int64."""
        return self.slices.labels(self.organ, "slice")

    def meta(self) -> dict[str, Any]:
        own = {key: getattr(self, key) for key in _FIELDS}
        return {**self.provenance, "artifact": ARTIFACT, "format_version": FORMAT_VERSION, "source": "real", **own}

    # ------------------------------------------------------------------ writer
    def save(self, directory: str | Path, force: bool = False) -> Path:
        """Write the folder through a temporary sibling that is renamed at the end (never half a set)."""
        directory = Path(directory)
        if (directory / MANIFEST_FILE).exists() and not force:
            raise ContractError(f"{directory} already holds a crop set; pass --force to overwrite it")
        tmp = directory.with_name(directory.name + ".tmp")
        write_crop_folder(tmp, self.slices.images, self.masks, self.table, self.meta())
        replace_folder(tmp, directory)
        self.path = directory
        return directory

    # ------------------------------------------------------------------ reader
    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> CropSet:
        """Read a folder :meth:`save` (or :func:`write_crop_folder`) wrote; images and masks memory-mapped."""
        directory = Path(directory)
        if not (directory / MANIFEST_FILE).exists():
            raise DataError(f"no crop set at {directory}; run `toolkit crop`")
        slices = SliceSet.load(directory, mmap=mmap)
        meta = slices.meta
        missing = [key for key in _FIELDS if key not in meta]
        if meta.get("artifact") != ARTIFACT or missing:
            lacks = ", ".join(missing or ["artifact"])
            raise ContractError(
                f"{directory / META_FILE} does not record how the crops were cut (no {lacks}); "
                "re-run `toolkit crop --force`"
            )
        organ = meta["organ"]
        lacking = [c for c in (*CROP_COLUMNS, organ, f"{organ}_patient") if c not in slices.table.columns]
        if lacking:
            raise DataError(f"{directory / MANIFEST_FILE} lacks column(s) {', '.join(lacking)}; re-run `toolkit crop "
                            "--force`")
        side = slices.table["side"]
        slices.table["side"] = np.where(side.isna(), "", side.astype(str))  # "" reads back as NaN
        masks = np.load(directory / MASKS_FILE, mmap_mode="r" if mmap else None)
        return cls(
            slices=slices,
            masks=masks,
            provenance={k: v for k, v in meta.items() if k not in _OWN_KEYS},
            path=directory,
            **{key: meta[key] for key in _FIELDS},
        )

    def check_store(self, store_dir: str | Path) -> None:
        """Refuse a crop set cut from another store manifest (a re-run ``prepare``): its rows would not match."""
        manifest = Path(store_dir) / MANIFEST_FILE
        if file_sha(manifest) != self.store_manifest_sha:
            raise ContractError(
                f"crop set {self.path} was cut from another {manifest} (the store was prepared again); "
                "re-run `toolkit segment` and `toolkit crop --force`"
            )


def write_crop_folder(
    directory: Path, images: np.ndarray, masks: np.ndarray, table: pd.DataFrame, meta: dict[str, Any]
) -> None:
    """Images and masks (arrays or memory maps already in ``directory``), then meta, then the manifest last."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array, dtype in (("images.npy", images, np.int16), (MASKS_FILE, masks, np.uint8)):
        if getattr(array, "filename", None) is None or Path(array.filename) != directory / name:
            np.save(directory / name, np.ascontiguousarray(array, dtype=dtype))
        else:
            array.flush()
    meta = {**meta, "n_slices": len(table), "size": int(images.shape[-1])}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    table.to_csv(directory / MANIFEST_FILE, index=False)


def replace_folder(tmp: Path, directory: Path) -> None:
    """Move the finished ``tmp`` folder to ``directory`` (the old one, if any, goes first)."""
    if directory.exists():
        shutil.rmtree(directory)
    tmp.replace(directory)


def load_crop_set(store_dir: str | Path, organ: str) -> CropSet:
    """The organ's crop set of the store, checked against the store's manifest.

    Raises
    ------
    DataError
        No crop set (names ``toolkit crop`` and ``input=slices`` as the ways out).
    ContractError
        A set cut from another store manifest.
    """
    if organ not in CROP_ORGANS:
        raise DataError(f"{organ} has no crop set (crop organs: {', '.join(CROP_ORGANS)}); it reads the stored slices")
    directory = crops_dir(store_dir, organ)
    if not (directory / MANIFEST_FILE).exists():
        raise DataError(
            f"no {organ} crop set in {directory}: run `toolkit segment` then `toolkit crop`, "
            "or read whole slices with --set train.input=slices (gen.input=slices for generators)"
        )
    crops = CropSet.load(directory)
    crops.check_store(store_dir)
    return crops
