"""Organ masks from what users have: RSNA 2023 ``segmentations/`` and TotalSegmentator output.

Inputs (in the source folder next to ``train_images/``)::

    segmentations/<series_id>.nii[.gz]            RSNA 2023: one integer label per organ (RSNA_LABELS)
    totalsegmentator/<series_id>.nii[.gz]         TotalSegmentator ``--ml``: one file, task "total" labels
    totalsegmentator/<series_id>/<class>.nii.gz   TotalSegmentator default: one binary file per class

A mask is placed on the DICOM slices through geometry only, never by array index (RSNA's files are
stored in another voxel order than the DICOM, and other tools write yet others): for each pixel of a
stored slice, the centre of the source pixel it was resampled from is put in patient coordinates with
the slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing (DICOM, LPS), turned into
NIfTI's RAS (x and y change sign), and taken through the inverse NIfTI affine to a voxel, whose label
is read nearest-neighbour (0 outside the volume). The stored pixel's source pixel is the one
:func:`eval.explain.resize_mask` picks, so a mask lands on a stored slice exactly as the image did
(the same field crop, nearest for labels).

The store keeps RSNA's label codes (:data:`STORE_LABELS`) in ``masks.npy`` (uint8, one mask per
stored slice, 0 on slices of series without a mask); :func:`load_masks` reads it.

I/O is kept apart as in MONAI's readers: :func:`read_label_volume` gives an array plus metadata;
the geometry (:func:`pixel_centres_lps`, :func:`lps_to_voxel`, :func:`sample_nearest`,
:func:`map_volume_to_slices`) is pure functions on arrays.

Bad masks never stop ``prepare``: a file that cannot be read, whose volume does not overlap its
series' slices, or that holds unknown label values gives a one-line warning naming the file, and the
series is kept (without that mask, or with its known labels only). A mask is an optional extra on
a few series (RSNA has them for about 4% of series), and a segmenter can fill the rest; stopping a
long ingest for one of them would cost more than it protects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from toolkit.errors import DataError

STORE_LABELS: dict[str, int] = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "bowel": 5}
"""Label codes of ``masks.npy``: RSNA 2023's (0 = background)."""

MASKS_FILE = "masks.npy"
SEGMENTATIONS_DIR = "segmentations"
TOTALSEGMENTATOR_DIR = "totalsegmentator"
MASK_SOURCES: tuple[str, ...] = ("rsna", "totalsegmentator")

# RSNA 2023 segmentations/<series_id>.nii: 1 liver, 2 spleen, 3 left kidney, 4 right kidney, 5 bowel.
# Source: the 2nd-place solution's notebook, TheoViel/kaggle_rsna_abdominal_trauma,
# notebooks/Segmentations.ipynb (`labels = {1: "liver", 2: "spleen", 3: "left-kidney", 4: "right-kidney",
# 5: "bowel"}`, counting values 0..5 only); the competition's data page says the NIfTI files are not in the
# DICOM's orientation and must be placed with the NIfTI header and the DICOM geometry.
RSNA_LABELS: dict[int, str] = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "bowel"}

# TotalSegmentator (v2) task "total", the classes the store uses, from
# wasserth/TotalSegmentator totalsegmentator/map_to_binary.py, class_map["total"] (117 classes; v1's
# "total_v1" numbers bowel differently: 55 small_bowel, 56 duodenum, 57 colon). A --ml file's own
# label table (its NIfTI header extension) wins over this map when present.
TOTALSEGMENTATOR_TOTAL: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    5: "liver",
    18: "small_bowel",
    19: "duodenum",
    20: "colon",
}
TOTALSEGMENTATOR_N_CLASSES = 117
# TotalSegmentator class name -> store organ; bowel = small bowel + duodenum + colon.
TOTALSEGMENTATOR_TO_STORE: dict[str, str] = {
    "liver": "liver",
    "spleen": "spleen",
    "kidney_left": "kidney_left",
    "kidney_right": "kidney_right",
    "small_bowel": "bowel",
    "duodenum": "bowel",
    "colon": "bowel",
}
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


