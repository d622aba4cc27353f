"""The built-in CT trauma phantom: RSNA 2023 layout, valid DICOM, truthful labels, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, RLELossless

from toolkit import GRADED_ORGANS, ORGANS
from toolkit.config import PhantomConfig
from toolkit.data.phantom import (
    IDENTIFYING_TAGS,
    ORGAN_CODES,
    identifying_values,
    write_phantom,
)
from toolkit.data.phantom_rle import encode_rle_frames
from toolkit.errors import ToolkitError

RSNA_TRAIN_COLUMNS = [
    "patient_id",
    "bowel_healthy",
    "bowel_injury",
    "extravasation_healthy",
    "extravasation_injury",
    "kidney_healthy",
    "kidney_low",
    "kidney_high",
    "liver_healthy",
    "liver_low",
    "liver_high",
    "spleen_healthy",
    "spleen_low",
    "spleen_high",
    "any_injury",
]


def tiny_config(**changes) -> PhantomConfig:
    cfg = PhantomConfig(
        patients=8,
        slices=6,
        size=64,
        second_series_fraction=0.5,
        prevalence={"bowel": 0.25, "extravasation": 0.25, "kidney": 0.25, "liver": 0.375, "spleen": 0.25},
        high_grade_fraction={"kidney": 0.5, "liver": 0.34, "spleen": 0.5},
        image_level_fraction=0.5,
        incomplete_organ_fraction=0.25,
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, PhantomConfig, dict]:
    out = tmp_path_factory.mktemp("phantom") / "data"
    cfg = tiny_config()
    summary = write_phantom(out, cfg, seed=0)
    return out, cfg, summary


def read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def to_hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_label_csvs_have_rsna_columns_and_exact_counts(phantom):
    out, cfg, summary = phantom
    train = pd.read_csv(out / "train.csv")
    assert list(train.columns) == RSNA_TRAIN_COLUMNS
    assert len(train) == cfg.patients and train.patient_id.is_unique
    assert train.patient_id.between(10000, 99999).all()
    for organ in ORGANS:
        group = train.filter(regex=f"^{organ}_")
        assert set(np.unique(group.values)) <= {0, 1}
        assert (group.sum(axis=1) == 1).all(), organ
        injured = int((group[f"{organ}_healthy"] == 0).sum())
        assert injured == round(cfg.prevalence[organ] * cfg.patients) == summary["injured"][organ]
        if organ in GRADED_ORGANS:
            assert int(group[f"{organ}_high"].sum()) == round(cfg.high_grade_fraction[organ] * injured)
    not_healthy = [c for c in RSNA_TRAIN_COLUMNS[1:-1] if not c.endswith("_healthy")]
    assert (train.any_injury == train[not_healthy].max(axis=1)).all()

    meta = pd.read_csv(out / "train_series_meta.csv")
    assert list(meta.columns) == ["patient_id", "series_id", "aortic_hu", "incomplete_organ"]
    assert meta.series_id.is_unique and meta.series_id.between(10000, 99999).all()
    assert set(meta.patient_id) == set(train.patient_id)
    assert meta.groupby("patient_id").size().value_counts().to_dict() == {1: 4, 2: 4}
    assert meta.aortic_hu.between(100, 500).all()
    assert int(meta.incomplete_organ.sum()) == round(cfg.incomplete_organ_fraction * len(meta))
    assert summary["series"] == len(meta) and summary["slices"] == len(meta) * cfg.slices


def test_dicom_files_are_ct_and_vary_like_real_data(phantom):
    out, cfg, _ = phantom
    meta = pd.read_csv(out / "train_series_meta.csv")
    storage, syntaxes, scrambled = set(), set(), 0
    for row in meta.itertuples():
        folder = out / "train_images" / str(row.patient_id) / str(row.series_id)
        series = read_series(folder)
        assert sorted(int(p.stem) for p in folder.glob("*.dcm")) == list(range(1, cfg.slices + 1))
        for p, ds in zip(sorted(folder.glob("*.dcm")), series, strict=True):
            assert int(p.stem) == int(ds.InstanceNumber)
            assert ds.Modality == "CT" and ds.SOPClassUID == CTImageStorage
            assert (ds.Rows, ds.Columns) == (cfg.size, cfg.size)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert 0.6 * 512 / cfg.size <= float(ds.PixelSpacing[0]) <= 0.9 * 512 / cfg.size
            assert ds.pixel_array.shape == (cfg.size, cfg.size)
            assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
            storage.add((int(ds.PixelRepresentation), float(ds.RescaleIntercept), int(ds.BitsStored)))
            syntaxes.add(ds.file_meta.TransferSyntaxUID)
        assert len({ds.SeriesInstanceUID for ds in series}) == 1
        z = np.array(
            [float(ds.ImagePositionPatient[2]) for ds in sorted(series, key=lambda d: d.InstanceNumber)]
        )
        scrambled += not (np.all(np.diff(z) > 0) or np.all(np.diff(z) < 0))
    assert {(0, -1024.0), (1, 0.0)} <= {s[:2] for s in storage}
    assert {12, 16} <= {s[2] for s in storage}
    assert RLELossless in syntaxes and len(syntaxes) == 2
    assert scrambled >= 1  # InstanceNumber order is not z order for some series


def test_truth_masks_match_the_dicom_pixels(phantom):
    out, cfg, _ = phantom
    meta = pd.read_csv(out / "train_series_meta.csv")
    for row in meta.itertuples():
        truth = np.load(out / "phantom_truth" / f"{row.series_id}.npz")
        assert truth["organs"].shape == truth["injury"].shape == (cfg.slices, cfg.size, cfg.size)
        folder = out / "train_images" / str(row.patient_id) / str(row.series_id)
        by_instance = {int(ds.InstanceNumber): ds for ds in read_series(folder)}
        assert sorted(by_instance) == truth["instance_number"].tolist()
        hu = np.stack([to_hu(by_instance[int(i)]) for i in truth["instance_number"]])
        z = [float(by_instance[int(i)].ImagePositionPatient[2]) for i in truth["instance_number"]]
        np.testing.assert_allclose(truth["z"], z, atol=0.01)
        # The file's own legend (what explain reads) names the masks' codes truthfully.
        legend = dict(zip(truth["code_names"].tolist(), truth["codes"].tolist(), strict=True))
        assert {*ORGANS, "bone"} <= set(legend) and len(set(legend.values())) == len(legend)
        liver = truth["organs"] == legend["liver"]
        assert liver.sum() > 50
        assert 40 < hu[liver].mean() < 150
        assert hu[truth["organs"] == legend["bone"]].mean() > 150
        assert hu[:, 0, :].max() < -500  # air above the patient


def test_every_series_of_an_injured_patient_shows_the_injury(phantom):
    out, cfg, _ = phantom
    train = pd.read_csv(out / "train.csv").set_index("patient_id")
    meta = pd.read_csv(out / "train_series_meta.csv")
    min_pixels = 9 * (cfg.size / 64) ** 2
    for row in meta.itertuples():
        injury = np.load(out / "phantom_truth" / f"{row.series_id}.npz")["injury"]
        for organ in ORGANS:
            code = ORGAN_CODES[organ]
            per_slice = (injury == code).sum(axis=(1, 2))
            if train.loc[row.patient_id, f"{organ}_healthy"] == 1:
                assert per_slice.max() == 0, (row.series_id, organ)
            else:
                assert per_slice.max() >= min_pixels, (row.series_id, organ)
                assert (per_slice == 0).any(), "an injury shows on a subset of slices"


def test_image_level_labels_point_at_injured_slices(phantom):
    out, cfg, _ = phantom
    labels = pd.read_csv(out / "image_level_labels.csv")
    assert list(labels.columns) == ["patient_id", "series_id", "instance_number", "injury_name"]
    assert set(labels.injury_name) <= {"Active_Extravasation", "Bowel"} and len(labels) > 0
    code = {"Active_Extravasation": ORGAN_CODES["extravasation"], "Bowel": ORGAN_CODES["bowel"]}
    for row in labels.itertuples():
        path = out / "train_images" / str(row.patient_id) / str(row.series_id) / f"{row.instance_number}.dcm"
        assert path.exists()
        truth = np.load(out / "phantom_truth" / f"{row.series_id}.npz")
        k = truth["instance_number"].tolist().index(row.instance_number)
        assert (truth["injury"][k] == code[row.injury_name]).any()
    train = pd.read_csv(out / "train.csv")
    meta = pd.read_csv(out / "train_series_meta.csv")
    injured = train.patient_id[(train.bowel_injury == 1) | (train.extravasation_injury == 1)]
    candidates = meta[meta.patient_id.isin(injured)]
    assert labels.series_id.nunique() == round(cfg.image_level_fraction * len(candidates))


def test_identifying_values_are_fake_and_absent_from_label_files(phantom):
    out, _, _ = phantom
    values = identifying_values(out)
    assert any(v.startswith("PHANTOM^") for v in values)
    assert any(v.startswith("MRN-") for v in values)
    ds = pydicom.dcmread(next(out.glob("train_images/*/*/*.dcm")))
    assert all(str(ds.get(tag)) in values for tag in IDENTIFYING_TAGS)
    text = "".join(p.read_text() for p in out.glob("*.csv"))
    assert not [v for v in values if v in text]
    patient_ids = set(pd.read_csv(out / "train.csv").patient_id.astype(str))
    assert not patient_ids & {str(ds.PatientID)}


def test_same_seed_same_bytes_other_seed_differs(phantom, tmp_path):
    out, cfg, _ = phantom
    again = tmp_path / "again"
    write_phantom(again, cfg, seed=0)
    for name in ("train.csv", "train_series_meta.csv", "image_level_labels.csv"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    files = sorted(p.relative_to(out) for p in out.glob("train_images/*/*/*.dcm"))
    assert files == sorted(p.relative_to(again) for p in again.glob("train_images/*/*/*.dcm"))
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)

    other = tmp_path / "other"
    write_phantom(other, tiny_config(patients=3), seed=1)
    assert (other / "train.csv").read_bytes() != (out / "train.csv").read_bytes()
    assert not identifying_values(other) & identifying_values(out)
    first = pydicom.dcmread(sorted(other.glob("train_images/*/*/*.dcm"))[0])
    assert not np.array_equal(first.pixel_array, pydicom.dcmread(out / files[0]).pixel_array)


def test_refuses_to_overwrite_without_force(phantom, tmp_path):
    _, cfg, _ = phantom
    out = tmp_path / "data"
    small = tiny_config(patients=2, second_series_fraction=0.0)
    write_phantom(out, small, seed=3)
    before = (out / "train.csv").read_bytes()
    with pytest.raises(ToolkitError, match="already holds a dataset; pass --force"):
        write_phantom(out, small, seed=4)
    assert (out / "train.csv").read_bytes() == before
    write_phantom(out, small, seed=4, force=True)
    meta = pd.read_csv(out / "train_series_meta.csv")
    # --force replaces the dataset: no series folder of the first run is left behind.
    assert len(list(out.glob("train_images/*/*"))) == len(meta)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prevalence": {"lung": 0.1}}, "phantom.prevalence has unknown key 'lung'"),
        ({"slices": 1}, "phantom.slices"),
        ({"image_level_fraction": 1.5}, "image_level_fraction"),
        ({"image_level_organs": ["lung"]}, "image_level_organs lists unknown 'lung'"),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, change, message):
    with pytest.raises(ToolkitError, match=message):
        write_phantom(tmp_path / "data", tiny_config(**change), seed=0)
    assert not (tmp_path / "data" / "train.csv").exists()


def test_rle_encoder_round_trips_through_pydicom():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4096, size=(3, 9, 300)).astype(np.uint16)
    frames[0, :, :200] = 1024  # runs longer than a 128-byte packet, with 1-byte tails
    frames[1, ::2] = np.repeat(rng.integers(0, 3, 60), 5)  # short and long runs in a row
    frames[2, 3] = 7
    for k, encoded in enumerate(encode_rle_frames(frames)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.Rows, ds.Columns = frames.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = encapsulate([encoded])
        np.testing.assert_array_equal(ds.pixel_array, frames[k])


def test_image_level_labels_for_every_organ_mark_the_slices_showing_it(tmp_path):
    """The demo lists injured slices for all five organs; prepare turns them into slice labels."""
    out = tmp_path / "data"
    cfg = tiny_config(image_level_organs=list(ORGANS), image_level_fraction=1.0)
    write_phantom(out, cfg, seed=1)
    labels = pd.read_csv(out / "image_level_labels.csv")
    name_to_organ = {"Bowel": "bowel", "Active_Extravasation": "extravasation"}
    name_to_organ |= {"Kidney": "kidney", "Liver": "liver", "Spleen": "spleen"}
    assert set(labels.injury_name) <= set(name_to_organ)
    train = pd.read_csv(out / "train.csv")
    meta = pd.read_csv(out / "train_series_meta.csv")
    for row in meta.itertuples():
        truth = np.load(out / "phantom_truth" / f"{row.series_id}.npz")
        grades = train[train.patient_id == row.patient_id].iloc[0]
        for name, organ in name_to_organ.items():
            listed = set(labels.instance_number[(labels.series_id == row.series_id) & (labels.injury_name == name)])
            area = (truth["injury"] == ORGAN_CODES[organ]).sum(axis=(1, 2))
            showing = set(truth["instance_number"][area >= 2].tolist())
            # Every injured series of every organ is annotated, on exactly the slices that show it.
            assert listed == (showing if grades[f"{organ}_healthy"] == 0 else set()), (row.series_id, organ)
