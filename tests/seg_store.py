"""A phantom slice store with organ masks on part of its series, for `toolkit segment` tests.

Until `toolkit prepare` ingests masks itself, :func:`make_annotated_store` writes the store
interface it will: ``store/masks.npy`` (uint8 (n_slices, S, S), RSNA codes liver 1, spleen 2,
kidney_left 3, kidney_right 4, bowel 5) and the manifest column ``mask_source``, made from the
phantom's truth (``data/phantom_truth/<series>.npz``) and cut onto each stored slice with the
manifest's field columns, exactly as the store cut the image.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from eval.explain import resize_mask
from seg.store import MASK_SOURCE, MASKS_FILE, SEG_LABELS
from toolkit.config import Config, DataConfig, PhantomConfig
from toolkit.data.phantom_anatomy import ORGAN_CODES
from toolkit.sliceset import FIELD_COLUMNS, MANIFEST_FILE, SliceSet


def rsna_codes(organs: np.ndarray) -> np.ndarray:
    """Phantom organ codes (n, H, W) -> RSNA segmentation codes, kidneys split at the body midline.

    The midline is the mean column of the series' bone (vertebra and both sides' ribs). The
    phantom's images are axial, viewed from the feet: the patient's left is the image's right.
    """
    out = np.zeros(organs.shape, np.uint8)
    out[organs == ORGAN_CODES["liver"]] = SEG_LABELS["liver"]
    out[organs == ORGAN_CODES["spleen"]] = SEG_LABELS["spleen"]
    out[organs == ORGAN_CODES["bowel"]] = SEG_LABELS["bowel"]
    bone_cols = np.nonzero(organs == ORGAN_CODES["bone"])[-1]
    midline = bone_cols.mean() if len(bone_cols) else (organs.shape[-1] - 1) / 2
    cols = np.arange(organs.shape[-1])[None, None, :]
    kidney = organs == ORGAN_CODES["kidney"]
    out[kidney & (cols > midline)] = SEG_LABELS["kidney_left"]
    out[kidney & (cols <= midline)] = SEG_LABELS["kidney_right"]
    return out


def store_cfg(size: int, slices_per_series: int, test_fraction: float = 0.4, seed: int = 0) -> Config:
    data = dataclasses.replace(
        DataConfig(), size=size, slices_per_series=slices_per_series, test_fraction=test_fraction, folds=2,
        workers=1, crop_body=True,
    )
    return dataclasses.replace(Config(), data=data, seed=seed)


def add_masks(data_dir: Path, store_dir: Path, annotated_series: list[int], source: str = "rsna") -> SliceSet:
    """Write ``store/masks.npy`` and ``mask_source`` for ``annotated_series`` from the phantom truth."""
    store = SliceSet.load(store_dir)
    table = store.table
    size = store.size[0]
    masks = np.zeros((len(table), size, size), np.uint8)
    for series_id in annotated_series:
        with np.load(Path(data_dir) / "phantom_truth" / f"{series_id}.npz") as truth:
            codes = rsna_codes(truth["organs"])
            by_instance = {int(i): k for k, i in enumerate(truth["instance_number"])}
        for row in np.flatnonzero(table["series_id"].to_numpy() == series_id):
            fld = tuple(int(table.at[row, c]) for c in FIELD_COLUMNS)
            masks[row] = resize_mask(codes[by_instance[int(table.at[row, "instance"])]], size, fld)
    np.save(store_dir / MASKS_FILE, masks)
    table[MASK_SOURCE] = np.where(table["series_id"].isin(annotated_series), source, "")
    table.to_csv(store_dir / MANIFEST_FILE, index=False)
    return SliceSet.load(store_dir)


def make_annotated_store(
    root: Path,
    patients: int = 10,
    slices: int = 12,
    size: int = 64,
    store_size: int = 64,
    slices_per_series: int = 8,
    annotated_share: dict[str, float] | None = None,
    seed: int = 0,
    prevalence: dict[str, float] | None = None,
) -> tuple[Path, Path]:
    """Phantom -> prepared store -> masks on a share of each split's series (default: half); ``prevalence``
    overrides the phantom's injury prevalence of some organs.

    Returns
    -------
    (data_dir, store_dir)
    """
    from toolkit.data.phantom import write_phantom
    from toolkit.data.prepare import prepare_store

    data_dir, store_dir = Path(root) / "data", Path(root) / "store"
    phantom = dataclasses.replace(PhantomConfig(), patients=patients, slices=slices, size=size)
    if prevalence:
        phantom = dataclasses.replace(phantom, prevalence={**phantom.prevalence, **prevalence})
    write_phantom(data_dir, phantom, seed=seed)
    store = prepare_store(data_dir, store_dir, store_cfg(store_size, slices_per_series, seed=seed))
    series = store.table.groupby("series_id")["split"].first()
    share = {"train": 0.5, "test": 0.5, **(annotated_share or {})}
    chosen: list[int] = []
    for split in ("train", "test"):
        ids = np.random.default_rng(seed).permutation(sorted(int(s) for s in series[series == split].index))
        k = max(1, int(round(share[split] * len(ids)))) if len(ids) else 0
        chosen += sorted(int(s) for s in ids[:k])
    add_masks(data_dir, store_dir, chosen)
    return data_dir, store_dir


def patients_of(table: pd.DataFrame, split: str) -> set[int]:
    return set(table.loc[table["split"] == split, "patient_id"].astype(int))
