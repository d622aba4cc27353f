"""HU conversion and z ordering on real scanner DICOM and on small files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from toolkit.data.dicom import load_series, read_hu, read_series
from toolkit.errors import ToolkitError


def write_ct(
    path: Path,
    hu: np.ndarray,
    *,
    instance: int = 1,
    position: tuple[float, float, float] | None = (0.0, 0.0, 0.0),
    orientation: tuple[float, ...] | None = (1, 0, 0, 0, 1, 0),
    slice_location: float | None = None,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    signed: bool = False,
    bits_stored: int = 16,
    monochrome1: bool = False,
    rle: bool = False,
    spacing: tuple[float, float] = (0.8, 0.8),
    patient_name: str = "Doe^Jane",
) -> Path:
    """Write ``hu`` (H, W) as a one-slice CT file with the given pixel encoding.

    Stored values are ``(hu - intercept) / slope``; MONOCHROME1 stores the inverse over the
    BitsStored range; a signed 12-bit value keeps its upper four bits zero (as scanners store it).
    """
    slope_v = 1.0 if slope is None else slope
    intercept_v = 0.0 if intercept is None else intercept
    stored = np.rint((np.asarray(hu, np.float64) - intercept_v) / slope_v).astype(np.int64)
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    assert stored.min() >= lo and stored.max() <= hi, "test values do not fit the encoding"
    if monochrome1:
        stored = (-1 - stored) if signed else (hi - stored)
    raw = (stored & (2**bits_stored - 1)).astype(np.uint16)  # two's complement within BitsStored bits

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = "20230417"
    ds.Modality = "CT"
    ds.PatientName = patient_name
    ds.PatientID = "MRN-0042"
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    if slice_location is not None:
        ds.SliceLocation = slice_location
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = raw.tobytes()
    if rle:
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom_slice(size: int = 24, seed: int = 0) -> np.ndarray:
    """Air around a soft-tissue disc with fat, bone and a few negative values: a spread of HU."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    hu = np.full((size, size), -1000.0)
    hu[xx**2 + yy**2 < 0.4**2] = -100.0  # fat rim
    hu[xx**2 + yy**2 < 0.3**2] = 45.0  # soft tissue
    hu[(xx - 0.1) ** 2 + yy**2 < 0.05**2] = 700.0  # bone
    return np.rint(hu + rng.integers(-20, 20, hu.shape)).astype(np.float64)


# ----------------------------------------------------------------- real scanner files
def test_ct_small_hounsfield_units_by_tissue() -> None:
    """A real cervical-spine CT slice (contrast): air, CSF/cord, contrast-filled vessel, cortical bone."""
    hu, info = read_hu(get_testdata_file("CT_small.dcm"))
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    assert np.median(hu[:12, :12]) < -700  # air in the top-left corner
    assert 0 < np.median(hu[46:54, 52:64]) < 80  # spinal canal
    assert np.median(hu[4:16, 80:100]) > 100  # contrast-enhanced vessel
    assert np.median(hu[62:70, 50:70]) > 300  # posterior elements of the vertebra
    assert info["instance"] == 1 and info["z_source"] == "position"
    assert info["z"] == pytest.approx(-75.7, abs=1e-3)  # axial: z is the superior coordinate
    assert info["spacing"] == pytest.approx((0.661468, 0.661468))


def test_contrast_abdomen_jpeg2000_hounsfield_units() -> None:
    """A real portal-venous abdominal CT stored as JPEG 2000 (decoded through pylibjpeg)."""
    path = get_testdata_file("explicit_VR-UN.dcm")
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax == "1.2.840.10008.1.2.4.90"  # JPEG 2000 Lossless
    hu, info = read_hu(path)
    assert hu.shape == (512, 512)
    corners = [hu[:64, :64], hu[:64, -64:], hu[-64:, :64], hu[-64:, -64:]]
    assert all(np.median(c) < -900 for c in corners)  # air outside the body
    assert -150 < np.median(hu[355:372, 200:300]) < -50  # subcutaneous fat
    assert 40 < np.median(hu[260:300, 150:190]) < 160  # enhanced liver parenchyma
    assert -1024 <= hu.min() and hu.max() > 300  # bone present, nothing below air
    assert info["instance"] == 122
    # IOP rows (1,0,0), columns (0,-1,0): the normal is flipped to +z, so z is still the superior coordinate.
    assert info["z"] == pytest.approx(-121.0)


