"""``toolkit prepare``: RSNA folder -> slice store (labels, split, resume, bad input, de-identification)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_dicom import phantom_slice, write_ct

from toolkit import GRADED_ORGANS, ORGANS
from toolkit.config import Config, DataConfig
from toolkit.data import prepare as prepare_module
from toolkit.data.labels import TRAIN_COLUMNS
from toolkit.data.prepare import prepare_store, summarize_store
from toolkit.data.split import split_hash, split_patients
from toolkit.errors import ToolkitError
from toolkit.sliceset import FIELD_COLUMNS, SliceSet, image_level_columns, organ_columns

# patient -> {organ: grade}; every organ has injured patients, 105 has both bowel and extravasation.
GRADES = {
    101: {"bowel": 1, "spleen": 1},
    102: {"extravasation": 1},
    103: {"kidney": 1},
    104: {"liver": 2},
    105: {"bowel": 1, "extravasation": 1},
    106: {"kidney": 2},
    107: {"liver": 1},
    108: {"spleen": 2},
}
# image-level labels: (patient, series, instance, injury_name); series 1010 and 1020 have them, 1050 not.
IMAGE_LABELS = [(101, 1010, 2, "Bowel"), (101, 1010, 3, "Bowel"), (102, 1020, 4, "Active_Extravasation")]
SECOND_SERIES = {103: 1031}
FAKE_NAME, FAKE_ID = "Fakename^Identifying", "MRN-7Q4X9Z"


def make_rsna(root: Path, slices: int = 6, size: int = 16, grades: dict = GRADES) -> Path:
    """A tiny RSNA 2023 layout folder: train.csv, series meta, image-level labels, one DICOM per slice."""
    rows = []
    for pid, injured in grades.items():
        row = {"patient_id": pid}
        for organ in ORGANS:
            g = injured.get(organ, 0)
            states = ("healthy", "low", "high") if organ in GRADED_ORGANS else ("healthy", "injury")
            for k, state in enumerate(states):
                row[f"{organ}_{state}"] = int(g == k)
        row["any_injury"] = int(bool(injured))
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows)[list(TRAIN_COLUMNS) + ["any_injury"]].to_csv(root / "train.csv", index=False)
    meta = []
    for pid in grades:
        for sid in [pid * 10] + ([SECOND_SERIES[pid]] if pid in SECOND_SERIES else []):
            meta.append(
                {"patient_id": pid, "series_id": sid, "aortic_hu": 150.0 + pid, "incomplete_organ": 0}
            )
            folder = root / "train_images" / str(pid) / str(sid)
            folder.mkdir(parents=True)
            for inst in range(1, slices + 1):
                # Instance numbers run head-to-feet: z falls as the instance grows.
                write_ct(
                    folder / f"{inst}.dcm",
                    phantom_slice(size, seed=sid + inst),
                    instance=inst,
                    position=(-100.0, -100.0, -2.5 * inst),
                    patient_name=FAKE_NAME,
                    signed=True,
                    intercept=0.0,
                )
    pd.DataFrame(meta).to_csv(root / "train_series_meta.csv", index=False)
    pd.DataFrame(IMAGE_LABELS, columns=["patient_id", "series_id", "instance_number", "injury_name"]).to_csv(
        root / "image_level_labels.csv", index=False
    )
    return root


def tiny_cfg(**data: object) -> Config:
    values = {
        "size": 16,
        "slices_per_series": 0,
        "test_fraction": 0.25,
        "folds": 2,
        "workers": 1,
        "crop_body": False,
        **data,
    }
    return dataclasses.replace(Config(), data=dataclasses.replace(DataConfig(), **values))


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rsna(tmp_path_factory.mktemp("rsna") / "data")


# ----------------------------------------------------------------------- content
def test_labels_split_and_files(rsna: Path, tmp_path: Path) -> None:
    store = prepare_store(rsna, tmp_path / "store", tiny_cfg())
    t = store.table
    expected = ["patient_id", "series_id", "instance", "z", *organ_columns(), "split", "fold", "source"]
    assert list(t.columns) == expected + ["aortic_hu", "incomplete_organ", *FIELD_COLUMNS, "mask_source",
                                          *image_level_columns()]
    assert (t["field_side"] == 16).all() and (t["field_top"] == 0).all()
    assert store.images.dtype == np.int16 and store.images.shape == (9 * 6, 16, 16)
    assert (t["source"] == "real").all()

    # Injured patients per organ equal train.csv's.
    train = pd.read_csv(rsna / "train.csv")
    for organ in ORGANS:
        healthy = train[f"{organ}_healthy"] == 0
        assert t.loc[t[f"{organ}_patient"] > 0, "patient_id"].nunique() == healthy.sum()
        assert set(t.loc[t[f"{organ}_patient"] == 2, "patient_id"]) == (
            set(train.loc[train[f"{organ}_high"] == 1, "patient_id"]) if organ in GRADED_ORGANS else set()
        )
    # Image-level series: positives are exactly the listed instances; other series take the patient grade.
    labelled = t[t["series_id"].isin([1010, 1020])]
    assert labelled["bowel"].sum() + labelled["extravasation"].sum() == len(IMAGE_LABELS)
    assert sorted(labelled.loc[labelled["bowel"] == 1, "instance"]) == [2, 3]
    assert labelled.loc[labelled["extravasation"] == 1, "instance"].tolist() == [4]
    p105 = t[t["patient_id"] == 105]
    assert (p105["bowel"] == 1).all() and (p105["extravasation"] == 1).all()
    assert (t["liver"] == t["liver_patient"]).all()

    # Slices sorted by z within each series (instance numbers run the other way).
    for _, s in t.groupby("series_id"):
        assert s["z"].is_monotonic_increasing and s["instance"].is_monotonic_decreasing
    # The images are the written HU, resampled only by the identity.
    row = t.index[(t["series_id"] == 1040) & (t["instance"] == 3)][0]
    np.testing.assert_array_equal(store.images[row], phantom_slice(16, seed=1040 + 3).astype(np.int16))

    # Patient-level split: every patient in exactly one place, test disjoint from folds.
    per_patient = t.groupby("patient_id")[["split", "fold"]].nunique()
    assert (per_patient == 1).all().all()
    assert set(t.loc[t["split"] == "test", "fold"]) == {-1}
    assert set(t.loc[t["split"] == "train", "fold"]) == {0, 1}
    assert t.loc[t["split"] == "test", "patient_id"].nunique() == 2
    split = pd.read_csv(tmp_path / "store" / "split.csv")
    assert store.meta["split_hash"] == split_hash(split)
    assert split.merge(t[["patient_id", "split", "fold"]].drop_duplicates()).shape[0] == 8

    out = tmp_path / "store"
    assert not (out / ".partial").exists()
    assert (out / "config.yaml").exists() and pd.read_csv(out / "errors.csv").empty
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_skipped"] == 0 and meta["size"] == [16, 16] and len(meta["source_checksum"]) == 64
    assert meta["spacing_mm"]["stored_median_row_col"] == [0.8, 0.8]
    assert SliceSet.load(out).table.equals(t)
    summary = summarize_store(store)
    assert "54 slices of 16x16" in summary and "8 patients" in summary
    assert "test:  2 patients" in summary and "2 folds" in summary


def test_slice_subset_and_resample(rsna: Path, tmp_path: Path) -> None:
    store = prepare_store(rsna, tmp_path / "store", tiny_cfg(size=8, slices_per_series=3))
    t = store.table
    assert store.images.shape == (9 * 3, 8, 8)
    # Evenly spaced over z: positions 0, 2, 5 of 6 slices (z = -15 .. -2.5 in 2.5 mm steps).
    assert sorted(t.loc[t["series_id"] == 1010, "z"]) == [-15.0, -10.0, -2.5]
    assert store.meta["spacing_mm"]["stored_median_row_col"] == [1.6, 1.6]
    # The body crop spends the 8 px on the 13 px wide body disc, not the 16 px image: finer pixels.
    cropped = prepare_store(rsna, tmp_path / "cropped", tiny_cfg(size=8, slices_per_series=3, crop_body=True))
    assert cropped.meta["crop_body"] and not store.meta["crop_body"]
    assert (cropped.table["field_side"] < 16).all()
    assert cropped.meta["spacing_mm"]["stored_median_row_col"][0] < 1.6


def test_split_is_deterministic_and_patient_level() -> None:
    rng = np.random.default_rng(0)
    labels = pd.DataFrame({"patient_id": np.arange(60) + 1})
    for organ, p in zip(ORGANS, (0.1, 0.15, 0.2, 0.3, 0.3), strict=True):
        labels[organ] = (rng.random(60) < p).astype(int)
    a = split_patients(labels, 0.2, 4, seed=0)
    assert split_hash(a) == split_hash(split_patients(labels.sample(frac=1, random_state=3), 0.2, 4, seed=0))
    assert split_hash(a) != split_hash(split_patients(labels, 0.2, 4, seed=1))
    assert (a["split"] == "test").sum() == 12 and set(a.loc[a["split"] == "train", "fold"]) == {0, 1, 2, 3}
    # Injured patients reach the test set and every fold.
    injured = a.merge(labels)[list(ORGANS)].sum(axis=1) > 0
    assert a.loc[injured.to_numpy(), "fold"].nunique() == 5
    # Slice rows (many per patient) give the same patient split.
    slices = labels.loc[labels.index.repeat(3)]
    assert split_hash(split_patients(slices, 0.2, 4, seed=0)) == split_hash(a)
    with pytest.raises(ToolkitError, match="need at least 4: add patients or lower data.folds"):
        split_patients(labels.head(4), 0.2, 4, seed=0)


# ------------------------------------------------------------------------ resume
def test_resume_after_a_failed_series(rsna: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = prepare_store(rsna, tmp_path / "reference", tiny_cfg())
    real_load = prepare_module.load_series
    calls: list[str] = []

    def failing(folder: str, **kw: object):  # noqa: ANN202
        calls.append(Path(folder).name)
        if Path(folder).name == "1060":
            raise RuntimeError("disk went away")
        return real_load(folder, **kw)

    monkeypatch.setattr(prepare_module, "load_series", failing)
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="train_images/106/1060 failed"):
        prepare_store(rsna, out, tiny_cfg())
    finished = sorted(p.stem for p in (out / ".partial").glob("*.npz"))
    assert finished == ["1010", "1020", "1030", "1031", "1040", "1050"]  # read before the failure
    assert not (out / "manifest.csv").exists()

    def counting(folder: str, **kw: object):  # noqa: ANN202
        calls.append(Path(folder).name)
        return real_load(folder, **kw)

    calls.clear()
    monkeypatch.setattr(prepare_module, "load_series", counting)
    resumed = prepare_store(rsna, out, tiny_cfg())
    assert sorted(calls) == ["1060", "1070", "1080"]  # finished series were not read again
    assert resumed.table.equals(reference.table)
    np.testing.assert_array_equal(resumed.images, reference.images)
    assert resumed.meta == reference.meta


def test_refuses_to_overwrite_without_force(rsna: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    prepare_store(rsna, out, tiny_cfg())
    with pytest.raises(ToolkitError) as err:
        prepare_store(rsna, out, tiny_cfg())
    assert str(err.value) == f"{out} already holds a slice store; pass --force to rebuild it"
    rebuilt = prepare_store(rsna, out, tiny_cfg(size=8), force=True)
    assert rebuilt.size == (8, 8)


# -------------------------------------------------------------------- tolerance
def test_corrupt_files_are_skipped_and_listed(tmp_path: Path) -> None:
    src = make_rsna(tmp_path / "data", slices=4, size=8)
    (src / "train_images/104/1040/2.dcm").write_bytes(b"\0" * 50)  # truncated garbage
    data = (src / "train_images/107/1070/3.dcm").read_bytes()
    (src / "train_images/107/1070/3.dcm").write_bytes(data[: len(data) - 40])  # pixel data cut short
    for f in (src / "train_images/108/1080").iterdir():
        f.write_text("not dicom")
    store = prepare_store(src, tmp_path / "store", tiny_cfg(size=8))
    errors = pd.read_csv(tmp_path / "store" / "errors.csv")
    assert {"train_images/104/1040/2.dcm", "train_images/107/1070/3.dcm", "train_images/108/1080"} <= set(
        errors["path"]
    )
    assert len(errors) == 2 + 4 + 1 and errors["reason"].str.len().gt(0).all()
    assert store.meta["n_skipped"] == 6 and store.meta["n_skipped_series"] == 1
    assert 108 not in set(store.table["patient_id"]) and len(store) == 9 * 4 - 2 - 4
    assert "skipped: 6 unreadable file(s), 1 series without a readable image" in summarize_store(store)


def test_labels_without_images_and_images_without_labels_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = make_rsna(tmp_path / "data", slices=2, size=8)
    train = pd.read_csv(src / "train.csv")
    extra = train.iloc[[0]].assign(patient_id=999)
    pd.concat([train[train["patient_id"] != 102], extra]).to_csv(src / "train.csv", index=False)
    store = prepare_store(src, tmp_path / "store", tiny_cfg(size=8))
    err = caplog.text
    assert "1 patient(s) in train.csv have no series under train_images/" in err and "999" in err
    assert "1 patient(s) have images but no row in train.csv" in err and "102" in err
    assert set(store.table["patient_id"]) == set(GRADES) - {102}
    assert store.meta["dropped"]["patients_without_images"] == 1


def test_missing_series_meta_infers_series_from_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = make_rsna(tmp_path / "data", slices=2, size=8)
    (src / "train_series_meta.csv").unlink()
    store = prepare_store(src, tmp_path / "store", tiny_cfg(size=8))
    assert "train_series_meta.csv not found" in caplog.text
    assert store.table["series_id"].nunique() == 9 and store.table["aortic_hu"].isna().all()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("empty", "is empty; copy the RSNA 2023 data there"),
        ("missing", "does not exist; run `toolkit demo-data`"),
        ("no-train", "train.csv not found; the source must hold train.csv"),
        ("no-images", "train_images not found"),
        ("no-overlap", "no patient has both a row in"),
        ("bad-label", "column 'liver_low' must hold only 0 or 1"),
    ],
)
def test_bad_input_errors(tmp_path: Path, damage: str, message: str) -> None:
    src = tmp_path / "data"
    if damage == "empty":
        src.mkdir()
    elif damage != "missing":
        make_rsna(src, slices=1, size=8, grades={101: {}, 102: {"liver": 1}})
        train = pd.read_csv(src / "train.csv")
        if damage == "no-train":
            (src / "train.csv").unlink()
        elif damage == "no-images":
            for f in sorted((src / "train_images").rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            (src / "train_images").rmdir()
        elif damage == "no-overlap":
            train.assign(patient_id=train["patient_id"] + 1000).to_csv(src / "train.csv", index=False)
        elif damage == "bad-label":
            train.assign(liver_low=2).to_csv(src / "train.csv", index=False)
    with pytest.raises(ToolkitError, match=message.replace("(", r"\(")) as err:
        prepare_store(src, tmp_path / "store", tiny_cfg(size=8))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- CLI
def _invoke(*args: str):  # noqa: ANN202
    from typer.testing import CliRunner

    from toolkit.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_missing_column_is_one_line_error(tmp_path: Path) -> None:
    src = make_rsna(tmp_path / "data", slices=1, size=8, grades={101: {}, 102: {"spleen": 2}})
    pd.read_csv(src / "train.csv").drop(columns="spleen_high").to_csv(src / "train.csv", index=False)
    result = _invoke("prepare", "--workdir", str(tmp_path))
    assert result.exit_code == 2
    message = f"error: {src / 'train.csv'} is missing column 'spleen_high'; add it (RSNA 2023 header)"
    message += " and re-run"
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_prepare_prints_summary_and_refuses_rerun(rsna: Path, tmp_path: Path) -> None:
    args = ["prepare", "--workdir", str(tmp_path), "--source", str(rsna), "--size", "16", "--folds", "2"]
    args += ["--slices-per-series", "0", "--workers", "1", "--test-fraction", "0.25"]
    args += ["--set", "train.image_size=16", "--set", "gen.image_size=16"]  # no larger than the 16 px store
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert "slice store: 54 slices of 16x16" in result.output
    assert (tmp_path / "store" / "config.yaml").exists()
    again = _invoke(*args)
    assert again.exit_code == 2 and "already holds a slice store; pass --force to rebuild it" in again.output


# ------------------------------------------------------------------ de-identification
def _identifying_values(source: Path) -> set[str]:
    import pydicom

    values = set()
    for f in (source / "train_images").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        values |= {str(ds.PatientName), str(ds.PatientID), ds.SOPInstanceUID, ds.StudyInstanceUID}
    return values


def assert_no_bytes_in_store(store_dir: Path, values: set[str]) -> None:
    blobs = {p: p.read_bytes() for p in store_dir.rglob("*") if p.is_file()}
    assert blobs, "store is empty"
    for value in values:
        for encoded in {value.encode(), value.encode("utf-16-le"), value.replace("^", " ").encode()}:
            for path, blob in blobs.items():
                assert encoded not in blob, f"{value!r} found in {path.name}"


def test_store_holds_no_dicom_identifiers(rsna: Path, tmp_path: Path) -> None:
    values = _identifying_values(rsna)
    assert {FAKE_NAME, "MRN-0042"} <= values and len(values) > 10
    prepare_store(rsna, tmp_path / "store", tiny_cfg())
    assert_no_bytes_in_store(tmp_path / "store", values)


# ----------------------------------------------------------------- built-in phantom
@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolkit.config import PhantomConfig
    from toolkit.data.phantom import write_phantom

    cfg = dataclasses.replace(
        PhantomConfig(), patients=8, slices=6, size=64, prevalence=dict.fromkeys(ORGANS, 0.4)
    )
    out = tmp_path_factory.mktemp("phantom") / "data"
    write_phantom(out, cfg, seed=0)
    return out


@pytest.mark.slow
def test_phantom_through_process_pool(phantom: Path, tmp_path: Path) -> None:
    from toolkit.data.phantom import identifying_values

    pooled = prepare_store(phantom, tmp_path / "pool", tiny_cfg(size=32, workers=2))
    t = pooled.table
    train = pd.read_csv(phantom / "train.csv")
    for organ in ORGANS:
        injured = (train[f"{organ}_healthy"] == 0).sum()
        assert t.loc[t[f"{organ}_patient"] > 0, "patient_id"].nunique() == injured
    image_labels = pd.read_csv(phantom / "image_level_labels.csv")
    assert len(image_labels), "the phantom config should give image-level labels"
    labelled = t[t["series_id"].isin(image_labels["series_id"])]
    assert int(labelled["bowel"].sum() + labelled["extravasation"].sum()) == len(image_labels)
    assert len(t) == 6 * pd.read_csv(phantom / "train_series_meta.csv").shape[0]
    assert (t.groupby("patient_id")["fold"].nunique() == 1).all()
    assert not set(t.loc[t["split"] == "test", "patient_id"]) & set(t.loc[t["fold"] >= 0, "patient_id"])
    # Air around the body and soft tissue inside it, whatever the file's pixel encoding.
    assert np.median(pooled.images[:, :4, :4]) < -950
    assert 0 < np.median(pooled.images[:, 10:22, 10:22]) < 150

    # The pool and a single process build the same store.
    serial = prepare_store(phantom, tmp_path / "serial", tiny_cfg(size=32, workers=1))
    assert serial.table.equals(t)
    assert {**serial.meta, "config": None} == {**pooled.meta, "config": None}  # config differs in workers
    np.testing.assert_array_equal(serial.images, pooled.images)

    # De-identification: no fake identifying value of the phantom's DICOM headers in any stored byte.
    values = identifying_values(phantom)
    assert len(values) > 20
    assert_no_bytes_in_store(tmp_path / "pool", values)


def test_solid_organ_slice_annotations_label_only_their_series() -> None:
    """Liver rows label one series; RSNA's Bowel rows say nothing about the liver of another."""
    from toolkit.data.labels import slice_labels

    slices = pd.DataFrame(
        {"patient_id": [1] * 8 + [2] * 4, "series_id": [10] * 4 + [11] * 4 + [20] * 4, "instance": [1, 2, 3, 4] * 3}
    )
    grades = pd.DataFrame(
        {"patient_id": [1, 2], "bowel": [0, 1], "extravasation": [0, 0], "kidney": [0, 0], "liver": [2, 1]}
        | {"spleen": [0, 0]}
    )
    image_labels = pd.DataFrame(
        {"series_id": [10, 10, 20], "instance_number": [2, 3, 4], "organ": ["liver", "liver", "bowel"]}
    )
    out = slice_labels(slices, grades, image_labels)
    assert out["liver"].tolist() == [0, 2, 2, 0] + [2] * 4 + [1] * 4  # series 11 and 20: patient grade
    assert out["bowel"].tolist() == [0] * 8 + [0, 0, 0, 1]
    assert (out["liver_patient"] == [2] * 8 + [1] * 4).all()
    # Which labels came from image-level rows: liver only in series 10; bowel in every series with any row.
    assert out["liver_image_level"].tolist() == [1] * 4 + [0] * 8
    assert out["bowel_image_level"].tolist() == [1] * 4 + [0] * 4 + [1] * 4
    assert out["spleen_image_level"].sum() == 0


