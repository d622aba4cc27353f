"""``toolkit crop``: per-organ crop sets cut around the organ the localizer found.

For each organ of ``crop.organs`` (liver, spleen, kidney) and each series of the store:

1. the slices where the organ is visible: ``vis > crop.min_visibility`` in ``store/organs.csv``
   (``toolkit segment``; both kidneys separately, ``vis_kidney_left`` / ``vis_kidney_right``);
2. ONE square per series (and side) around the organ on those slices (:func:`organ_box`), widened by
   ``crop.margin``, so a lesion keeps its place within the crop from slice to slice;
3. each slice's square cut from the stored slice (outside reads as air) and resized to ``crop.size``
   (:func:`cut_crops`), the organ mask beside it (:func:`cut_masks`);
4. soft targets and hard labels (:func:`crop_targets`).

Each organ's crops are written as a :class:`toolkit.artifacts.crops.CropSet` in ``store/crops/<organ>/``
(kidney: left and right crops in one set, column ``side``). A series where the localizer found no organ
adds no crops for it (one warning per series) and keeps its crops of the organs it has.

A stage of its own rather than the end of ``toolkit segment``: crop settings (size, margin, visibility)
change in seconds while the localizer takes minutes to train, and ``predict`` runs the same
:func:`series_crops` on a new series.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seg.store import LABELS_FILE, ORGANS_FILE, SEG_LABELS, read_organ_labels, read_organs
from toolkit import CROP_ORGANS
from toolkit.artifacts.crops import (
    ARTIFACT,
    CROP_COLUMNS,
    FORMAT_VERSION,
    HARD_THRESHOLD,
    MASKS_FILE,
    SIDES,
    CropSet,
    crops_dir,
    file_sha,
    make_crop_id,
    replace_folder,
    write_crop_folder,
)
from toolkit.config import Config, CropConfig, check_section
from toolkit.errors import ContractError, DataError
from toolkit.reporting import Reporter, as_reporter
from toolkit.sliceset import FIELD_COLUMNS, IMAGES_FILE, MANIFEST_FILE, SliceSet, image_level_column

MIN_SIDE = 8
"""Fewest stored pixels per side of a crop box: a speck of an organ still gets some context."""

_WARN_LIMIT = 20


# ------------------------------------------------------------------ one series
def organ_box(mask: np.ndarray, margin: float, min_side: int = MIN_SIDE) -> tuple[int, int, int] | None:
    """The square around an organ on all slices of a series: one box, so the scale and place stay put.

    Specks the localizer marks away from the organ would stretch the box: only the organ's
    3D-connected parts of at least a tenth of its largest part count.

    Parameters
    ----------
    mask : ndarray of shape (n_slices, S, S), dtype=bool
        The organ on the series' slices (stacked along z).
    margin : float
        Added on each side, as a share of the box's larger side.
    min_side : int, default=MIN_SIDE

    Returns
    -------
    (top, left, side) : tuple of int, or None when the mask is empty
        In stored-slice pixels; may reach outside the slice.
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    parts, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(parts.ravel())[1:]
        mask = np.isin(parts, np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1)
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(int(np.ceil(max(bottom - top, right - left) * (1.0 + 2.0 * margin))), int(min_side))
    return int(round((top + bottom - side) / 2)), int(round((left + right - side) / 2)), side


