"""Organ masks: RSNA segmentations and TotalSegmentator output placed on the stored slices through geometry."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from eval.explain import resize_mask
from toolkit.config import Config, DataConfig, PhantomConfig
from toolkit.data import prepare as prepare_module
from toolkit.data.masks import (
    STORE_LABELS,
    SliceGeometry,
    has_mask,
    load_masks,
    lps_to_voxel,
    map_volume_to_slices,
    pixel_centres_lps,
)
from toolkit.data.phantom import ORGAN_CODES, write_phantom
from toolkit.data.prepare import prepare_store
from toolkit.reporting import Reporter

SIZE = 32  # stored size; the phantom writes 48 px, so masks are cut and resized like the images


class Collect(Reporter):
    """A reporter that keeps the warnings, so tests can read them."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def cfg(**data: object) -> Config:
    values = {"size": SIZE, "slices_per_series": 0, "test_fraction": 0.25, "folds": 2, "workers": 1, "crop_body": True}
    return dataclasses.replace(Config(), data=dataclasses.replace(DataConfig(), **{**values, **data}))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 patients, 6 series (two with a second series), every series with an RSNA-like segmentation."""
    pc = dataclasses.replace(
        PhantomConfig(), patients=4, slices=6, size=48, second_series_fraction=0.5, segmentation_fraction=1.0
    )
    out = tmp_path_factory.mktemp("phantom") / "data"
    write_phantom(out, pc, seed=0)
    return out


def copy_data(phantom: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    return data


def truth_codes(data: Path, row: pd.Series, kidney_split: float | None = None) -> np.ndarray:
    """The phantom truth of one stored slice mapped through its field, in store codes.

    Kidneys are returned as 34 (either side) unless ``kidney_split`` (a source column) splits them:
    columns right of it are the patient's left kidney (code 3), the rest the right (4).
    """
    truth = np.load(data / "phantom_truth" / f"{int(row['series_id'])}.npz")
    k = int(np.flatnonzero(truth["instance_number"] == int(row["instance"]))[0])
    organs = truth["organs"][k]
    if kidney_split is not None:
        cols = np.broadcast_to(np.arange(organs.shape[1])[None, :], organs.shape)
        organs = np.where((organs == ORGAN_CODES["kidney"]) & (cols > kidney_split), 100, organs)
    fld = (int(row["field_top"]), int(row["field_left"]), int(row["field_side"]))
    org = resize_mask(organs, SIZE, fld)
    out = np.zeros(org.shape, dtype=np.uint8)
    out[org == ORGAN_CODES["liver"]] = STORE_LABELS["liver"]
    out[org == ORGAN_CODES["spleen"]] = STORE_LABELS["spleen"]
    out[org == ORGAN_CODES["bowel"]] = STORE_LABELS["bowel"]
    out[org == ORGAN_CODES["kidney"]] = 34 if kidney_split is None else STORE_LABELS["kidney_right"]
    out[org == 100] = STORE_LABELS["kidney_left"]
    return out


def assert_masks_match_truth(data: Path, store_dir: Path, series: set[int] | None = None) -> int:
    """Every stored slice (of ``series``) equals the truth pixel by pixel; returns the slices compared."""
    table = pd.read_csv(store_dir / "manifest.csv")
    masks = load_masks(store_dir)
    n = 0
    for i, row in table.iterrows():
        if series is not None and int(row["series_id"]) not in series:
            continue
        got = np.where(np.isin(masks[i], [3, 4]), 34, masks[i])
        expected = truth_codes(data, row)
        assert np.array_equal(got, expected), (
            f"series {row['series_id']} instance {row['instance']}: {(got != expected).sum()} pixels differ"
        )
        n += 1
    return n


# ------------------------------------------------------------------ geometry (pure functions)
def test_pixel_centres_follow_dicom_geometry() -> None:
    """PS3.3 C.7.6.2.1.1: columns step along the row cosine by PixelSpacing[1], rows along the column
    cosine by PixelSpacing[0]."""
    axial = SliceGeometry((10.0, 20.0, 30.0), (1, 0, 0), (0, 1, 0), (0.5, 2.0), 4, 4)
    assert pixel_centres_lps(axial, np.array([1]), np.array([3]))[0, 0].tolist() == [16.0, 20.5, 30.0]
    coronal = SliceGeometry((10.0, 20.0, 30.0), (1, 0, 0), (0, 0, -1), (0.5, 2.0), 4, 4)
    assert pixel_centres_lps(coronal, np.array([2]), np.array([1]))[0, 0].tolist() == [12.0, 20.0, 29.0]
    # NIfTI is RAS: a voxel at RAS (-16, -20.5, 30) is the LPS point (16, 20.5, 30).
    affine = np.diag([2.0, 0.5, 5.0, 1.0])
    affine[:3, 3] = (-20.0, -22.0, 20.0)
    assert lps_to_voxel(np.array([16.0, 20.5, 30.0]), affine).tolist() == pytest.approx([2.0, 3.0, 2.0])


def test_out_of_volume_and_out_of_image_read_background() -> None:
    volume = np.full((4, 4, 2), 7, dtype=np.uint8)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # voxel (i, j, k) at LPS (i, j, k)
    geom = SliceGeometry((0.0, 0.0, 0.0), (1, 0, 0), (0, 1, 0), (1.0, 1.0), 4, 4)
    # The field reaches 2 px past the image on every side: those stored pixels are air, label 0.
    labels, inside = map_volume_to_slices(volume, affine, [geom], [(-2, -2, 8)], 8)
    assert inside == 16 and labels[0, 2:6, 2:6].tolist() == np.full((4, 4), 7).tolist()
    assert labels.sum() == 16 * 7
    far = SliceGeometry((0.0, 0.0, 500.0), (1, 0, 0), (0, 1, 0), (1.0, 1.0), 4, 4)
    assert map_volume_to_slices(volume, affine, [far], [(0, 0, 4)], 4)[1] == 0


# ------------------------------------------------------------------ RSNA segmentations from the phantom
def test_phantom_writes_varied_voxel_orders_and_both_endings(phantom: Path) -> None:
    files = sorted((phantom / "segmentations").iterdir())
    assert len(files) == 6 and {f.name.split(".", 1)[1] for f in files} == {"nii", "nii.gz"}
    codes = {nib.aff2axcodes(nib.load(f).affine) for f in files}
    # nibabel names where each voxel axis points: columns run to the patient's left (L), rows to the
    # back (P), slices head to feet (I) in the DICOM's own order.
    assert {("L", "P", "I"), ("L", "P", "S"), ("P", "L", "I")} <= codes  # as DICOM, z reversed, swapped
    assert len(codes) >= 4
    labels = set()
    for f in files:
        labels |= set(np.unique(np.asanyarray(nib.load(f).dataobj)).tolist())
    assert labels == {0, *STORE_LABELS.values()}


def test_masks_land_on_the_truth_pixels_through_the_process_pool(phantom: Path, tmp_path: Path) -> None:
    store = prepare_store(phantom, tmp_path / "store", cfg(workers=2))
    t = store.table
    assert (t["mask_source"] == "rsna").all() and has_mask(t).all()
    masks = load_masks(tmp_path / "store")
    assert masks.dtype == np.uint8 and masks.shape == store.images.shape
    assert assert_masks_match_truth(phantom, tmp_path / "store") == len(t) == 36
    # Every organ is there, and the patient's left kidney shows on the image's right.
    assert set(np.unique(masks).tolist()) == {0, *STORE_LABELS.values()}
    cols = np.arange(SIZE)[None, None, :]
    assert (cols * (masks == 3)).sum() / (masks == 3).sum() > (cols * (masks == 4)).sum() / (masks == 4).sum() + 5
    assert store.meta["masks"]["series"] == {"rsna": 6, "totalsegmentator": 0}


def test_masks_survive_an_interrupted_prepare(
    phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_store(phantom, tmp_path / "reference", cfg())
    reference = load_masks(tmp_path / "reference")
    real_load = prepare_module.load_series
    # Series are read in (patient, series) order: fail on the last, after the others are kept.
    last = max((int(p.parent.name), int(p.name)) for p in (phantom / "train_images").glob("*/*"))[1]

    def failing(folder: str, **kw: object):  # noqa: ANN202
        if Path(folder).name == str(last):
            raise RuntimeError("disk went away")
        return real_load(folder, **kw)

    monkeypatch.setattr(prepare_module, "load_series", failing)
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="failed"):
        prepare_store(phantom, out, cfg())
    partials = list((out / ".partial").glob("*.npz"))
    assert partials and all("masks" in np.load(p).files for p in partials)
    monkeypatch.setattr(prepare_module, "load_series", real_load)
    prepare_store(phantom, out, cfg())
    np.testing.assert_array_equal(load_masks(out), reference)


# ------------------------------------------------------------------ bad masks
def _save(img: nib.Nifti1Image, path: Path) -> None:
    path.unlink(missing_ok=True)
    nib.save(img, path)


def test_bad_masks_warn_by_file_and_prepare_finishes(phantom: Path, tmp_path: Path) -> None:
    data = copy_data(phantom, tmp_path)
    segs = sorted((data / "segmentations").iterdir())
    off, odd, broken, truncated = segs[0], segs[1], segs[2], segs[4]
    # 1. A mask 600 mm above its series: its volume overlaps none of the series' slices.
    img = nib.load(off)
    affine = img.affine.copy()
    affine[2, 3] += 600.0
    _save(nib.Nifti1Image(np.asarray(img.dataobj), affine), off)
    # 2. Unknown labels 9 and 12 on background voxels; the five known labels stay.
    img = nib.load(odd)
    arr = np.asarray(img.dataobj).copy()
    background = np.flatnonzero(arr.ravel() == 0)
    arr.ravel()[background[:40]] = 9
    arr.ravel()[background[40:50]] = 12
    _save(nib.Nifti1Image(arr, img.affine), odd)
    # 3. Not a NIfTI file at all; 4. a file cut short; 5. a mask named after no series.
    broken.write_bytes(b"not a nifti file")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    shutil.copy(segs[3], data / "segmentations" / "99999.nii.gz")

    reporter = Collect()
    store = prepare_store(data, tmp_path / "store", cfg(), reporter=reporter)
    messages = reporter.warnings
    assert all("\n" not in m for m in messages)

    def one(*words: str) -> str:
        hits = [m for m in messages if all(w in m for w in words)]
        assert len(hits) == 1, (words, messages)
        return hits[0]

    sid = {p: int(p.name.split(".")[0]) for p in (off, odd, broken, truncated)}
    one(f"segmentations/{off.name}", "does not overlap", "kept without a mask")
    one(f"segmentations/{odd.name}", "unknown label value(s) 9, 12", "known labels are kept")
    one(f"segmentations/{broken.name}", "cannot be read as NIfTI", "kept without a mask")
    one(f"segmentations/{truncated.name}", "cannot be read as NIfTI", "kept without a mask")
    one("segmentations/99999.nii.gz", "name no series")
    assert len(messages) == 5

    t = store.table
    masks = load_masks(tmp_path / "store")
    by_series = t.groupby("series_id")["mask_source"].first().fillna("")
    assert (by_series[[sid[off], sid[broken], sid[truncated]]] == "").all() and by_series[sid[odd]] == "rsna"
    for s in (sid[off], sid[broken], sid[truncated]):
        assert not masks[(t["series_id"] == s).to_numpy()].any()
    # The series stay in the store, and the odd file's known labels land where the truth is.
    assert t["series_id"].nunique() == 6
    assert assert_masks_match_truth(data, tmp_path / "store", {sid[odd]}) == 6
    assert store.meta["masks"]["series"]["rsna"] == 3 and len(store.meta["masks"]["warnings"]) == 4


# ------------------------------------------------------------------ TotalSegmentator output
TS_TOTAL = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6, "small_bowel": 18, "colon": 20}


def dicom_affine(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A RAS affine for the series' voxels ordered (column, row, slice feet to head), from its headers."""
    headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    x0, y0, z0 = (float(v) for v in headers[0].ImagePositionPatient)
    dz = (float(headers[-1].ImagePositionPatient[2]) - z0) / (len(headers) - 1)
    row_sp, col_sp = (float(v) for v in headers[0].PixelSpacing)
    # LPS x = x0 + column * col_sp; RAS negates x and y.
    affine = np.array([[-col_sp, 0, 0, -x0], [0, -row_sp, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1.0]])
    instances = np.array([int(ds.InstanceNumber) for ds in headers])
    return affine, instances