# ------------------------------------------------------------------ finding files
@dataclass(frozen=True)
class MaskFile:
    """Where one series' mask is.

    ``source`` : {"rsna", "totalsegmentator"}; ``kind`` : "labels" (one label volume) or "classes"
    (a folder of binary per-class files); ``name`` : the path relative to the source folder, for messages.
    """

    source: str
    path: Path
    kind: str
    name: str


def _strip_nifti(name: str) -> str | None:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_masks(source: Path, series_ids: Iterable[int]) -> tuple[dict[int, MaskFile], list[str]]:
    """The mask of each series that has one, and the mask files that name no series.

    RSNA's ``segmentations/`` wins over ``totalsegmentator/`` when a series has both (it is the
    dataset's own); within a folder ``.nii`` wins over ``.nii.gz``.

    Returns
    -------
    masks : dict of series_id -> MaskFile
    orphans : list of str
        Mask files or folders (relative to ``source``) whose name is not a series_id of ``series_ids``.
    """
    source = Path(source)
    wanted = {int(s) for s in series_ids}
    masks: dict[int, MaskFile] = {}
    orphans: list[str] = []
    for folder, src in ((SEGMENTATIONS_DIR, "rsna"), (TOTALSEGMENTATOR_DIR, "totalsegmentator")):
        root = source / folder
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir(), key=lambda q: (len(q.name), q.name)):
            if p.name.startswith("."):
                continue
            stem = p.name if (p.is_dir() and src == "totalsegmentator") else _strip_nifti(p.name)
            if stem is None or (p.is_dir() and src == "rsna"):
                continue
            name = p.relative_to(source).as_posix() + ("/" if p.is_dir() else "")
            if not stem.isdigit() or int(stem) not in wanted:
                orphans.append(name)
                continue
            if int(stem) not in masks:
                masks[int(stem)] = MaskFile(src, p, "classes" if p.is_dir() else "labels", name)
    return masks, orphans