def cut_crops(images: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """The box of each HU slice, resized to (size, size) (area when shrinking, bilinear when enlarging).

    Parameters
    ----------
    images : ndarray of shape (n, S, S)
        Hounsfield units.
    box : (top, left, side)
    size : int

    Returns
    -------
    ndarray of shape (n, size, size), dtype=int16
    """
    from toolkit.data.dicom import cut_field
    from toolkit.transforms import resize_slices

    square = cut_field(np.asarray(images, np.float32), box)  # outside the slice: air
    return np.round(resize_slices(square, size)).astype(np.int16)


def cut_masks(mask: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """The box of each mask, nearest-neighbour resized: ndarray of shape (n, size, size), dtype=uint8."""
    from toolkit.data.dicom import cut_field

    square = cut_field(np.asarray(mask, np.uint8), box, fill=0)
    idx = np.minimum(((np.arange(size) + 0.5) * box[2] / size).astype(np.int64), box[2] - 1)
    return np.ascontiguousarray(square[:, idx][:, :, idx])


def crop_targets(
    patient_grade: np.ndarray, slice_label: np.ndarray, image_level: np.ndarray, vis: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Soft training targets and hard labels of crops.

    Parameters
    ----------
    patient_grade, slice_label : ndarray of shape (n,), int
        The store's ``<organ>_patient`` and ``<organ>`` of each crop's slice.
    image_level : ndarray of shape (n,), bool
        The slice label comes from image-level rows: it wins.
    vis : ndarray of shape (n,), float
        The organ's visibility on the slice.

    Returns
    -------
    target : ndarray of shape (n,), dtype=float32
        ``slice_label > 0`` where ``image_level``, else ``(patient_grade > 0) * vis``.
    hard : ndarray of shape (n,), dtype=int64
        The grade where ``target >= HARD_THRESHOLD`` (at least 1), else 0.
    """
    image_level = np.asarray(image_level, bool)
    slice_label, patient_grade = np.asarray(slice_label, np.int64), np.asarray(patient_grade, np.int64)
    target = np.where(image_level, slice_label > 0, (patient_grade > 0) * np.asarray(vis, np.float64))
    grade = np.maximum(np.where(image_level, slice_label, patient_grade), 1)
    hard = np.where(target >= HARD_THRESHOLD, grade, 0)
    return target.astype(np.float32), hard.astype(np.int64)


@dataclass
class SideCrops:
    """One organ side's crops of one series (what :func:`series_crops` returns)."""

    side: str  # "left" / "right" for a kidney, "" otherwise
    rows: np.ndarray  # (k,) positions in the series of the cropped slices
    vis: np.ndarray  # (k,) float32
    box: tuple[int, int, int]  # (top, left, side) in stored pixels
    images: np.ndarray  # (k, size, size) int16 HU
    masks: np.ndarray  # (k, size, size) uint8


def visible_rows(vis: np.ndarray, min_visibility: float) -> np.ndarray:
    """Bool per slice: the organ enters the crop set there (``vis > min_visibility``; never at vis 0)."""
    vis = np.asarray(vis, np.float32)
    return (vis > min_visibility) & (vis > 0)


def series_crops(
    hu: np.ndarray, labels: np.ndarray, vis: dict[str, np.ndarray], organ: str, crop: CropConfig
) -> list[SideCrops]:
    """Crops of one organ (each side) on one series; a side the localizer did not find is left out.

    Parameters
    ----------
    hu : ndarray of shape (n, S, S)
        The series' stored slices in HU, ordered along z.
    labels : ndarray of shape (n, S, S), dtype=uint8
        Their organ label maps (:data:`seg.store.SEG_LABELS` codes).
    vis : dict of str to ndarray of shape (n,)
        Visibility of each localizer organ (``vis_<organ>`` of organs.csv, or :func:`seg.store.visibility`).
    organ : str
        One of :data:`toolkit.CROP_ORGANS`.
    crop : CropConfig

    Returns
    -------
    list of SideCrops
        One per side with any visible slice.
    """
    out = []
    for side, seg_organ in SIDES[organ].items():
        member = visible_rows(vis[seg_organ], crop.min_visibility)
        if not member.any():
            continue
        rows = np.flatnonzero(member)
        mask = np.asarray(labels[rows]) == SEG_LABELS[seg_organ]
        box = organ_box(mask, crop.margin)
        if box is None:  # visibility says yes, the label map no: a stale organs.csv
            raise DataError(f"{organ} ({seg_organ}) is visible in organs.csv but not in {LABELS_FILE}; "
                            "re-run `toolkit segment --force`")
        out.append(SideCrops(side, rows, np.asarray(vis[seg_organ], np.float32)[rows], box,
                             cut_crops(np.asarray(hu)[rows], box, crop.size), cut_masks(mask, box, crop.size)))
    return out


# ------------------------------------------------------------------ the store
def crop_settings(crop: CropConfig) -> dict[str, Any]:
    """The settings a crop set depends on (enter its id)."""
    return {"size": int(crop.size), "margin": float(crop.margin), "min_visibility": float(crop.min_visibility)}


def image_level_rows(table: pd.DataFrame, organ: str, reporter: Reporter) -> np.ndarray:
    """Bool per store row: the slice's ``organ`` label comes from image-level rows.

    Stores prepared before ``<organ>_image_level`` existed: a series whose slice labels differ from
    the patient grade somewhere had image-level rows (a series all of whose slices are listed
    cannot be told apart and takes the soft targets).
    """
    column = image_level_column(organ)
    if column in table.columns:
        return table[column].to_numpy() > 0
    reporter.warn(
        f"the store's manifest has no {column} column (prepared by an earlier toolkit): series with image-level "
        f"{organ} rows are inferred from their slice labels; re-run `toolkit prepare --force` to record them"
    )
    differs = (table[organ] != table[f"{organ}_patient"]).groupby(table["series_id"]).transform("any")
    return differs.to_numpy()


def make_crop_sets(
    store_dir: str | Path,
    cfg: Config,
    organs: list[str] | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, dict[str, Any]]:
    """Cut every organ's crop set from the store (module docstring); keep sets that are up to date.

    Parameters
    ----------
    store_dir : path
        A slice store with ``organ_labels.npy`` and ``organs.csv`` (``toolkit segment``).
    cfg : Config
        ``cfg.crop``.
    organs : list of str, optional
        Default: ``cfg.crop.organs``.
    force : bool, default=False
        Replace a set cut with other settings or from other label maps (else refused).
    reporter : Reporter, optional
        Warnings (series without the organ), progress over series.

    Returns
    -------
    dict
        Per organ: ``status`` ("made" or "kept"), ``path``, ``crop_id``, ``crops``, ``series``, ``patients``,
        ``injured`` (hard label), ``organ_share`` (mean share of a crop the organ covers),
        ``series_without_organ``, ``test_patients_without_crops``, ``seconds``.
    """
    reporter = as_reporter(reporter)
    crop = check_section(cfg.crop, "crop")
    organs = list(organs or crop.organs)
    unknown = [o for o in organs if o not in CROP_ORGANS]
    if unknown:
        raise DataError(f"no crop set for '{unknown[0]}'; crop organs: {', '.join(CROP_ORGANS)} "
                        "(bowel and extravasation keep the stored slices)")
    store_dir = Path(store_dir)
    if not (store_dir / MANIFEST_FILE).exists():
        raise DataError(f"no slice store in {store_dir}: run `toolkit prepare` first")
    store = SliceSet.load(store_dir)
    table = store.table
    need = ["split", "fold", *FIELD_COLUMNS, *[c for o in organs for c in (o, f"{o}_patient")]]
    lacking = [c for c in need if c not in table.columns]
    if lacking:
        raise DataError(f"{store_dir / MANIFEST_FILE} lacks column(s) {', '.join(lacking)}; "
                        "re-run `toolkit prepare --force`")
    organ_table = read_organs(store_dir, table)
    labels = read_organ_labels(store_dir)
    manifest_sha, labels_sha = file_sha(store_dir / MANIFEST_FILE), file_sha(store_dir / ORGANS_FILE)
    settings = crop_settings(crop)

    results: dict[str, dict[str, Any]] = {}
    todo: list[str] = []
    for organ in organs:
        out = crops_dir(store_dir, organ)
        crop_id = make_crop_id(organ, settings, manifest_sha, labels_sha)
        if (out / MANIFEST_FILE).exists():
            old = CropSet.load(out)
            if old.crop_id == crop_id:
                results[organ] = {**old.provenance.get("summary", {}), "status": "kept", "path": str(out)}
                reporter.info(f"{organ} crops in {out} are up to date ({crop_id}); kept")
                continue
            if not force:
                raise ContractError(
                    f"{out} was cut with other crop settings or from other label maps ({old.crop_id}, now "
                    f"{crop_id}); pass --force to cut it again"
                )
        todo.append(organ)
    if not todo:
        return results

    start = time.perf_counter()
    series_id = table["series_id"].to_numpy()
    vis_all = {o: organ_table[f"vis_{o}"].to_numpy(np.float32) for o in SEG_LABELS}
    # Sizes are known before cutting (one crop per visible slice and side): write into memory maps.
    writers = {}
    for organ in todo:
        n = int(sum(visible_rows(vis_all[s], crop.min_visibility).sum() for s in SIDES[organ].values()))
        tmp = crops_dir(store_dir, organ).with_name(organ + ".tmp")
        if tmp.exists():  # left by an interrupted run
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        shape = (n, crop.size, crop.size)
        writers[organ] = {
            "tmp": tmp,
            "images": np.lib.format.open_memmap(tmp / IMAGES_FILE, mode="w+", dtype=np.int16, shape=shape),
            "masks": np.lib.format.open_memmap(tmp / MASKS_FILE, mode="w+", dtype=np.uint8, shape=shape),
            "cursor": 0, "parts": [], "missing": [], "organ_share": 0.0,
            "image_level": image_level_rows(table, organ, reporter),
        }

    groups = pd.Series(np.arange(len(table))).groupby(series_id, sort=False)
    with reporter.progress() as progress:
        task = progress.add_task(f"crop {', '.join(todo)}", total=groups.ngroups, info="")
        for sid, positions in groups:
            rows = positions.to_numpy()
            hu, lab = np.asarray(store.images[rows]), np.asarray(labels[rows])
            vis = {o: v[rows] for o, v in vis_all.items()}
            for organ in todo:
                w = writers[organ]
                found = series_crops(hu, lab, vis, organ, crop)
                sides_found = {c.side for c in found}
                absent = [s for s in SIDES[organ] if s not in sides_found]
                if absent:
                    w["missing"].append((int(sid), [SIDES[organ][s] for s in absent]))
                for c in found:
                    k = len(c.rows)
                    w["images"][w["cursor"] : w["cursor"] + k] = c.images
                    w["masks"][w["cursor"] : w["cursor"] + k] = c.masks
                    w["cursor"] += k
                    w["organ_share"] += float(c.masks.mean(axis=(1, 2)).sum())
                    store_rows = rows[c.rows]
                    w["parts"].append(_crop_rows(table, organ_table, organ, store_rows, c, w["image_level"]))
            progress.advance(task)

    for organ in todo:
        results[organ] = _finish(store_dir, store, organ, writers[organ], settings, manifest_sha, labels_sha,
                                 time.perf_counter() - start, reporter)
    return results


def _crop_rows(
    table: pd.DataFrame, organ_table: pd.DataFrame, organ: str, store_rows: np.ndarray, c: SideCrops,
    image_level: np.ndarray,
) -> pd.DataFrame:
    """The manifest rows of one side's crops of one series (:data:`toolkit.artifacts.crops.CROP_COLUMNS`)."""
    src = table.iloc[store_rows]
    target, hard = crop_targets(src[f"{organ}_patient"].to_numpy(), src[organ].to_numpy(),
                                image_level[store_rows], c.vis)
    top, left, side = c.box
    part = pd.DataFrame({
        "patient_id": src["patient_id"].to_numpy(), "series_id": src["series_id"].to_numpy(),
        "instance": src["instance"].to_numpy(), "z": src["z"].to_numpy(), "side": c.side,
        "store_row": store_rows.astype(np.int64), "split": src["split"].to_numpy(), "fold": src["fold"].to_numpy(),
        "source": "real", "crop_top": top, "crop_left": left, "crop_side": side,
    })
    for column in FIELD_COLUMNS:
        part[column] = src[column].to_numpy()
    part["vis"] = np.round(c.vis, 4)
    part["target"] = np.round(target, 4)
    part[organ] = hard
    part[f"{organ}_patient"] = src[f"{organ}_patient"].to_numpy()
    part["slice_label"] = src[organ].to_numpy()
    part["image_level"] = image_level[store_rows].astype(np.int64)
    part["label_source"] = organ_table["label_source"].to_numpy()[store_rows]
    return part


def _finish(
    store_dir: Path, store: SliceSet, organ: str, w: dict[str, Any], settings: dict[str, Any], manifest_sha: str,
    labels_sha: str, seconds: float, reporter: Reporter,
) -> dict[str, Any]:
    """Warn for series without the organ, write the set's manifest and meta, move it into place."""
    table = store.table
    if w["cursor"] != len(w["images"]):  # the counts from organs.csv and the crops cut disagree: a bug
        raise ContractError(f"{organ}: cut {w['cursor']} crops but expected {len(w['images'])}")
    empty = pd.DataFrame(columns=[*CROP_COLUMNS, organ, f"{organ}_patient"])
    crops = pd.concat(w["parts"], ignore_index=True) if w["parts"] else empty
    patient_of = table.groupby("series_id")["patient_id"].first()
    for k, (sid, absent) in enumerate(w["missing"]):
        if k == _WARN_LIMIT:
            reporter.warn(f"{len(w['missing']) - _WARN_LIMIT} more series lack some {organ}; "
                          f"{crops_dir(store_dir, organ) / 'meta.json'} lists them all")
            break
        names = " and ".join(a.replace("_", " ").replace("kidney left", "left kidney")
                             .replace("kidney right", "right kidney") for a in absent)
        where = "on any slice" if not settings["min_visibility"] else (
            f"with visibility above crop.min_visibility={settings['min_visibility']:g}")
        side = " of that side" if organ == "kidney" and len(absent) == 1 else ""
        reporter.warn(f"series {sid} (patient {int(patient_of[sid])}): the localizer found no {names} {where}, "
                      f"so it adds no {organ} crops{side}; its other organs are cropped")
    test_patients = set(table.loc[table["split"] == "test", "patient_id"].astype(int))
    uncropped = sorted(test_patients - set(crops["patient_id"].astype(int)))
    if uncropped:
        reporter.warn(f"{len(uncropped)} test patient(s) have no {organ} crop (first: {uncropped[0]}); "
                      f"toolkit train scores them 0 for {organ}")
    summary = {
        "crop_id": make_crop_id(organ, settings, manifest_sha, labels_sha),
        "crops": int(len(crops)),
        "series": int(crops["series_id"].nunique()) if len(crops) else 0,
        "patients": int(crops["patient_id"].nunique()) if len(crops) else 0,
        "injured": int((crops[organ] > 0).sum()) if len(crops) else 0,
        "organ_share": round(w["organ_share"] / max(len(crops), 1), 4),
        "series_without_organ": len(w["missing"]),
        "test_patients_without_crops": len(uncropped),
        "seconds": round(seconds, 1),
    }
    meta = {
        "artifact": ARTIFACT, "format_version": FORMAT_VERSION, "source": "real", "organ": organ, **settings,
        "crop_id": summary["crop_id"],
        "split_hash": store.meta.get("split_hash"), "store_manifest_sha": manifest_sha, "labels_sha": labels_sha,
        "hard_threshold": HARD_THRESHOLD,
        "targets": "slice label where image-level rows give one, else patient label x organ visibility",
        "missing": {str(s): a for s, a in w["missing"]},
        "summary": summary,
    }
    out = crops_dir(store_dir, organ)
    write_crop_folder(w["tmp"], w["images"], w["masks"], crops, meta)
    del w["images"], w["masks"]  # close the memory maps before the folder moves
    replace_folder(w["tmp"], out)
    reporter.info(f"{organ}: {summary['crops']} crops of {summary['series']} series in {out}")
    return {**summary, "status": "made", "path": str(out)}