# ------------------------------------------------------------------- pixel encodings
@pytest.mark.parametrize(
    "encoding",
    [
        {"signed": True, "intercept": 0.0},
        {"signed": False, "intercept": -1024.0},
        {"signed": True, "bits_stored": 12, "intercept": 0.0},
        {"signed": False, "monochrome1": True, "intercept": -1024.0},
        {"signed": True, "monochrome1": True, "intercept": 0.0},
        {"signed": False, "slope": 0.5, "intercept": -1024.0},
        {"signed": True, "slope": None, "intercept": None},
        {"signed": False, "intercept": -1024.0, "rle": True},
        {"signed": True, "bits_stored": 12, "intercept": 0.0, "rle": True},
    ],
    ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()),
)
def test_same_hu_through_every_encoding(tmp_path: Path, encoding: dict) -> None:
    hu = phantom_slice()
    path = write_ct(tmp_path / "x.dcm", hu, **encoding)
    got, _ = read_hu(path)
    np.testing.assert_array_equal(got, hu.astype(np.float32))


def test_monochrome1_is_read_inverted(tmp_path: Path) -> None:
    """Without the inversion a MONOCHROME1 file would read as bone where there is air."""
    hu = phantom_slice()
    raw = pydicom.dcmread(write_ct(tmp_path / "m1.dcm", hu, monochrome1=True)).pixel_array
    assert raw[0, 0] > raw[12, 12]  # stored: air is the largest value
    got, _ = read_hu(tmp_path / "m1.dcm")
    assert got[0, 0] < -900 and 0 < got[12, 12] < 100


def test_values_clipped_to_air_and_dense_bone(tmp_path: Path) -> None:
    hu = phantom_slice()
    hu[0, :3] = (-3024, -2000, 3500)  # padding outside the scan circle, metal
    got, _ = read_hu(write_ct(tmp_path / "c.dcm", hu, signed=True, intercept=0.0))
    assert got[0, :3].tolist() == [-1024, -1024, 3071]


# ----------------------------------------------------------------------- series
def _write_series(folder: Path, zs: list[float], instances: list[int], **kw: object) -> dict[int, float]:
    folder.mkdir(parents=True, exist_ok=True)
    level = {}
    for z, inst in zip(zs, instances, strict=True):
        hu = np.full((16, 16), float(inst * 10))  # each slice says which instance it came from
        write_ct(folder / f"{inst}.dcm", hu, instance=inst, position=(-100.0, -100.0, z), **kw)
        level[inst] = z
    return level


def test_series_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    # Instance numbers run against z, as when a scanner numbers head-to-feet.
    rng = np.random.default_rng(1)
    zs = list(rng.permutation(np.arange(8) * 2.5 - 40))
    instances = list(range(1, 9))
    _write_series(tmp_path / "s", zs, instances)
    images, table = read_series(tmp_path / "s")
    assert list(table.columns) == ["instance", "z"]
    assert np.all(np.diff(table["z"]) > 0)
    assert images.dtype == np.int16 and images.shape == (8, 16, 16)
    assert images[:, 8, 8].tolist() == (table["instance"] * 10).tolist()  # pixels travel with their row
    assert table["z"].tolist() == sorted(zs)