def masks_digest(masks: dict[int, MaskFile]) -> str:
    """A digest of the mask files (names, sizes, modification times): changes when a mask does."""
    import hashlib

    digest = hashlib.sha256()
    for sid in sorted(masks):
        m = masks[sid]
        files = sorted(m.path.iterdir()) if m.path.is_dir() else [m.path]
        for f in files:
            st = f.stat()
            digest.update(f"{sid}|{m.source}|{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------ reading NIfTI
def _caret_label_names(header: object) -> dict[int, str] | None:
    """The label table TotalSegmentator writes into a --ml file's header extension (CaretExtension XML)."""
    for ext in getattr(header, "extensions", []):
        content = ext.get_content()
        if not isinstance(content, bytes) or b"LabelTable" not in content:
            continue
        text = content.decode("utf-8", "replace")
        names = {}
        for key, body in re.findall(r'<Label\s[^>]*?Key="(\d+)"[^>]*>(.*?)</Label>', text, flags=re.S):
            body = re.sub(r"^\s*<!\[CDATA\[(.*)\]\]>\s*$", r"\1", body, flags=re.S)
            names[int(key)] = body.strip()
        return names or None
    return None


def read_label_volume(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a NIfTI label volume (``.nii`` or ``.nii.gz``).

    Parameters
    ----------
    path : path-like

    Returns
    -------
    labels : ndarray of shape (I, J, K), integer dtype
        Voxel labels in the file's own voxel order (memory-mapped for an uncompressed ``.nii``).
    meta : dict
        ``affine`` : ndarray of shape (4, 4), voxel index (i, j, k, 1) -> RAS mm (nibabel's best
        affine: sform, else qform); ``label_names`` : dict of int -> str from a TotalSegmentator
        header extension, or None.

    Raises
    ------
    DataError
        Not a NIfTI file, not 3-D, non-integer labels or a singular affine.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise DataError(f"{path} is a {type(img).__name__}, expected a NIfTI label volume")
        data = np.asanyarray(img.dataobj)  # reads (and decompresses) here: a truncated file fails here
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and numpy raise several kinds for a bad file
        reason = " ".join(str(exc).replace(str(path), path.name).split())[:200]
        raise DataError(f"{path} cannot be read as NIfTI ({type(exc).__name__}: {reason})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path} holds an array of shape {data.shape}, expected a 3-D label volume")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.rint(data)):
            raise DataError(f"{path} holds non-integer values; a label volume holds one integer per organ")
        data = np.rint(data).astype(np.int32)
    elif data.dtype.kind not in "iub":
        raise DataError(f"{path} holds {data.dtype} values, expected integer labels")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(f"{path} has a singular affine; its voxels cannot be placed in patient space")
    return data, {"affine": affine, "label_names": _caret_label_names(img.header)}


def present_labels(labels: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """Sorted distinct values of a label volume, read in chunks (the volume may be a memory map)."""
    flat = labels.ravel(order="K")  # a view when the volume is contiguous in either order
    seen: set[int] = set()
    for at in range(0, flat.size, chunk):
        seen.update(np.unique(flat[at : at + chunk]).tolist())
    return np.array(sorted(seen), dtype=np.int64)


# ------------------------------------------------------------------ geometry (pure)
@dataclass(frozen=True)
class SliceGeometry:
    """Where one DICOM slice lies in the patient (LPS mm).

    ``position`` : ImagePositionPatient, centre of pixel (row 0, column 0); ``row_cosine`` : first
    half of ImageOrientationPatient, the direction of increasing column index; ``column_cosine`` :
    second half, the direction of increasing row index; ``spacing`` : PixelSpacing, (distance between
    rows, distance between columns); ``rows``, ``columns`` : image size.
    """

    position: tuple[float, float, float]
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    spacing: tuple[float, float]
    rows: int
    columns: int


def pixel_centres_lps(geometry: SliceGeometry, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Patient (LPS) coordinates of the centres of pixels ``rows`` x ``columns`` of a slice.

    DICOM PS3.3 C.7.6.2.1.1: ``P = position + column * spacing[1] * row_cosine + row * spacing[0] *
    column_cosine`` (indices may lie outside the image; the plane extends).

    Parameters
    ----------
    geometry : SliceGeometry
    rows : ndarray of shape (n_rows,)
    columns : ndarray of shape (n_columns,)

    Returns
    -------
    ndarray of shape (n_rows, n_columns, 3), dtype=float64
    """
    pos = np.asarray(geometry.position, dtype=np.float64)
    along_row = np.asarray(geometry.row_cosine, dtype=np.float64) * float(geometry.spacing[1])
    along_column = np.asarray(geometry.column_cosine, dtype=np.float64) * float(geometry.spacing[0])
    r = np.asarray(rows, dtype=np.float64)[:, None, None]
    c = np.asarray(columns, dtype=np.float64)[None, :, None]
    return pos + c * along_row + r * along_column


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def lps_to_voxel(points_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (i, j, k) of LPS points in a NIfTI volume with voxel->RAS ``affine``.

    Parameters
    ----------
    points_lps : ndarray of shape (..., 3)
    affine : ndarray of shape (4, 4)

    Returns
    -------
    ndarray of shape (..., 3), dtype=float64
    """
    ras = np.asarray(points_lps, dtype=np.float64) @ LPS_TO_RAS
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return ras @ inv[:3, :3].T + inv[:3, 3]


def sample_nearest(volume: np.ndarray, ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour labels of ``volume`` (I, J, K) at voxel positions ``ijk`` (..., 3).

    Returns
    -------
    labels : ndarray of shape (...,), volume's dtype; 0 outside the volume
    inside : ndarray of shape (...,), dtype=bool; whether the position fell inside the volume
    """
    idx = np.floor(np.asarray(ijk) + 0.5).astype(np.int64)
    shape = np.asarray(volume.shape[:3])
    inside = np.all((idx >= 0) & (idx < shape), axis=-1)
    out = np.zeros(idx.shape[:-1], dtype=volume.dtype)
    hit = idx[inside]
    out[inside] = volume[hit[:, 0], hit[:, 1], hit[:, 2]]
    return out, inside


def stored_source_index(start: int, side: int, size: int) -> np.ndarray:
    """Source pixel index (along one axis) that each of ``size`` stored pixels is read from, nearest.

    The stored slice is the square ``[start, start + side)`` of the source resized to ``size``; this is
    :func:`eval.explain.resize_mask`'s choice, so masks and truth land on the same stored pixels.
    """
    idx = np.minimum(((np.arange(size) + 0.5) * side / size).astype(np.int64), side - 1)
    return int(start) + idx


def map_volume_to_slices(
    volume: np.ndarray,
    affine: np.ndarray,
    geometries: Sequence[SliceGeometry],
    fields: Sequence[tuple[int, int, int]],
    size: int,
) -> tuple[np.ndarray, int]:
    """Raw labels of ``volume`` on each stored slice, through the geometry.

    Parameters
    ----------
    volume : ndarray of shape (I, J, K), integer
    affine : ndarray of shape (4, 4)
        Voxel -> RAS mm.
    geometries : sequence of SliceGeometry, length n
    fields : sequence of (top, left, side), length n
        The square of each source slice the store resampled (manifest ``field_*``).
    size : int
        Stored slice size.

    Returns
    -------
    labels : ndarray of shape (n, size, size), volume's dtype
        0 outside the volume and outside the source image (where the store reads air).
    n_inside : int
        Stored pixels inside both the source image and the volume (0: the mask misses the series).
    """
    out = np.zeros((len(geometries), size, size), dtype=volume.dtype)
    n_inside = 0
    for n, (geom, (top, left, side)) in enumerate(zip(geometries, fields, strict=True)):
        rows = stored_source_index(top, side, size)
        cols = stored_source_index(left, side, size)
        points = pixel_centres_lps(geom, rows, cols)
        labels, inside = sample_nearest(volume, lps_to_voxel(points, affine))
        on_image = ((rows >= 0) & (rows < geom.rows))[:, None] & ((cols >= 0) & (cols < geom.columns))[None, :]
        labels[~on_image] = 0
        n_inside += int((inside & on_image).sum())
        out[n] = labels
    return out, n_inside


def translate_labels(raw: np.ndarray, codes: dict[int, int]) -> np.ndarray:
    """Raw label values -> store codes (uint8); values not in ``codes`` (or mapped to 0) become 0."""
    out = np.zeros(raw.shape, dtype=np.uint8)
    for value, code in codes.items():
        if code:
            out[raw == value] = code
    return out


# ------------------------------------------------------------------ DICOM side
def read_slice_geometry(files: Sequence[Path]) -> list[dict]:
    """Header geometry of each readable file: ``instance``, ``z`` (as :mod:`toolkit.data.dicom` orders
    slices) and ``geometry`` (SliceGeometry, or None without position/orientation/spacing)."""
    from toolkit.data.dicom import _ORIENTATION, _dcmread, _fixed, _geometry

    infos = []
    for path in files:
        try:
            ds, _ = _dcmread(Path(path), pixels=False)
            info = _geometry(ds, Path(path))
            info["orientation"] = _fixed(ds, _ORIENTATION, 6)
        except Exception:  # noqa: BLE001 - load_series already reported unreadable files
            continue
        infos.append(info)
    normals = [i["normal"] for i in infos if i["normal"] is not None]
    out = []
    for info in infos:
        geom = None
        spacing = info["spacing"]
        if info["position"] is not None and info["orientation"] is not None and np.all(np.isfinite(spacing)):
            o = info["orientation"]
            geom = SliceGeometry(
                tuple(info["position"]),
                tuple(o[:3]),
                tuple(o[3:]),
                (float(spacing[0]), float(spacing[1])),
                int(info["rows"]),
                int(info["columns"]),
            )
        # z as load_series computes it: the position on the series' first slice normal.
        z = float(np.dot(info["position"], normals[0])) if normals and info["position"] is not None else np.nan
        out.append({"instance": int(info["instance"]), "z": z, "geometry": geom})
    return out


def match_geometry(table: pd.DataFrame, headers: list[dict]) -> list[SliceGeometry | None]:
    """The header geometry of each stored slice (``table`` rows: ``instance``, ``z``): same instance,
    nearest z."""
    by_instance: dict[int, list[dict]] = {}
    for h in headers:
        by_instance.setdefault(h["instance"], []).append(h)
    out: list[SliceGeometry | None] = []
    for inst, z in zip(table["instance"], table["z"], strict=True):
        cands = by_instance.get(int(inst), [])
        if not cands:
            out.append(None)
            continue
        best = min(cands, key=lambda h: abs(h["z"] - z) if np.isfinite(h["z"]) else np.inf)
        out.append(best["geometry"])
    return out


def _stored_geometry(files: Sequence[Path], table: pd.DataFrame) -> list[SliceGeometry | None]:
    """Geometry of each stored slice: first from the files named ``<instance>.dcm`` (RSNA's naming, so
    only the stored slices' headers are read), else from every file of the series."""
    by_name = {Path(f).name: Path(f) for f in files}
    guess = [by_name.get(f"{int(i)}.dcm") for i in table["instance"]]
    if all(g is not None for g in guess):
        headers = read_slice_geometry(guess)
        if len(headers) == len(table) and all(
            h["instance"] == int(i) and abs(h["z"] - z) < 1e-2
            for h, i, z in zip(headers, table["instance"], table["z"], strict=True)
        ):
            return [h["geometry"] for h in headers]
    return match_geometry(table, read_slice_geometry(files))


# ------------------------------------------------------------------ one series
def _label_codes(mask: MaskFile, meta: dict) -> tuple[dict[int, int], set[int], str]:
    """(raw value -> store code, known raw values, how the expected labels read in a warning)."""
    if mask.source == "rsna":
        codes = {v: STORE_LABELS[name] for v, name in RSNA_LABELS.items()}
        expected = "RSNA's " + ", ".join(f"{v} {n.replace('_', ' ')}" for v, n in RSNA_LABELS.items())
        return codes, set(codes), expected
    names = meta.get("label_names")
    if names:
        expected = "the label table in its header"
    else:
        names = TOTALSEGMENTATOR_TOTAL
        expected = f"TotalSegmentator's task 'total', 1..{TOTALSEGMENTATOR_N_CLASSES}"
    codes = {
        int(v): STORE_LABELS[TOTALSEGMENTATOR_TO_STORE[n]] if n in TOTALSEGMENTATOR_TO_STORE else 0
        for v, n in names.items()
    }
    known = set(codes) if meta.get("label_names") else set(range(1, TOTALSEGMENTATOR_N_CLASSES + 1))
    return codes, known, expected


def _class_files(folder: Path) -> list[tuple[Path, int]]:
    """The per-class files of a TotalSegmentator folder that the store uses, bowel parts first."""
    found = []
    order = sorted(TOTALSEGMENTATOR_TO_STORE, key=lambda n: TOTALSEGMENTATOR_TO_STORE[n] != "bowel")
    for name in order:
        for suffix in NIFTI_SUFFIXES:
            path = folder / f"{name}{suffix}"
            if path.is_file():
                found.append((path, STORE_LABELS[TOTALSEGMENTATOR_TO_STORE[name]]))
                break
    return found


def series_masks(
    mask: MaskFile, files: Sequence[Path], table: pd.DataFrame, size: int, series: str
) -> tuple[np.ndarray | None, list[str]]:
    """Store-coded masks of one series' stored slices, and one-line warnings.

    Parameters
    ----------
    mask : MaskFile
    files : sequence of Path
        The series' DICOM files (headers are read again for the geometry).
    table : DataFrame of n rows
        :func:`toolkit.data.dicom.load_series`'s table: ``instance``, ``z``, ``field_top``,
        ``field_left``, ``field_side`` of each stored slice.
    size : int
        Stored slice size.
    series : str
        How warnings name the series (e.g. ``train_images/<patient>/<series>``).

    Returns
    -------
    masks : ndarray of shape (n, size, size), dtype=uint8, or None
        None when the mask cannot be used (then a warning says why).
    warnings : list of str
    """
    kept = "the series is kept without a mask"
    geometries = _stored_geometry(files, table)
    if any(g is None for g in geometries):
        return None, [
            f"{mask.name}: slices of {series} lack ImagePositionPatient, ImageOrientationPatient or "
            f"PixelSpacing, so the mask cannot be placed on them; {kept}"
        ]
    fields = [tuple(int(v) for v in row) for row in table[["field_top", "field_left", "field_side"]].to_numpy()]
    warnings: list[str] = []
    if mask.kind == "classes":
        parts = _class_files(mask.path)
        if not parts:
            names = ", ".join(f"{n}.nii.gz" for n in TOTALSEGMENTATOR_TO_STORE)
            return None, [f"{mask.name}: holds none of {names}; {kept}"]
        out = np.zeros((len(table), size, size), dtype=np.uint8)
        n_inside, n_read = 0, 0
        for path, code in parts:
            try:
                volume, meta = read_label_volume(path)
            except DataError as exc:
                warnings.append(f"{mask.name}{path.name}: {_without_path(exc, path)}; that class is left out")
                continue
            raw, inside = map_volume_to_slices(volume, meta["affine"], geometries, fields, size)
            n_inside += inside
            n_read += 1
            out[raw > 0] = code
        if n_read == 0:
            return None, [*warnings, f"{mask.name}: no class file could be read; {kept}"]
    else:
        try:
            volume, meta = read_label_volume(mask.path)
        except DataError as exc:
            return None, [f"{mask.name}: {_without_path(exc, mask.path)}; {kept}"]
        codes, known, expected = _label_codes(mask, meta)
        unknown = sorted(set(present_labels(volume).tolist()) - known - {0})
        if unknown:
            values = ", ".join(str(v) for v in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
            warnings.append(
                f"{mask.name}: unknown label value(s) {values} (expected {expected}); "
                "those voxels are read as background, the known labels are kept"
            )
        raw, n_inside = map_volume_to_slices(volume, meta["affine"], geometries, fields, size)
        out = translate_labels(raw, codes)
    if n_inside == 0:
        return None, [
            *warnings,
            f"{mask.name}: its volume does not overlap the slices of {series} (no stored pixel falls inside "
            f"it; check that the file belongs to this series and that its affine is right); {kept}",
        ]
    return out, warnings


def _without_path(exc: Exception, path: Path) -> str:
    return str(exc).replace(str(path), "").strip() or type(exc).__name__


# ------------------------------------------------------------------ store side
def load_masks(store_dir: str | Path, mmap: bool = True) -> np.ndarray:
    """The store's organ masks, aligned row by row with ``images.npy``.

    Parameters
    ----------
    store_dir : path-like
        A store written by ``toolkit prepare``.
    mmap : bool, default=True
        Memory-map the file (read-only).

    Returns
    -------
    ndarray of shape (n_slices, H, W), dtype=uint8
        :data:`STORE_LABELS` codes; all 0 on slices of series without a mask (``mask_source`` empty).

    Raises
    ------
    DataError
        The store has no ``masks.npy`` (written before masks existed) or it does not match the images.
    """
    store_dir = Path(store_dir)
    path = store_dir / MASKS_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; re-run `toolkit prepare --force` to add organ masks to the store")
    masks = np.load(path, mmap_mode="r" if mmap else None)
    images = np.load(store_dir / "images.npy", mmap_mode="r")
    if masks.dtype != np.uint8 or masks.shape != images.shape:
        raise DataError(
            f"{path} holds {masks.dtype} {masks.shape}, expected uint8 {images.shape} like images.npy; "
            "re-run `toolkit prepare --force`"
        )
    return masks


def has_mask(table: pd.DataFrame) -> np.ndarray:
    """Rows whose series has a mask in the store, shape (n_slices,), dtype=bool (``mask_source`` set;
    an empty value reads back from CSV as NaN)."""
    if "mask_source" not in table.columns:
        return np.zeros(len(table), dtype=bool)
    return table["mask_source"].fillna("").astype(str).isin(MASK_SOURCES).to_numpy()
