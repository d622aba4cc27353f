"""The built-in dataset: a CT trauma phantom in the RSNA 2023 Abdominal Trauma Detection layout.

``toolkit demo-data`` calls :func:`write_phantom`, which writes exactly what the Kaggle
competition ships, so ``toolkit prepare`` reads the phantom and the real data the same way::

    <out_dir>/
      train.csv                 patient_id + one-hot columns per organ group + any_injury
      train_series_meta.csv     patient_id, series_id, aortic_hu, incomplete_organ
      image_level_labels.csv    patient_id, series_id, instance_number, injury_name
      train_images/<patient_id>/<series_id>/<instance_number>.dcm
      segmentations/<series_id>.nii[.gz]  organ masks like RSNA's, for phantom.segmentation_fraction of the series
      phantom_truth/<series_id>.npz    organ and injury masks (evaluation only; not in RSNA)

The DICOM files are real CT images written with pydicom. Like real data they differ between
series: unsigned pixels with a -1024 rescale intercept or signed pixels with intercept 0,
12 or 16 stored bits, RLE Lossless compression, a padding value outside the scan circle, and
InstanceNumber running head-to-feet, feet-to-head or shuffled with respect to z. Identifying
tags (:data:`IDENTIFYING_TAGS`) hold fake values that must never reach any output;
:func:`identifying_values` lists them so tests can check that.

The anatomy and injuries are drawn by :mod:`toolkit.data.phantom_anatomy`. Each truth file
holds, per slice in InstanceNumber order, ``instance_number``, ``z``, ``organs`` and ``injury``
label masks on the DICOM pixel grid, and their legend: ``code_names`` (str) and ``codes`` (int),
the :data:`ORGAN_CODES` pairs, so readers take the codes from the file.

Everything is a function of ``seed``: the cohort plan (ids, who is injured, formats) comes from
one generator, each patient from its own generator seeded by ``(seed, patient index)``, and
DICOM UIDs are hashes of the seed and the ids.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless

from toolkit import GRADED_ORGANS, ORGANS
from toolkit.config import PhantomConfig, check_section
from toolkit.data.phantom_anatomy import (
    ORGAN_CODES,
    PHASES,
    AnatomyModel,
    Canvas,
    Lesion,
    finish,
)
from toolkit.data.phantom_rle import encode_rle_frames
from toolkit.errors import ConfigError, ToolkitError
from toolkit.reporting import Reporter, as_reporter

__all__ = [
    "IDENTIFYING_TAGS",
    "LABEL_COLUMNS",
    "ORGAN_CODES",
    "identifying_values",
    "label_columns",
    "write_phantom",
]

IDENTIFYING_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientAddress",
    "StudyDate",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "OperatorsName",
    "AccessionNumber",
    "StudyID",
    "StationName",
    "DeviceSerialNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)
"""DICOM keywords the phantom fills with fake identifying values (see :func:`identifying_values`)."""


def label_columns() -> list[str]:
    """The columns of RSNA 2023 ``train.csv`` in order."""
    cols = ["patient_id"]
    for organ in ORGANS:
        grades = ("healthy", "low", "high") if organ in GRADED_ORGANS else ("healthy", "injury")
        cols += [f"{organ}_{g}" for g in grades]
    return cols + ["any_injury"]


LABEL_COLUMNS: tuple[str, ...] = tuple(label_columns())
SERIES_META_COLUMNS: tuple[str, ...] = ("patient_id", "series_id", "aortic_hu", "incomplete_organ")
IMAGE_LEVEL_COLUMNS: tuple[str, ...] = ("patient_id", "series_id", "instance_number", "injury_name")
# RSNA 2023 names for bowel and extravasation; kidney, liver and spleen are this toolkit's extension.
IMAGE_LEVEL_NAMES: dict[str, str] = {
    "extravasation": "Active_Extravasation",
    "bowel": "Bowel",
    "kidney": "Kidney",
    "liver": "Liver",
    "spleen": "Spleen",
}

# Pixel storage variants seen in RSNA 2023: (numpy dtype, BitsStored, RescaleIntercept, padding).
_FORMATS: tuple[tuple[str, int, float, int | None], ...] = (
    ("uint16", 12, -1024.0, None),
    ("uint16", 16, -1024.0, None),
    ("int16", 16, 0.0, -2000),
    ("int16", 12, 0.0, None),
)
_ORDERS: tuple[str, ...] = ("head_first", "feet_first", "shuffled")  # InstanceNumber vs z
_MIN_LESION_PX_64 = 9  # an injury covers at least this many pixels at 64x64 on its best slice
_MIN_LABEL_PX_64 = 2  # a slice is listed in image_level_labels.csv when its injury covers this many


# --------------------------------------------------------------------------- cohort plan


@dataclass
class _SeriesPlan:
    series_id: int
    fmt: int  # index into _FORMATS
    rle: bool
    order: str
    incomplete: bool


@dataclass
class _PatientPlan:
    index: int
    patient_id: int
    grades: dict[str, int]  # 0 healthy, 1 low/injury, 2 high
    series: list[_SeriesPlan] = field(default_factory=list)


def _exact_subset(rng: np.random.Generator, n: int, share: float) -> np.ndarray:
    """``round(share * n)`` distinct indices out of ``n``, in random order."""
    k = min(n, int(round(share * n)))
    return rng.permutation(n)[:k]


def _plan_cohort(cfg: PhantomConfig, seed: int) -> list[_PatientPlan]:
    """Ids, injuries and per-series formats of the whole cohort (exact counts, seeded)."""
    rng = np.random.default_rng([seed, 0])
    n = cfg.patients
    ids = np.sort(rng.choice(np.arange(10000, 65536), size=n, replace=False))
    plans = [_PatientPlan(i, int(pid), {o: 0 for o in ORGANS}) for i, pid in enumerate(ids)]
    for organ in ORGANS:
        injured = _exact_subset(rng, n, float(cfg.prevalence.get(organ, 0.0)))
        n_high = int(round(float(cfg.high_grade_fraction.get(organ, 0.0)) * len(injured)))
        for rank, i in enumerate(injured):
            plans[i].grades[organ] = 2 if (organ in GRADED_ORGANS and rank < n_high) else 1
    two = set(_exact_subset(rng, n, cfg.second_series_fraction).tolist())
    n_series = n + len(two)
    series_ids = rng.choice(np.arange(10000, 65536), size=n_series, replace=False)
    # Cycle through the variants in a random order so every cohort holds each of them.
    fmt = rng.permutation(n_series) % len(_FORMATS)
    rle = rng.permutation(n_series) % 3 == 0
    order = rng.permutation(n_series) % len(_ORDERS)
    incomplete = np.zeros(n_series, dtype=bool)
    incomplete[_exact_subset(rng, n_series, cfg.incomplete_organ_fraction)] = True
    k = 0
    for plan in plans:
        for _ in range(2 if plan.index in two else 1):
            plan.series.append(
                _SeriesPlan(
                    int(series_ids[k]), int(fmt[k]), bool(rle[k]), _ORDERS[order[k]], bool(incomplete[k])
                )
            )
            k += 1
    return plans


# --------------------------------------------------------------------------- one patient


@dataclass
class _SeriesResult:
    series_id: int
    aortic_hu: float
    incomplete: bool
    n_slices: int
    # instance numbers of slices on which each organ's injury shows (at least _MIN_LABEL_PX_64 pixels)
    injured_instances: dict[str, list[int]]


def _uid(seed: int, *parts: object) -> str:
    """A deterministic UID in the UUID-derived ``2.25.<128-bit int>`` form (ISO/IEC 9834-8).

    (pydicom's ``generate_uid(prefix=None)`` ignores ``entropy_srcs`` and returns a random UUID.)
    """
    digest = hashlib.sha256("|".join(["toolkit-phantom", str(seed), *map(str, parts)]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _fake_identity(seed: int, plan: _PatientPlan) -> dict[str, str]:
    """Fake identifying values of one patient; a stream apart from the anatomy."""
    rng = np.random.default_rng([seed, 2, plan.index])

    def tag(k: int) -> str:
        return "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"), k))

    def date(y0: int, y1: int) -> str:
        return f"{int(rng.integers(y0, y1))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"

    sex = str(rng.choice(["F", "M"]))
    first = "JANE" if sex == "F" else "JOHN"
    return {
        "PatientSex": sex,
        "PatientName": f"PHANTOM^{first}^{tag(6)}",
        "PatientID": f"MRN-{tag(8)}",
        "PatientBirthDate": date(1940, 2004),
        "PatientAddress": f"{int(rng.integers(1, 999))} {tag(5)} Street, Faketown",
        "StudyDate": date(2012, 2023),
        "InstitutionName": f"Phantom General Hospital {tag(4)}",
        "InstitutionAddress": f"{tag(6)} Avenue, Faketown",
        "ReferringPhysicianName": f"FAKE^DOCTOR^{tag(5)}",
        "OperatorsName": f"FAKE^TECH^{tag(5)}",
        "AccessionNumber": f"ACC{tag(9)}",
        "StudyID": f"STUDY-{tag(6)}",
        "StationName": f"CT-{tag(6)}",
        "DeviceSerialNumber": f"SN-{tag(8)}",
        "StudyInstanceUID": _uid(seed, "study", plan.patient_id),
        "FrameOfReferenceUID": _uid(seed, "frame", plan.patient_id),
    }


def _series_coverage(rng: np.random.Generator, incomplete: bool) -> tuple[float, float]:
    """(t0, t1): craniocaudal coverage of a series; an incomplete one cuts an organ's end."""
    t0, t1 = rng.uniform(-0.07, -0.02), rng.uniform(1.02, 1.07)
    if incomplete:
        if rng.random() < 0.5:
            t0 = rng.uniform(0.12, 0.2)  # starts below the liver dome / spleen tip
        else:
            t1 = rng.uniform(0.8, 0.88)  # stops above the kidneys' lower poles
    return float(t0), float(t1)


def _render_patient(plan: _PatientPlan, cfg: PhantomConfig, seed: int) -> list[dict]:
    """Draw one patient and render every series: pixels (int16 HU), truth canvas, geometry."""
    rng = np.random.default_rng([seed, 1, plan.index])
    model = AnatomyModel(rng)
    size = cfg.size
    # Pixel spacing so the body fits the field of view, as a scanner operator would choose.
    lo = min(0.88, max(0.6, 2 * (model.A + 12.0) / 512))
    spacing = float(np.round((lo + (0.9 - lo) * rng.uniform() ** 2) * 512 / size, 6))
    z_ref = float(rng.uniform(-120.0, 80.0))  # table position of the liver dome, mm
    centre = (float(rng.uniform(-15, 15)), float(rng.uniform(-40, 10)))  # image centre, world mm
    body = (centre[0] + float(rng.uniform(-12, 12)), centre[1] + float(rng.uniform(-20, 10)))
    phases = (
        ["arterial", "portal_venous"]
        if len(plan.series) == 2
        else ["portal_venous" if rng.random() < 0.75 else "arterial"]
    )
    series = []
    for j, sp in enumerate(plan.series):
        t0, t1 = _series_coverage(rng, sp.incomplete)
        if j and not sp.incomplete:  # the second scan starts a little higher or lower
            shift = rng.uniform(-0.03, 0.03)
            t0, t1 = t0 + shift, t1 + shift
        t = np.linspace(t0, t1, cfg.slices, dtype=np.float64)
        move = rng.uniform(-5, 5, 2) if j else np.zeros(2)
        x0 = centre[0] - spacing * (size - 1) / 2
        y0 = centre[1] - spacing * (size - 1) / 2
        xs = x0 + spacing * np.arange(size) - (body[0] + move[0])
        ys = y0 + spacing * np.arange(size) - (body[1] + move[1])
        hu = {k: float(rng.uniform(a, b)) for k, (a, b) in PHASES[phases[j]].items()}
        canvas = model.render(Canvas(t, xs, ys), hu, rng)
        series.append(
            dict(
                plan=sp,
                phase=phases[j],
                t=t,
                z=np.round(z_ref - t * model.length_mm, 2),
                origin=(float(np.round(x0, 3)), float(np.round(y0, 3))),
                spacing=spacing,
                hu=hu,
                canvas=canvas,
                noise=float(rng.uniform(10.0, 18.0) * model.A / 150.0),
            )
        )
    # Injuries: the same lesions in every series, redrawn until each shows in all of them.
    min_half_t = 0.75 * max(float(s["t"][1] - s["t"][0]) for s in series)
    min_px = _MIN_LESION_PX_64 * (size / 64.0) ** 2
    lesions: dict[str, Lesion] = {}
    todo = [o for o in ORGANS if plan.grades[o]]
    for _ in range(200):
        for organ in todo:
            lesions[organ] = model.draw_lesion(organ, plan.grades[organ], rng, min_half_t)
        painted = []
        for s in series:
            c = s["canvas"].copy()
            for organ in ("bowel", "kidney", "liver", "spleen", "extravasation"):
                if organ in lesions:
                    model.render_lesion(c, lesions[organ], s["hu"])
            painted.append(c)
        todo = [
            o
            for o in lesions
            if any((c.injury == ORGAN_CODES[o]).sum(axis=(1, 2)).max() < min_px for c in painted)
        ]
        if not todo:
            break
    # else: with very few, widely spaced slices a small lesion can fall between slices; the patient
    # keeps its label (as a real patient whose injury the sampled slices miss) and the truth masks
    # and image-level labels show where, if anywhere, it is visible.
    for s, c in zip(series, painted, strict=True):
        s["canvas"] = c
        s["pixels"] = finish(c, s["noise"], rng)
    return series


def _instance_numbers(order: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """InstanceNumber of each slice, slices given head (top) to feet."""
    if order == "head_first":
        return np.arange(1, n + 1)
    if order == "feet_first":
        return np.arange(n, 0, -1)
    return rng.permutation(n) + 1


def _ds(value: float) -> str:
    """A DICOM decimal string within 16 characters."""
    return f"{value:.10g}"[:16]


def _write_series(
    out_dir: Path,
    plan: _PatientPlan,
    s: dict,
    identity: dict[str, str],
    seed: int,
    number: int,
    segmentation: int | None = None,
) -> _SeriesResult:
    sp: _SeriesPlan = s["plan"]
    pixels: np.ndarray = s["pixels"]  # int16 HU, head to feet
    canvas: Canvas = s["canvas"]
    n, size = pixels.shape[0], pixels.shape[1]
    rng = np.random.default_rng([seed, 3, sp.series_id])
    inst = _instance_numbers(sp.order, n, rng)
    dtype, bits, intercept, padding = _FORMATS[sp.fmt]
    stored = pixels.astype(np.int32) - int(intercept)
    hi = (1 << bits) - 1 if dtype == "uint16" else (1 << (bits - 1)) - 1
    lo = 0 if dtype == "uint16" else -(1 << (bits - 1))
    stored = np.clip(stored, lo, hi)
    if padding is not None:
        yy, xx = np.mgrid[0:size, 0:size]
        outside = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 > (size / 2) ** 2
        stored[:, outside] = padding
    stored = stored.astype(dtype)
    folder = out_dir / "train_images" / str(plan.patient_id) / str(sp.series_id)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = _uid(seed, "series", sp.series_id)
    thickness = abs(float(s["z"][1] - s["z"][0]))
    description = "ABD/PEL ARTERIAL" if s["phase"] == "arterial" else "ABD/PEL PORTAL VENOUS"
    # One dataset per series; each slice only changes its own elements before being saved.
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless if sp.rle else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    for key, value in identity.items():
        setattr(ds, key, value)
    ds.SeriesDate = ds.ContentDate = identity["StudyDate"]
    ds.Modality = "CT"
    ds.Manufacturer = "TOOLKIT PHANTOM"
    ds.ManufacturerModelName = "trauma-phantom"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDescription = "CT ABDOMEN PELVIS WITH CONTRAST"
    ds.SeriesDescription = description
    ds.BodyPartExamined = "ABDOMEN"
    ds.ContrastBolusAgent = "IV CONTRAST"
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceThickness = _ds(round(thickness, 3))
    ds.PixelSpacing = [_ds(s["spacing"]), _ds(s["spacing"])]
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0 if dtype == "uint16" else 1
    if padding is not None:
        ds.PixelPaddingValue = padding
    frames = encode_rle_frames(stored) if sp.rle else None
    for k in range(n):
        ds.SOPInstanceUID = _uid(seed, "sop", sp.series_id, int(inst[k]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(inst[k])
        ds.ImagePositionPatient = [_ds(s["origin"][0]), _ds(s["origin"][1]), _ds(float(s["z"][k]))]
        ds.SliceLocation = _ds(float(s["z"][k]))
        if frames is not None:
            ds.add_new(0x7FE00010, "OB", encapsulate([frames[k]]))
        else:
            ds.add_new(0x7FE00010, "OW", stored[k].tobytes())
        ds.save_as(folder / f"{int(inst[k])}.dcm", enforce_file_format=True)
    # Truth masks, ordered by InstanceNumber, on the DICOM pixel grid, with their legend: a reader
    # (explain) takes the codes from the file and never from this module.
    order = np.argsort(inst)
    truth_dir = out_dir / "phantom_truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        truth_dir / f"{sp.series_id}.npz",
        instance_number=inst[order].astype(np.int32),
        z=s["z"][order].astype(np.float32),
        organs=canvas.organs[order],
        injury=canvas.injury[order],
        code_names=np.array(list(ORGAN_CODES), dtype=str),
        codes=np.array(list(ORGAN_CODES.values()), dtype=np.int32),
    )
    if segmentation is not None:
        _write_segmentation(out_dir, sp.series_id, s, segmentation)
    injured = {}
    min_px = _MIN_LABEL_PX_64 * (canvas.injury.shape[-1] / 64.0) ** 2
    for organ in IMAGE_LEVEL_NAMES:
        shows = (canvas.injury == ORGAN_CODES[organ]).sum(axis=(1, 2)) >= min_px
        injured[organ] = sorted(int(i) for i in inst[shows])
    return _SeriesResult(sp.series_id, round(s["hu"]["aorta"], 1), sp.incomplete, n, injured)


def _make_patient(
    plan: _PatientPlan, cfg: PhantomConfig, seed: int, out_dir: Path, segmentations: dict[int, int]
) -> list[_SeriesResult]:
    series = _render_patient(plan, cfg, seed)
    identity = _fake_identity(seed, plan)
    numbers = np.random.default_rng([seed, 4, plan.index]).choice(
        np.arange(2, 10), len(series), replace=False
    )
    return [
        _write_series(out_dir, plan, s, identity, seed, int(num), segmentations.get(s["plan"].series_id))
        for s, num in zip(series, numbers, strict=True)
    ]


# --------------------------------------------------------------------------- RSNA-like segmentations

# Voxel orders of the written segmentations, cycled over the series that get one: real files come in
# many (RSNA's are not in the DICOM's order), and prepare must place every one through the affine.
SEGMENTATION_ORDERS: tuple[str, ...] = ("dicom", "z_reversed", "rows_cols_swapped", "flipped", "all")


def _rsna_codes(canvas: Canvas) -> np.ndarray:
    """Truth organs (n, H, W) in RSNA's segmentation codes (toolkit.data.masks.STORE_LABELS)."""
    from toolkit.data.masks import STORE_LABELS

    organs = canvas.organs
    out = np.zeros(organs.shape, dtype=np.uint8)
    out[organs == ORGAN_CODES["liver"]] = STORE_LABELS["liver"]
    out[organs == ORGAN_CODES["spleen"]] = STORE_LABELS["spleen"]
    out[organs == ORGAN_CODES["bowel"]] = STORE_LABELS["bowel"]
    # One truth code for both kidneys; body x grows towards the patient's left (as DICOM's x does,
    # so the left kidney shows on the image's right), with the body midline at x = 0.
    kidney = organs == ORGAN_CODES["kidney"]
    left = (canvas.xs > 0)[None, None, :]
    out[kidney & left] = STORE_LABELS["kidney_left"]
    out[kidney & ~left] = STORE_LABELS["kidney_right"]
    return out


def _reorder(data: np.ndarray, affine: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray]:
    """The same volume in another voxel order, with the affine that keeps every voxel in place."""

    def flip(d: np.ndarray, a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        f = np.eye(4)
        f[axis, axis], f[axis, 3] = -1.0, d.shape[axis] - 1  # old index = n - 1 - new index
        return np.flip(d, axis), a @ f

    def swap(d: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return d.transpose(1, 0, 2), a @ np.eye(4)[[1, 0, 2, 3]]  # old (i, j) = new (j, i)

    if order in ("z_reversed", "all"):
        data, affine = flip(data, affine, 2)
    if order in ("rows_cols_swapped", "all"):
        data, affine = swap(data, affine)
    if order in ("flipped", "all"):
        data, affine = flip(data, affine, 0)
        data, affine = flip(data, affine, 1)
    return data, affine


def _write_segmentation(out_dir: Path, series_id: int, s: dict, k: int) -> Path:
    """Write ``segmentations/<series_id>.nii`` (k even) or ``.nii.gz`` (k odd) in voxel order ``k``.

    The DICOM order is voxel (i, j, k) = (column, row, slice head to feet); its LPS position is
    ``origin + (i, j) * spacing`` and the slice's z, and NIfTI's RAS affine negates x and y.
    """
    import nibabel as nib

    labels = _rsna_codes(s["canvas"])  # (slice, row, column), head to feet like s["z"]
    z = np.asarray(s["z"], dtype=np.float64)
    dz = (z[-1] - z[0]) / (len(z) - 1)  # z is rounded to 0.01 mm per slice; the step is uniform
    lps = np.array(
        [
            [s["spacing"], 0.0, 0.0, s["origin"][0]],
            [0.0, s["spacing"], 0.0, s["origin"][1]],
            [0.0, 0.0, dz, z[0]],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    order = SEGMENTATION_ORDERS[k % len(SEGMENTATION_ORDERS)]
    data, affine = _reorder(labels.transpose(2, 1, 0), affine, order)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    folder = out_dir / "segmentations"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{series_id}{'.nii' if k % 2 == 0 else '.nii.gz'}"
    nib.save(img, path)
    return path


# --------------------------------------------------------------------------- public API


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ToolkitError(f"{out_dir} is a file; give a folder for the phantom")
    ours = (
        "train_images",
        "phantom_truth",
        "segmentations",
        "train.csv",
        "train_series_meta.csv",
        "image_level_labels.csv",
    )
    if not force:
        if (out_dir / "train.csv").exists():
            raise ToolkitError(f"{out_dir} already holds a dataset; pass --force to overwrite it")
        if (out_dir / "train_images").is_dir() and any((out_dir / "train_images").iterdir()):
            raise ToolkitError(
                f"{out_dir} already holds train_images/ (an interrupted or other dataset); "
                "pass --force to overwrite it"
            )
    for name in ours:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_phantom(
    out_dir: Path, cfg: PhantomConfig, seed: int = 0, force: bool = False, reporter: Reporter | None = None
) -> dict:
    """Write the CT trauma phantom in the RSNA 2023 Abdominal Trauma Detection layout.

    Parameters
    ----------
    out_dir : Path
        Folder to fill (created). ``train.csv`` is written last, so its presence marks a
        finished dataset.
    cfg : PhantomConfig
        Cohort size, slices per series, image size, prevalences and label shares. Per organ
        exactly ``round(prevalence * patients)`` patients are injured, of which
        ``round(high_grade_fraction * injured)`` are high grade.
    seed : int, default=0
        Same seed, same bytes: CSVs, pixel data and DICOM UIDs.
    force : bool, default=False
        Replace a dataset already in ``out_dir``; without it that raises :class:`ToolkitError`.
    reporter : Reporter, optional
        Shows progress per patient (default: none); the CLI passes
        :class:`toolkit.cli_common.ConsoleReporter`.

    Returns
    -------
    summary : dict
        ``patients``, ``series``, ``slices``, ``injured`` (patients per organ group),
        ``seconds``.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    cfg = check_section(cfg, "phantom")  # load_config's rules, for a PhantomConfig built in code
    _prepare_out_dir(out_dir, force)
    plans = _plan_cohort(cfg, seed)
    # Series with an RSNA-like segmentation (a stream of their own, so the rest stays as it was);
    # each gets the rank that picks its voxel order and file ending.
    series_ids = [sp.series_id for plan in plans for sp in plan.series]
    chosen = np.sort(_exact_subset(np.random.default_rng([seed, 6]), len(series_ids), cfg.segmentation_fraction))
    segmentations = {series_ids[i]: rank for rank, i in enumerate(chosen)}

    results: list[tuple[_PatientPlan, list[_SeriesResult]]] = []
    with as_reporter(reporter).progress() as progress:
        task = progress.add_task("phantom", total=len(plans), info="")
        n_slices = 0
        for plan in plans:
            res = _make_patient(plan, cfg, seed, out_dir, segmentations)
            results.append((plan, res))
            n_slices += sum(r.n_slices for r in res)
            progress.update(task, advance=1, info=f"{n_slices} slices")

    # Image-level labels for an exact share of the series injured in cfg.image_level_organs.
    candidates = [
        (plan, r)
        for plan, res in results
        for r in res
        if any(plan.grades[organ] for organ in cfg.image_level_organs)
    ]
    rng = np.random.default_rng([seed, 5])
    chosen = sorted(_exact_subset(rng, len(candidates), cfg.image_level_fraction).tolist())
    image_rows = []
    for i in chosen:
        plan, r = candidates[i]
        for organ, name in IMAGE_LEVEL_NAMES.items():
            if plan.grades[organ] and organ in cfg.image_level_organs:
                image_rows += [
                    (plan.patient_id, r.series_id, inst, name) for inst in r.injured_instances[organ]
                ]
    image_df = pd.DataFrame(image_rows, columns=list(IMAGE_LEVEL_COLUMNS))
    image_df = image_df.sort_values(list(IMAGE_LEVEL_COLUMNS)).reset_index(drop=True)

    meta_df = pd.DataFrame(
        [
            (plan.patient_id, r.series_id, r.aortic_hu, int(r.incomplete))
            for plan, res in results
            for r in res
        ],
        columns=list(SERIES_META_COLUMNS),
    )
    rows = []
    for plan, _ in results:
        row = {"patient_id": plan.patient_id}
        for organ in ORGANS:
            grades = ("healthy", "low", "high") if organ in GRADED_ORGANS else ("healthy", "injury")
            for g, name in enumerate(grades):
                row[f"{organ}_{name}"] = int(plan.grades[organ] == g)
        row["any_injury"] = int(any(plan.grades.values()))
        rows.append(row)
    train_df = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))

    image_df.to_csv(out_dir / "image_level_labels.csv", index=False)
    meta_df.to_csv(out_dir / "train_series_meta.csv", index=False)
    train_df.to_csv(out_dir / "train.csv", index=False)
    return {
        "patients": len(plans),
        "series": len(meta_df),
        "slices": int(sum(r.n_slices for _, res in results for r in res)),
        "segmentations": len(segmentations),
        "injured": {organ: int(sum(p.grades[organ] > 0 for p in plans)) for organ in ORGANS},
        "seconds": round(time.perf_counter() - start, 1),
    }


def identifying_values(out_dir: Path) -> set[str]:
    """The fake identifying values written into the DICOM headers under ``out_dir``.

    Reads every ``train_images/**/*.dcm`` header (no pixels) and returns the string form of
    each :data:`IDENTIFYING_TAGS` element, so a test can assert that none of them appears
    in any output of the pipeline.
    """
    files = sorted(Path(out_dir).glob("train_images/*/*/*.dcm"))
    if not files:
        raise ToolkitError(f"{out_dir} holds no train_images/<patient>/<series>/*.dcm files")
    values: set[str] = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(IDENTIFYING_TAGS))
        for key in IDENTIFYING_TAGS:
            value = ds.get(key)
            if value not in (None, ""):
                values.add(str(value))
    return values