def test_series_oblique_orientation_projects_on_normal(tmp_path: Path) -> None:
    # Slices stacked along a tilted normal; the x offset alone would give the opposite order.
    folder = tmp_path / "s"
    folder.mkdir()
    c, s = np.cos(0.3), np.sin(0.3)
    iop = (1.0, 0.0, 0.0, 0.0, c, s)  # normal = (0, -s, c)
    for k, inst in enumerate([3, 1, 2]):
        pos = (50.0 - 10 * k, -k * 5.0 * s, k * 5.0 * c)
        hu = np.full((8, 8), 10.0 * k)
        write_ct(folder / f"{inst}.dcm", hu, instance=inst, position=pos, orientation=iop)
    _, table = read_series(folder)
    assert table["instance"].tolist() == [3, 1, 2]
    np.testing.assert_allclose(table["z"], [0.0, 5.0, 10.0], atol=1e-6)


def test_series_fallback_to_slice_location_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    for inst, loc in [(1, 30.0), (2, 10.0), (3, 20.0)]:
        write_ct(folder / f"{inst}.dcm", np.zeros((8, 8)), instance=inst, position=None, slice_location=loc)
    _, table = read_series(folder)
    assert table["instance"].tolist() == [2, 3, 1]
    assert "ordered by SliceLocation" in caplog.text


def test_series_resampled_square_with_air_padding(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    hu = np.full((20, 40), 50.0)  # wide: padded top and bottom with air before resizing
    write_ct(folder / "1.dcm", hu)
    images, _ = read_series(folder, size=10)
    assert images.shape == (1, 10, 10)
    assert (images[0, :2] == -1024).all() and (images[0, -2:] == -1024).all()
    assert (images[0, 3:7] == 50).all()


def test_body_crop_fills_the_slice_with_the_patient_and_cuts_the_table(tmp_path: Path) -> None:
    # 64 x 64 scan: an off-centre body (a 20 x 28 px soft-tissue ellipse), a table bar under it.
    yy, xx = np.mgrid[:64, :64]
    folder = tmp_path / "s"
    folder.mkdir()
    for inst, half_height in [(1, 8), (2, 10)]:  # the body is taller on slice 2
        hu = np.full((64, 64), -1000.0)
        hu[((yy - 24) / half_height) ** 2 + ((xx - 20) / 14) ** 2 <= 1] = 40.0
        hu[44:47, 2:62] = 200.0  # table, separated from the body by air
        write_ct(folder / f"{inst}.dcm", hu, instance=inst, position=(0.0, 0.0, float(inst)))
    whole, _ = read_series(folder, size=32)
    cropped, _ = read_series(folder, size=32, crop_body=True)
    table = load_series(folder, size=32, crop_body=True).table
    # Without the crop the table shows and the body covers under half the width.
    assert (whole[:, 21:24] > 100).any()
    assert (whole[0, :20] > 0).any(axis=0).sum() < 16
    # With it: one field for the series, sized to the taller slice, table gone, body spans the width.
    assert table[["field_top", "field_left", "field_side"]].drop_duplicates().shape[0] == 1
    top, left, side = table.iloc[0][["field_top", "field_left", "field_side"]]
    assert 28 <= side <= 32 and left <= 7 and top <= 14
    assert not (cropped > 100).any()
    assert (cropped[1] > 0).any(axis=0).sum() >= 26 and (cropped[1] > 0).any(axis=1).sum() >= 18


def test_series_evenly_spaced_subset(tmp_path: Path) -> None:
    _write_series(tmp_path / "s", [float(z) for z in range(10)], list(range(10, 0, -1)))
    _, table = read_series(tmp_path / "s", slices=4)
    assert table["z"].tolist() == [0.0, 3.0, 6.0, 9.0]


def test_series_skips_corrupt_file_and_rejects_empty_folder(tmp_path: Path) -> None:
    _write_series(tmp_path / "s", [0.0, 1.0], [1, 2])
    (tmp_path / "s" / "3.dcm").write_bytes(b"not a dicom file")
    images, table = read_series(tmp_path / "s")
    assert table["instance"].tolist() == [1, 2]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "1.dcm").write_bytes(b"junk")
    with pytest.raises(ToolkitError, match="holds no readable DICOM"):
        read_series(tmp_path / "empty")
