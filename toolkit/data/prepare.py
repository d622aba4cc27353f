"""RSNA-layout folder -> de-identified slice store (``toolkit prepare``).

Input (RSNA 2023 Abdominal Trauma Detection layout)::

    train.csv                 patient_id + one-hot organ labels (required)
    train_series_meta.csv     patient_id, series_id, aortic_hu, incomplete_organ (optional: without it
                              series are taken from the folders, with a warning, and the two
                              measurements are left empty)
    image_level_labels.csv    patient_id, series_id, instance_number, injury_name (optional)
    train_images/<patient_id>/<series_id>/<instance_number>.dcm
    segmentations/<series_id>.nii[.gz]     organ masks (optional; RSNA labels, :mod:`toolkit.data.masks`)
    totalsegmentator/<series_id>[.nii.gz|/]  TotalSegmentator output (optional)

Output (``out``)::

    images.npy, manifest.csv, meta.json   the slice set (:mod:`toolkit.sliceset`)
    masks.npy                 uint8 organ masks aligned with images.npy (0 where a series has none)
    split.csv                 patient_id, split, fold (:mod:`toolkit.data.split`)
    errors.csv                path (relative to the source), reason: every skipped file or series
    config.yaml               the resolved config

Slice labels follow :mod:`toolkit.data.labels`. Nothing read from DICOM tags except pixel data and
geometry reaches the output; patients are named only by the CSV's pseudonymous ``patient_id``.

Series are read by a process pool; each finished series (with its organ masks) is kept in
``out/.partial/<series_id>.npz`` so an interrupted run resumes where it stopped. The store is written
once every series is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from toolkit import ORGANS, __version__
from toolkit.config import Config, check_section, save_config
from toolkit.data import masks as organ_masks
from toolkit.data.dicom import load_series, series_files
from toolkit.data.labels import (
    IMAGE_LABELS_CSV,
    SERIES_META_CSV,
    TRAIN_CSV,
    read_image_labels,
    read_patient_grades,
    read_series_meta,
    slice_labels,
    unmatched_image_labels,
)
from toolkit.data.split import split_hash, split_patients
from toolkit.errors import ToolkitError
from toolkit.reporting import Reporter, as_reporter
from toolkit.sliceset import (
    FIELD_COLUMNS,
    IMAGES_FILE,
    MANIFEST_FILE,
    META_FILE,
    SliceSet,
    image_level_columns,
    organ_columns,
)

IMAGES_DIR = "train_images"
PARTIAL_DIR = ".partial"
ERRORS_FILE = "errors.csv"
SPLIT_FILE = "split.csv"
CONFIG_FILE = "config.yaml"
STORE_FILES = (IMAGES_FILE, MANIFEST_FILE, META_FILE, ERRORS_FILE, SPLIT_FILE, CONFIG_FILE, organ_masks.MASKS_FILE)

SLICE_LABEL_RULE = (
    "bowel/extravasation: 1 on instances listed in image_level_labels.csv where the series has such rows, "
    "else the patient grade; kidney/liver/spleen: the patient grade (at least 1) on instances listed as "
    "Kidney/Liver/Spleen where the series has rows for that organ, 0 on its other slices, else the patient grade"
)


def _first(ids: Iterable[object], k: int = 5) -> str:
    ids = list(ids)
    more = f", ... ({len(ids) - k} more)" if len(ids) > k else ""
    return ", ".join(str(i) for i in ids[:k]) + more


# ------------------------------------------------------------------- inputs
@dataclass
class _Series:
    patient_id: int
    series_id: int
    folder: Path
    files: list[Path]


@dataclass
class _Inputs:
    grades: pd.DataFrame  # one row per kept patient
    meta: pd.DataFrame  # one row per kept series
    image_labels: pd.DataFrame | None
    series: list[_Series]
    checksum: str
    files_digest: str
    n_files: int
    dropped: dict[str, int] = field(default_factory=dict)


def _int_dirs(folder: Path, what: str, reporter: Reporter) -> dict[int, Path]:
    dirs, odd = {}, []
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if p.name.isdigit():
            dirs[int(p.name)] = p
        else:
            odd.append(p.name)
    if odd:
        reporter.warn(f"{folder}: ignored {len(odd)} folder(s) not named by an integer {what}: {_first(odd)}")
    return dirs


def _read_inputs(source: Path, reporter: Reporter) -> _Inputs:
    if not source.is_dir():
        raise ToolkitError(
            f"source folder {source} does not exist; run `toolkit demo-data` or pass --source <RSNA folder>"
        )
    if not any(source.iterdir()):
        raise ToolkitError(
            f"source folder {source} is empty; copy the RSNA 2023 data there or run `toolkit demo-data`"
        )
    train_csv = source / TRAIN_CSV
    if not train_csv.is_file():
        raise ToolkitError(
            f"{train_csv} not found; the source must hold train.csv, train_series_meta.csv and "
            f"{IMAGES_DIR}/<patient_id>/<series_id>/<n>.dcm (RSNA 2023 layout)"
        )
    images_dir = source / IMAGES_DIR
    if not images_dir.is_dir():
        raise ToolkitError(
            f"{images_dir} not found; put the DICOM files in {IMAGES_DIR}/<patient_id>/<series_id>/"
        )
    grades = read_patient_grades(train_csv)

    # Every series folder on disk, with its files (also the source checksum's file list).
    on_disk: dict[tuple[int, int], _Series] = {}
    for pid, pdir in _int_dirs(images_dir, "patient_id", reporter).items():
        for sid, sdir in _int_dirs(pdir, "series_id", reporter).items():
            on_disk[(pid, sid)] = _Series(pid, sid, sdir, series_files(sdir))
    rel = sorted(f.relative_to(source).as_posix() for s in on_disk.values() for f in s.files)
    files_digest = hashlib.sha256("\n".join(rel).encode()).hexdigest()
    digest = hashlib.sha256()
    for name in (TRAIN_CSV, SERIES_META_CSV, IMAGE_LABELS_CSV):
        path = source / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<absent>") + b"\0")
    digest.update(files_digest.encode())

    meta_csv = source / SERIES_META_CSV
    dropped: dict[str, int] = {}
    if meta_csv.is_file():
        meta = read_series_meta(meta_csv)
        listed = set(zip(meta["patient_id"], meta["series_id"], strict=True))
        unlisted = sorted(set(on_disk) - listed)
        if unlisted:
            reporter.warn(
                f"{len(unlisted)} series folder(s) are not in {SERIES_META_CSV} and are ignored: "
                f"{_first(f'{IMAGES_DIR}/{p}/{s}' for p, s in unlisted)}"
            )
        absent = sorted(listed - set(on_disk))
        if absent:
            reporter.warn(
                f"{len(absent)} series in {SERIES_META_CSV} have no folder under {IMAGES_DIR}/ and are "
                f"left out: {_first(f'{p}/{s}' for p, s in absent)}"
            )
        dropped["series_without_images"] = len(absent)
        keys = sorted(listed & set(on_disk))
    else:
        reporter.warn(
            f"{meta_csv} not found; taking series from the {IMAGES_DIR}/<patient_id>/<series_id>/ folders "
            "and leaving aortic_hu and incomplete_organ empty"
        )
        keys = sorted(on_disk)
        meta = pd.DataFrame(
            {
                "patient_id": [k[0] for k in keys],
                "series_id": [k[1] for k in keys],
                "aortic_hu": np.nan,
                "incomplete_organ": np.nan,
            }
        )

    labelled = set(grades["patient_id"])
    with_images = {p for p, _ in keys}
    no_images = sorted(labelled - with_images)
    if no_images:
        reporter.warn(
            f"{len(no_images)} patient(s) in {TRAIN_CSV} have no series under {IMAGES_DIR}/ and are "
            f"left out: patient_id {_first(no_images)}"
        )
    no_labels = sorted(with_images - labelled)
    if no_labels:
        reporter.warn(
            f"{len(no_labels)} patient(s) have images but no row in {TRAIN_CSV} and are left out: "
            f"patient_id {_first(no_labels)}"
        )
    dropped["patients_without_images"] = len(no_images)
    dropped["patients_without_labels"] = len(no_labels)
    keys = [k for k in keys if k[0] in labelled]
    if not keys:
        raise ToolkitError(
            f"no patient has both a row in {train_csv} and a series under {images_dir}; "
            "check that the folder names are the CSV's patient_id/series_id"
        )
    keep = pd.DataFrame(keys, columns=["patient_id", "series_id"])
    meta = keep.merge(meta, on=["patient_id", "series_id"], how="left")
    grades = grades[grades["patient_id"].isin(keep["patient_id"])].reset_index(drop=True)

    image_labels = None
    labels_csv = source / IMAGE_LABELS_CSV
    if labels_csv.is_file():
        image_labels, unknown = read_image_labels(labels_csv)
        if unknown:
            reporter.warn(f"{labels_csv}: ignored rows with unknown injury_name {_first(unknown)}")
    return _Inputs(
        grades=grades,
        meta=meta,
        image_labels=image_labels,
        series=[on_disk[k] for k in keys],
        checksum=digest.hexdigest(),
        files_digest=files_digest,
        n_files=len(rel),
        dropped=dropped,
    )


# ------------------------------------------------------------------ workers
def _init_worker() -> None:
    # One intra-op thread per process: the pool already uses every core.
    import torch

    torch.set_num_threads(1)


def _ingest_series(task: dict) -> dict:
    """Read one series and keep it as ``task["partial"]`` (npz); module-level so it pickles under spawn."""
    source = Path(task["source"])
    result = load_series(
        task["folder"],
        size=task["size"],
        slices=task["slices"],
        files=[Path(f) for f in task["files"]],
        label=task["label"],
        crop_body=task["crop_body"],
    )
    errors = [(p.relative_to(source).as_posix(), why) for p, why in result.errors]
    masks, mask_warnings = None, []
    if task["mask"] is not None and len(result.images):
        mask = organ_masks.MaskFile(**{**task["mask"], "path": Path(task["mask"]["path"])})
        masks, mask_warnings = organ_masks.series_masks(
            mask, [Path(f) for f in task["files"]], result.table, result.images.shape[-1], task["label"]
        )
    if not task["files"]:
        errors.append((task["label"], "series folder holds no file; series skipped"))
    elif len(result.images) == 0:
        errors.append((task["label"], "no readable DICOM image in the series; series skipped"))
    final = Path(task["partial"])
    tmp = final.with_name(final.stem + ".tmp.npz")
    np.savez(
        tmp,
        images=result.images,
        instance=result.table["instance"].to_numpy(np.int64),
        z=result.table["z"].to_numpy(np.float64),
        spacing=result.table[["spacing_row", "spacing_col"]].to_numpy(np.float64),
        field=result.table[list(FIELD_COLUMNS)].to_numpy(np.int64),
        error_path=np.array([e[0] for e in errors], dtype=str),
        error_reason=np.array([e[1] for e in errors], dtype=str),
        warnings=np.array(result.warnings, dtype=str),
        mask_source=np.array(task["mask"]["source"] if masks is not None else "", dtype=str),
        mask_warnings=np.array(mask_warnings, dtype=str),
        **({"masks": masks} if masks is not None else {}),
        all_instances=np.array(result.instances, dtype=np.int64),
    )
    # Rename last so a partial file is either complete or absent.
    os.replace(tmp, final)
    return {"label": task["label"], "n": int(len(result.images))}


PARTIAL_FORMAT = 2  # 2: partials list every readable instance (all_instances)


def _partial_settings(size: int, slices: int, crop_body: bool, files_digest: str) -> dict:
    return {
        "format": PARTIAL_FORMAT,
        "size": int(size),
        "slices_per_series": int(slices),
        "crop_body": bool(crop_body),
        "files": files_digest,
    }


def _prepare_partial(partial: Path, settings: dict, reporter: Reporter) -> None:
    """Create ``.partial``; drop finished series of a run with other settings (they would not match)."""
    partial.mkdir(parents=True, exist_ok=True)
    settings_file = partial / "settings.json"
    if settings_file.exists():
        try:
            old = json.loads(settings_file.read_text())
        except json.JSONDecodeError:
            old = None
        if old != settings:
            stale = list(partial.glob("*.npz"))
            if stale:
                reporter.warn(f"discarding {len(stale)} series read by an earlier run with other settings")
            for p in stale:
                p.unlink()
    settings_file.write_text(json.dumps(settings))


def _run_tasks(tasks: list[dict], workers: int, n_done: int, n_total: int, reporter: Reporter) -> None:
    workers = max(1, min(workers, len(tasks)))
    pool = None
    futures: dict = {}
    if tasks and workers > 1:
        # Workers resize with torch: import it once here so fork-started workers inherit it.
        import torch  # noqa: F401

        # Submit before the progress bar starts its refresh thread: a fork-started pool forks here.
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker)
        futures = {pool.submit(_ingest_series, t): t["label"] for t in tasks}
    label = ""
    try:
        with reporter.progress() as progress:
            bar = progress.add_task("reading series", total=n_total, completed=n_done)
            if pool is None:
                for t in tasks:
                    label = t["label"]
                    _ingest_series(t)
                    progress.advance(bar)
            else:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        label = futures[fut]
                        fut.result()  # re-raises a worker's exception
                        progress.advance(bar)
    except Exception as exc:
        raise RuntimeError(
            f"reading {label} failed; finished series are kept and a re-run of prepare resumes"
        ) from exc
    finally:
        if pool is not None:
            # On failure: drop queued series, let running ones finish (their partials are kept).
            pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------- assembly
def _load_partial(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k not in ("images", "masks")}


def _clear_outputs(out: Path) -> None:
    for name in (*STORE_FILES, IMAGES_FILE + ".tmp.npy", organ_masks.MASKS_FILE + ".tmp.npy", MANIFEST_FILE + ".tmp"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)


def _write_store(out: Path, parts: list[Path], n: int, size: int, table: pd.DataFrame, meta: dict) -> None:
    """Write the slice set files in :meth:`SliceSet.save`'s format, streaming images from the partials.

    The images are copied series by series into a memory map, so the peak memory is one series,
    not the whole store (a full RSNA store at 256 px is tens of GB).
    """
    tmp = out / (IMAGES_FILE + ".tmp.npy")
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(n, size, size))
    at = 0
    for path in parts:
        with np.load(path, allow_pickle=False) as f:
            block = f["images"]
        images[at : at + len(block)] = block
        at += len(block)
    images.flush()
    del images
    tmp.replace(out / IMAGES_FILE)
    table.to_csv(out / (MANIFEST_FILE + ".tmp"), index=False)
    meta = {**meta, "n_slices": int(n), "size": [int(size), int(size)]}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    (out / (MANIFEST_FILE + ".tmp")).replace(out / MANIFEST_FILE)


def _write_masks(out: Path, parts: list[Path], n: int, size: int) -> None:
    """Write ``masks.npy`` (uint8, aligned with images.npy) from the partials, one series at a time.

    Series without a mask are left as the memory map's zeros, which most file systems store sparsely.
    """
    tmp = out / (organ_masks.MASKS_FILE + ".tmp.npy")
    masks = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size))
    at = 0
    for path in parts:
        with np.load(path, allow_pickle=False) as f:
            k = len(f["instance"])
            if "masks" in f.files:
                masks[at : at + k] = f["masks"]
        at += k
    masks.flush()
    del masks
    tmp.replace(out / organ_masks.MASKS_FILE)


def _spacing_summary(spacing: np.ndarray, field_side: np.ndarray, size: int) -> dict:
    """Source and stored pixel spacing (mm): a stored pixel spans ``field_side / size`` source pixels."""
    ok = np.isfinite(spacing).all(axis=1)
    if not ok.any():
        return {"source_median_row_col": None, "stored_median_row_col": None}
    stored = spacing[ok] * (field_side[ok, None] / float(size))
    return {
        "source_median_row_col": [round(float(v), 4) for v in np.median(spacing[ok], axis=0)],
        "stored_median_row_col": [round(float(v), 4) for v in np.median(stored, axis=0)],
        "stored_min": round(float(stored.min()), 4),
        "stored_max": round(float(stored.max()), 4),
    }


def prepare_store(
    source: Path, out: Path, cfg: Config, force: bool = False, reporter: Reporter | None = None
) -> SliceSet:
    """Read an RSNA-layout folder into a slice store with a patient-level split.

    Parameters
    ----------
    source : Path
        RSNA 2023 layout folder (see the module docstring).
    out : Path
        Store folder. Finished series of an interrupted run in ``out/.partial`` are reused.
    cfg : Config
        Uses ``cfg.data`` (size, slices_per_series, test_fraction, folds, workers, windows) and ``cfg.seed``.
    force : bool, default=False
        Rebuild from scratch when ``out`` already holds a store.
    reporter : Reporter, optional
        Receives warnings about the input and the progress of reading series (default: :mod:`logging`,
        no bar); the CLI passes :class:`toolkit.cli_common.ConsoleReporter`.

    Returns
    -------
    SliceSet
        The store as written (images memory-mapped from ``out/images.npy``).

    Raises
    ------
    ToolkitError
        Bad input (missing folder/CSV/column, no usable patient), an existing store without ``force``,
        or too few patients for the folds.
    """
    source, out = Path(source), Path(out)
    reporter = as_reporter(reporter)
    cfg = replace(cfg, data=check_section(cfg.data, "data"))  # load_config's rules, for a Config built in code
    data = cfg.data
    if (out / MANIFEST_FILE).exists() and not force:
        raise ToolkitError(f"{out} already holds a slice store; pass --force to rebuild it")
    inputs = _read_inputs(source, reporter)
    if force:
        _clear_outputs(out)
    partial = out / PARTIAL_DIR
    masks, orphans = organ_masks.find_masks(source, [s.series_id for s in inputs.series])
    if orphans:
        reporter.warn(f"{len(orphans)} mask file(s) name no series of the input and are ignored: {_first(orphans)}")
    settings = _partial_settings(data.size, data.slices_per_series, data.crop_body, inputs.files_digest)
    _prepare_partial(partial, {**settings, "masks": organ_masks.masks_digest(masks)}, reporter)

    tasks = [
        {
            "source": str(source),
            "folder": str(s.folder),
            "files": [str(f) for f in s.files],
            "label": f"{IMAGES_DIR}/{s.patient_id}/{s.series_id}",
            "size": int(data.size),
            "slices": int(data.slices_per_series),
            "crop_body": bool(data.crop_body),
            "partial": str(partial / f"{s.series_id}.npz"),
            "mask": (
                {**asdict(masks[s.series_id]), "path": str(masks[s.series_id].path)}
                if s.series_id in masks
                else None
            ),
        }
        for s in inputs.series
    ]
    todo = [t for t in tasks if not Path(t["partial"]).exists()]
    if len(todo) < len(tasks):
        done = len(tasks) - len(todo)
        reporter.info(f"resuming: {done} of {len(tasks)} series already read ({partial})")
    workers = int(data.workers) or os.cpu_count() or 1
    _run_tasks(todo, workers, len(tasks) - len(todo), len(tasks), reporter)
    store = _assemble(source, out, cfg, inputs, [Path(t["partial"]) for t in tasks], reporter)
    shutil.rmtree(partial, ignore_errors=True)
    return store


def _assemble(
    source: Path, out: Path, cfg: Config, inputs: _Inputs, parts: list[Path], reporter: Reporter
) -> SliceSet:
    data = cfg.data
    tables, errors, notes, spacing, kept_parts = [], [], [], [], []
    instances: dict[int, set[int]] = {}
    mask_warnings: list[str] = []
    for s, path in zip(inputs.series, parts, strict=True):
        p = _load_partial(path)
        errors += list(zip(p["error_path"].tolist(), p["error_reason"].tolist(), strict=True))
        notes += p["warnings"].tolist()
        mask_warnings += p["mask_warnings"].tolist()
        instances[s.series_id] = set(p["all_instances"].tolist())
        if len(p["instance"]) == 0:
            continue
        kept_parts.append(path)
        top, left, side = p["field"].T
        tables.append(
            pd.DataFrame(
                {
                    "patient_id": s.patient_id,
                    "series_id": s.series_id,
                    "instance": p["instance"],
                    "z": p["z"],
                    "field_top": top,
                    "field_left": left,
                    "field_side": side,
                    "mask_source": str(p["mask_source"]),
                }
            )
        )
        spacing.append(p["spacing"])
    _report_mask_warnings(mask_warnings, reporter)
    for note in notes[:5]:
        reporter.warn(note)
    if len(notes) > 5:
        reporter.warn(f"... and {len(notes) - 5} more series with the same kind of ordering fallback")

    out.mkdir(parents=True, exist_ok=True)
    errors_df = pd.DataFrame(errors, columns=["path", "reason"])
    errors_df.to_csv(out / ERRORS_FILE, index=False)
    n_skipped_series = int(errors_df["reason"].str.endswith("series skipped").sum())
    n_skipped = len(errors_df) - n_skipped_series
    if errors:
        reporter.warn(
            f"skipped {n_skipped} unreadable file(s) and {n_skipped_series} series without a readable image; "
            f"see {out / ERRORS_FILE}"
        )
    if not tables:
        raise ToolkitError(
            f"no readable DICOM slice in {len(parts)} series under {source / IMAGES_DIR}; "
            f"see {out / ERRORS_FILE}"
        )

    slices = pd.concat(tables, ignore_index=True)
    grades = inputs.grades[inputs.grades["patient_id"].isin(slices["patient_id"])].reset_index(drop=True)
    lost = len(inputs.grades) - len(grades)
    if lost:
        reporter.warn(f"{lost} patient(s) have no readable slice and are left out")
    unmatched = 0
    if inputs.image_labels is not None:
        rows = unmatched_image_labels(inputs.image_labels, instances)
        unmatched = len(rows)
        if unmatched:
            first = rows.iloc[0]
            reporter.warn(
                f"{source / IMAGE_LABELS_CSV}: {unmatched} row(s) name an instance_number that no readable "
                f"file of their series has, so they label no slice; first: patient_id {first['patient_id']}, "
                f"series_id {first['series_id']}, instance_number {first['instance_number']} "
                f"(a slice missing from the export, or unreadable: see {out / ERRORS_FILE})"
            )
    split = split_patients(grades, data.test_fraction, data.folds, cfg.seed)
    labels = slice_labels(slices, grades, inputs.image_labels)
    table = pd.concat([slices, labels], axis=1).merge(split, on="patient_id", how="left")
    table["source"] = "real"
    table = table.merge(inputs.meta, on=["patient_id", "series_id"], how="left")
    columns = ["patient_id", "series_id", "instance", "z", *organ_columns(), "split", "fold", "source"]
    table = table[columns + ["aortic_hu", "incomplete_organ", *FIELD_COLUMNS, "mask_source", *image_level_columns()]]
    split.to_csv(out / SPLIT_FILE, index=False)

    meta = {
        "kind": "real",
        "toolkit_version": __version__,
        "source_checksum": inputs.checksum,
        "n_source_files": inputs.n_files,
        "n_patients": int(split.shape[0]),
        "n_series": len(tables),
        "slices_per_series": int(data.slices_per_series),
        "crop_body": bool(data.crop_body),
        "spacing_mm": _spacing_summary(np.concatenate(spacing), slices["field_side"].to_numpy(), int(data.size)),
        "split_hash": split_hash(split),
        "seed": int(cfg.seed),
        "test_fraction": float(data.test_fraction),
        "folds": int(data.folds),
        "windows": [list(map(float, w)) for w in data.windows],
        "slice_labels": SLICE_LABEL_RULE,
        "image_level_labels": inputs.image_labels is not None,
        "n_skipped": int(n_skipped),
        "n_skipped_series": n_skipped_series,
        "dropped": {
            **inputs.dropped,
            "patients_without_readable_slices": int(lost),
            "image_label_rows_without_slice": int(unmatched),
        },
        "masks": _masks_summary(table, mask_warnings),
        "config": {"seed": int(cfg.seed), "data": asdict(data)},
    }
    _write_masks(out, kept_parts, len(table), int(data.size))  # before the manifest, which marks a finished store
    _write_store(out, kept_parts, len(table), int(data.size), table, meta)
    save_config(cfg, out / CONFIG_FILE)
    return SliceSet.load(out)


_MAX_MASK_WARNINGS = 20


def _report_mask_warnings(warnings: list[str], reporter: Reporter | None) -> None:
    reporter = as_reporter(reporter)
    for message in warnings[:_MAX_MASK_WARNINGS]:
        reporter.warn(message)
    if len(warnings) > _MAX_MASK_WARNINGS:
        reporter.warn(
            f"... and {len(warnings) - _MAX_MASK_WARNINGS} more mask warning(s), listed in meta.json (masks.warnings)"
        )


def _masks_summary(table: pd.DataFrame, warnings: list[str]) -> dict:
    series = table.drop_duplicates("series_id")["mask_source"]
    return {
        "file": organ_masks.MASKS_FILE,
        "labels": dict(organ_masks.STORE_LABELS),
        "series": {src: int((series == src).sum()) for src in organ_masks.MASK_SOURCES},
        "warnings": list(warnings),
    }


# ------------------------------------------------------------------ summary
def summarize_store(store: SliceSet) -> str:
    """A multi-line human summary: slices, patients, positives per organ and split, folds, skipped files."""
    t = store.table
    meta = store.meta
    h, w = store.size
    lines = [
        f"slice store: {len(t):,} slices of {h}x{w} px (int16 HU) from {t['patient_id'].nunique()} patients, "
        f"{t['series_id'].nunique()} series",
    ]
    n_skipped = int(meta.get("n_skipped", 0))
    n_series = int(meta.get("n_skipped_series", 0))
    lines.append(
        f"skipped: {n_skipped} unreadable file(s), {n_series} series without a readable image"
        + (" (listed in errors.csv)" if n_skipped or n_series else "")
    )
    masks = meta.get("masks")
    if masks:
        n_masked = sum(masks["series"].values())
        sources = ", ".join(f"{k} {v}" for k, v in masks["series"].items() if v)
        lines.append(
            f"organ masks: {n_masked} of {t['series_id'].nunique()} series" + (f" ({sources})" if sources else "")
        )
    by_split = {s: t[t["split"] == s] for s in ("train", "test")}
    folds = sorted(int(f) for f in by_split["train"]["fold"].unique())
    test, train = by_split["test"], by_split["train"]
    lines.append(
        f"test:  {test['patient_id'].nunique()} patients, {len(test):,} slices "
        f"(split {meta.get('split_hash', '?')})"
    )
    lines.append(f"train: {train['patient_id'].nunique()} patients, {len(train):,} slices in {len(folds)} folds")
    lines.append("injured patients / positive slices:")
    lines.append(f"  {'organ':<14}{'train':>14}{'test':>14}")
    for organ in ORGANS:
        cells = []
        for part in by_split.values():
            pts = part.loc[part[f"{organ}_patient"] > 0, "patient_id"].nunique()
            cells.append(f"{pts} / {int((part[organ] > 0).sum())}")
        lines.append(f"  {organ:<14}{cells[0]:>14}{cells[1]:>14}")
    patient_cols = [f"{o}_patient" for o in ORGANS]
    for k in folds:
        part = train[train["fold"] == k]
        injured = part.loc[(part[patient_cols] > 0).any(axis=1), "patient_id"].nunique()
        n_pts = part["patient_id"].nunique()
        lines.append(f"  fold {k}: {n_pts} patients ({injured} injured), {len(part):,} slices")
    return "\n".join(lines)