# ------------------------------------------------------ bad input through the CLI
CLI_SMALL = ["--size", "8", "--folds", "2", "--workers", "1", "--test-fraction", "0.25", "--slices-per-series", "0"]


def _one_line_error(result) -> str:  # noqa: ANN001
    """The CLI's message for a user error: exit status 2, a single 'error: ...' line, no traceback."""
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text, text
    return text


@pytest.mark.parametrize(
    ("group", "ones"),
    [("liver", ("liver_low", "liver_high")), ("bowel", ("bowel_healthy", "bowel_injury"))],
)
def test_cli_two_ones_in_an_organ_group(tmp_path: Path, group: str, ones: tuple[str, str]) -> None:
    src = make_rsna(tmp_path / "data", slices=1, size=8, grades={101: {}, 102: {"liver": 1}, 103: {}})
    train = pd.read_csv(src / "train.csv")
    train.loc[1, list(ones)] = 1  # patient 102: both states of one organ
    if group == "liver":
        train.loc[1, "liver_healthy"] = 0
    train.to_csv(src / "train.csv", index=False)
    text = _one_line_error(_invoke("prepare", "--workdir", str(tmp_path), *CLI_SMALL))
    assert str(src / "train.csv") in text and "data row 2 (patient_id 102)" in text
    assert f"{ones[0]} and {ones[1]} are both 1" in text and "exactly one 1" in text
    assert not (tmp_path / "store" / "manifest.csv").exists()