def ts_classes(data: Path, series_id: int, folder: Path, split: float) -> dict[str, np.ndarray]:
    """Binary class volumes (column, row, slice feet to head) of TotalSegmentator's names, from the truth."""
    truth = np.load(data / "phantom_truth" / f"{series_id}.npz")
    _, instances = dicom_affine(folder)
    order = [int(np.flatnonzero(truth["instance_number"] == i)[0]) for i in instances]
    organs = truth["organs"][order].transpose(2, 1, 0)  # (column, row, slice)
    cols = np.arange(organs.shape[0])[:, None, None]
    rows = np.arange(organs.shape[1])[None, :, None]
    kidney, bowel = organs == ORGAN_CODES["kidney"], organs == ORGAN_CODES["bowel"]
    return {
        "liver": organs == ORGAN_CODES["liver"],
        "spleen": organs == ORGAN_CODES["spleen"],
        "kidney_left": kidney & (cols > split),
        "kidney_right": kidney & (cols <= split),
        "small_bowel": bowel & (rows < organs.shape[1] // 2),  # bowel is small bowel + colon + duodenum
        "colon": bowel & (rows >= organs.shape[1] // 2),
        "stomach": organs == ORGAN_CODES["stomach"],  # a class the store does not keep
    }


def kidney_midline(data: Path, series_id: int) -> float:
    truth = np.load(data / "phantom_truth" / f"{series_id}.npz")
    return float(np.argwhere(truth["organs"] == ORGAN_CODES["kidney"])[:, 2].mean())


def test_totalsegmentator_folder_and_multilabel_files(phantom: Path, tmp_path: Path) -> None:
    data = copy_data(phantom, tmp_path)
    shutil.rmtree(data / "segmentations")
    ts = data / "totalsegmentator"
    ts.mkdir()
    series = sorted((p.parent.name, p.name) for p in (data / "train_images").glob("*/*"))
    folders = {int(s): data / "train_images" / p / s for p, s in series}
    ids = sorted(folders)
    splits = {s: kidney_midline(data, s) for s in ids[:3]}

    # A folder of per-class files (TotalSegmentator's default output).
    classes = ts_classes(data, ids[0], folders[ids[0]], splits[ids[0]])
    affine, _ = dicom_affine(folders[ids[0]])
    (ts / str(ids[0])).mkdir()
    for name, mask in classes.items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), ts / str(ids[0]) / f"{name}.nii.gz")
    # A --ml file without a label table: TotalSegmentator's "total" class indices.
    classes = ts_classes(data, ids[1], folders[ids[1]], splits[ids[1]])
    affine, _ = dicom_affine(folders[ids[1]])
    ml = np.zeros(classes["liver"].shape, dtype=np.uint8)
    for name, mask in classes.items():
        ml[mask] = TS_TOTAL[name]
    nib.save(nib.Nifti1Image(ml, affine), ts / f"{ids[1]}.nii.gz")
    # A --ml file with its own label table in the header (as TotalSegmentator writes it), other numbers.
    classes = ts_classes(data, ids[2], folders[ids[2]], splits[ids[2]])
    affine, _ = dicom_affine(folders[ids[2]])
    own = {name: k + 1 for k, name in enumerate(reversed(list(classes)))}
    ml = np.zeros(classes["liver"].shape, dtype=np.uint8)
    for name, mask in classes.items():
        ml[mask] = own[name]
    img = nib.Nifti1Image(ml, affine)
    table = "".join(f'<Label Key="{k}" Red="1" Green="0" Blue="0" Alpha="1"><![CDATA[{n}]]></Label>\n'
                    for n, k in own.items())
    xml = f'<?xml version="1.0" encoding="UTF-8"?> <CaretExtension><VolumeInformation Index="0"><LabelTable>{table}'
    xml += "</LabelTable></VolumeInformation></CaretExtension>"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml.encode()))
    nib.save(img, ts / f"{ids[2]}.nii")

    reporter = Collect()
    store = prepare_store(data, tmp_path / "store", cfg(), reporter=reporter)
    assert reporter.warnings == []
    t = store.table
    masks = load_masks(tmp_path / "store")
    by_series = t.groupby("series_id")["mask_source"].first().fillna("")
    assert by_series[ids[:3]].tolist() == ["totalsegmentator"] * 3 and (by_series[ids[3:]] == "").all()
    for s in ids[:3]:
        rows = t.index[t["series_id"] == s]
        for i in rows:
            expected = truth_codes(data, t.loc[i], kidney_split=splits[s])
            assert np.array_equal(masks[i], expected), (s, int(t.loc[i, "instance"]))
        assert set(np.unique(masks[rows]).tolist()) == {0, *STORE_LABELS.values()}
    assert not masks[(~t["series_id"].isin(ids[:3])).to_numpy()].any()