def test_cli_workdir_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a workspace")
    for command in ("prepare", "status"):
        text = _one_line_error(_invoke(command, "--workdir", str(file)))
        assert f"workspace {file} is a file, not a folder" in text
    assert file.read_text() == "not a workspace"


def test_cli_empty_series_meta_names_that_file(tmp_path: Path) -> None:
    src = make_rsna(tmp_path / "data", slices=1, size=8, grades={101: {}, 102: {"liver": 1}})
    pd.read_csv(src / "train_series_meta.csv").head(0).to_csv(src / "train_series_meta.csv", index=False)
    text = _one_line_error(_invoke("prepare", "--workdir", str(tmp_path), *CLI_SMALL))
    assert f"{src / 'train_series_meta.csv'} has a header but no rows" in text
    assert "no patient has both" not in text
    (src / "train_series_meta.csv").write_text("")  # not even a header
    text = _one_line_error(_invoke("prepare", "--workdir", str(tmp_path), *CLI_SMALL))
    assert f"{src / 'train_series_meta.csv'} is empty (not even a header row)" in text


def test_cli_image_labels_naming_absent_slices_warn(tmp_path: Path) -> None:
    """Real exports miss slices: such rows cannot label anything, so prepare goes on and says how many."""
    src = make_rsna(tmp_path / "data", slices=6, size=8)
    labels = pd.read_csv(src / "image_level_labels.csv")
    extra = pd.DataFrame(
        [(101, 1010, 99, "Bowel"), (102, 1020, 7, "Active_Extravasation"), (101, 5555, 1, "Bowel")],
        columns=labels.columns,
    )  # two slices series 1010/1020 do not have; series 5555 is not in the study (not counted)
    pd.concat([labels, extra]).to_csv(src / "image_level_labels.csv", index=False)
    result = _invoke("prepare", "--workdir", str(tmp_path), *CLI_SMALL)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "instance_number that no readable file" in line]
    assert len(warnings) == 1, result.output
    assert str(src / "image_level_labels.csv") in warnings[0] and ": 2 row(s)" in warnings[0]
    assert "first: patient_id 101, series_id 1010, instance_number 99" in warnings[0]
    store = SliceSet.load(tmp_path / "store")
    assert store.meta["dropped"]["image_label_rows_without_slice"] == 2
    t = store.table
    assert sorted(t.loc[(t["series_id"] == 1010) & (t["bowel"] == 1), "instance"]) == [2, 3]  # rule unchanged


def test_image_labels_of_slices_left_out_by_subsampling_do_not_warn(
    rsna: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = prepare_store(rsna, tmp_path / "store", tiny_cfg(size=8, slices_per_series=2))
    assert not set(store.table.loc[store.table["series_id"] == 1010, "instance"]) & {2, 3}  # listed, not kept
    assert "instance_number" not in caplog.text
    assert store.meta["dropped"]["image_label_rows_without_slice"] == 0
