"""``toolkit segment``: train the organ localizer on annotated training series, label every slice.

Steps, in order:

1. Validate the store (``masks.npy`` and ``mask_source`` from ``toolkit prepare``) and the config.
2. Split the annotated series by patient (:func:`seg.data.split_annotated`): *fit* (training
   patients), *holdout* (training patients kept out) and *test* (test-split patients; their
   masks are never trained on).
3. Train (or reuse, or resume) the segmenter on the fit rows (:func:`seg.engine.train_segmenter`).
4. Predict a label map for every stored slice, test split included.
5. Per-organ Dice of the predictions on the holdout and test series (never trained on).
6. Write the label maps (real masks kept where a training-split series has one, ``segment.keep_masks``;
   test-split series always carry the prediction) and the per-slice organ visibility; warn for each
   series in which an organ was not found.

Outputs (see :mod:`seg.store`)::

    store/organ_labels.npy, store/organs.csv
    store/segmenter/  model.safetensors + config.json, metrics.csv (per epoch), train_series.csv
                      (the patients and series trained on), dice.csv (per held-out/test series),
                      summary.json (Dice per group and organ, counts, seconds), config.yaml
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seg.data import HOLDOUT, TEST, AnnotatedSplit, SegmentDataset, resize_labels, split_annotated
from seg.engine import STATE_DIR, predict_labels, series_dice, train_segmenter
from seg.model import CONFIG_NAME, WEIGHTS_NAME, OrganSegmenter, check_segment_config
from seg.store import (
    AREA_COLUMNS,
    LABELS_FILE,
    MASK_SOURCE,
    ORGANS_FILE,
    PREDICTED,
    SEG_LABELS,
    SEG_ORGANS,
    SEGMENTER_DIR,
    VIS_COLUMNS,
    has_mask,
    load_masks,
    visibility,
)
from toolkit.config import Config, SegmentConfig, save_config
from toolkit.errors import ConfigError, ContractError, DataError, ToolkitError
from toolkit.reporting import Reporter, as_reporter
from toolkit.sliceset import MANIFEST_FILE, SliceSet

SUMMARY_FILE = "summary.json"
GROUP_NAMES = {HOLDOUT: "held-out training patients", TEST: "test-split patients"}


def _fingerprint(cfg: Config, store: SliceSet, fit_series: list[int]) -> dict[str, Any]:
    """What the trained segmenter depends on: reuse it only while all of this is unchanged."""
    return {
        "segment": {k: v for k, v in asdict(cfg.segment).items() if k not in ("num_workers", "keep_masks", "min_area")},
        "seed": int(cfg.seed),
        "store_slices": len(store),
        "split_hash": store.meta.get("split_hash"),
        "fit_series": sorted(int(s) for s in fit_series),
    }


def _check_fingerprint(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    for key in now:
        if saved.get(key) != now[key]:
            detail = key
            if key == "segment":
                diff = [k for k in now[key] if saved.get(key, {}).get(k) != now[key][k]]
                detail = f"segment.{diff[0]}" if diff else key
            raise ContractError(
                f"{where} was made with another {detail} (config, seed or store changed); "
                "pass --force to retrain the segmenter"
            )


def _dice_summary(dice: pd.DataFrame) -> dict[str, Any]:
    """Mean Dice per group and organ over the series whose real mask shows the organ, with counts."""
    out: dict[str, Any] = {}
    for group in (HOLDOUT, TEST):
        part = dice[dice["group"] == group]
        out[group] = {
            "series": int(len(part)),
            "patients": int(part["patient_id"].nunique()),
            "dice": {o: (None if part[o].isna().all() else round(float(part[o].mean()), 4)) for o in SEG_ORGANS},
            "series_with_organ": {o: int(part[o].notna().sum()) for o in SEG_ORGANS},
        }
    return out


def format_dice(summary: dict[str, Any]) -> str:
    """The Dice lines ``toolkit segment`` prints."""
    lines = ["per-organ Dice on annotated series the segmenter did not train on:"]
    for group in (TEST, HOLDOUT):
        g = summary["dice"][group]
        if not g["series"]:
            lines.append(f"  {GROUP_NAMES[group]}: no annotated series")
            continue
        values = "  ".join(
            f"{o} {'n/a' if g['dice'][o] is None else format(g['dice'][o], '.3f')}" for o in SEG_ORGANS
        )
        lines.append(f"  {GROUP_NAMES[group]} ({g['series']} series, {g['patients']} patients): {values}")
    return "\n".join(lines)


def segment_store(
    store_dir: str | Path,
    cfg: Config,
    resume: bool = False,
    force: bool = False,
    reporter: Reporter | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train the localizer on the store's annotated training series and label every slice.

    Parameters
    ----------
    store_dir : path
        A slice store with ``masks.npy`` and a ``mask_source`` manifest column.
    cfg : Config
        ``cfg.segment`` and ``cfg.seed``.
    resume : bool, default=False
        Continue a training cut short (``segmenter/last/``).
    force : bool, default=False
        Delete the segmenter and the label maps first and train anew.
    reporter : Reporter, optional
        Messages, warnings (a series where an organ was not found) and progress bars.
    on_epoch_end : callable, optional
        ``f(epoch, metrics)`` after each epoch's resume state is saved.

    Returns
    -------
    dict
        The content of ``segmenter/summary.json``: Dice per group (``holdout``, ``test``) and
        organ with series counts, the patients trained on, missing organs per series, seconds.
    """
    from accelerate import Accelerator

    reporter = as_reporter(reporter)
    sc = cfg.segment
    check_segment_config(sc)
    store_dir = Path(store_dir)
    if not (store_dir / MANIFEST_FILE).exists():
        raise DataError(f"no slice store in {store_dir}: run `toolkit prepare` first")
    store = SliceSet.load(store_dir)
    table = store.table
    for col in ("split", MASK_SOURCE):
        if col not in table.columns:
            raise DataError(f"{store_dir / MANIFEST_FILE} lacks column '{col}'; re-run `toolkit prepare --force`")
    masks = load_masks(store_dir)
    groups = split_annotated(table, sc.holdout_fraction, cfg.seed)
    if not len(groups.fit):
        raise DataError(
            f"{store_dir / MANIFEST_FILE}: no training-split series has a mask ({MASK_SOURCE} is empty on every "
            "train row); add segmentations for some training patients and re-run `toolkit prepare`"
        )
    fit_table = table.iloc[groups.fit]
    # The guard the whole design rests on: a test patient's mask never reaches the optimizer.
    leaked = set(fit_table["patient_id"]) & set(table.loc[table["split"] == "test", "patient_id"])
    if leaked:
        raise ContractError(f"{store_dir / MANIFEST_FILE}: patients in both splits ({sorted(leaked)[:3]}...)")
    fingerprint = _fingerprint(cfg, store, fit_table["series_id"].unique().tolist())
    outputs = {"keep_masks": bool(sc.keep_masks), "min_area": float(sc.min_area)}

    out_dir = store_dir / SEGMENTER_DIR
    if force:
        shutil.rmtree(out_dir, ignore_errors=True)
        for name in (LABELS_FILE, ORGANS_FILE):
            (store_dir / name).unlink(missing_ok=True)
    summary_path = out_dir / SUMMARY_FILE
    if summary_path.exists() and (store_dir / ORGANS_FILE).exists() and (store_dir / LABELS_FILE).exists():
        summary = json.loads(summary_path.read_text())
        _check_fingerprint(summary["fingerprint"], fingerprint, out_dir)
        if summary.get("outputs") == outputs:
            reporter.info(f"{store_dir} is already segmented (reusing {out_dir}); pass --force to redo it")
            return summary

    start = time.perf_counter()
    try:
        accelerator = Accelerator(mixed_precision=sc.mixed_precision)
    except ValueError as exc:
        raise ConfigError(f"segment.mixed_precision: {str(exc).splitlines()[0]}") from None
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    with reporter.progress() as progress:
        if (out_dir / WEIGHTS_NAME).exists():
            _check_fingerprint(json.loads((out_dir / CONFIG_NAME).read_text())["fingerprint"], fingerprint, out_dir)
            reporter.info(f"reusing the trained segmenter in {out_dir}")
            model = OrganSegmenter.from_pretrained(out_dir).to(accelerator.device)
        else:
            if (out_dir / STATE_DIR).exists():
                if not resume:
                    raise ToolkitError(
                        f"{out_dir / STATE_DIR} holds an interrupted training; pass --resume to continue it "
                        "or --force to start over"
                    )
                trainer = json.loads((out_dir / STATE_DIR / "trainer.json").read_text())
                _check_fingerprint(trainer["fingerprint"], fingerprint, out_dir)
                reporter.info(f"resuming the segmenter after epoch {trainer['epoch'] + 1} of {sc.epochs}")
            reporter.info(
                f"training the segmenter on {len(groups.fit)} slices of {fit_table['series_id'].nunique()} "
                f"annotated series ({fit_table['patient_id'].nunique()} training patients)"
            )
            if main:
                fit_table[["patient_id", "series_id", "split"]].drop_duplicates().to_csv(
                    out_dir / "train_series.csv", index=False
                )
            hu = _resized_hu(store.images, groups.fit, sc.image_size)
            labels = resize_labels(np.asarray(masks[groups.fit]), sc.image_size)
            dataset = SegmentDataset(hu, labels, sc.windows, cfg.seed)
            model = train_segmenter(accelerator, sc, cfg.seed, dataset, out_dir, fingerprint, progress, on_epoch_end)
        train_seconds = time.perf_counter() - start
        if main:
            # Every slice of every series, test split included: the label maps downstream stages read.
            tmp_path = store_dir / (LABELS_FILE + ".tmp.npy")
            pred = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=(len(store), *store.size))
            task = progress.add_task("label slices", total=len(store), info="")
            predict_labels(
                model, store.images, np.arange(len(store)), pred, accelerator.device,
                batch_size=max(sc.batch_size * 2, 1), on_batch=lambda n: progress.advance(task, n),
            )
    if main:
        summary = _write_outputs(store_dir, store, masks, groups, pred, sc, reporter)
        summary.update(
            trained_on={
                "patients": sorted(int(p) for p in fit_table["patient_id"].unique()),
                "series": int(fit_table["series_id"].nunique()),
                "slices": int(len(groups.fit)),
            },
            train_seconds=round(train_seconds, 1),
            seconds=round(time.perf_counter() - start, 1),
            device=str(accelerator.device),
            fingerprint=fingerprint,
            outputs=outputs,
        )
        del pred  # close the memory map before it is renamed
        tmp_path.replace(store_dir / LABELS_FILE)
        (store_dir / (ORGANS_FILE + ".tmp")).replace(store_dir / ORGANS_FILE)
        summary_path.write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return json.loads(summary_path.read_text())


def _write_outputs(
    store_dir: Path,
    store: SliceSet,
    masks: np.ndarray,
    groups: AnnotatedSplit,
    pred: np.ndarray,
    sc: SegmentConfig,
    reporter: Reporter,
) -> dict[str, Any]:
    """Dice on the never-trained series, then real masks into ``pred``, visibility, ``organs.csv.tmp``."""
    table = store.table
    # Dice of the predictions, before real masks replace them.
    frames = []
    for group in (HOLDOUT, TEST):
        rows = groups.rows(group)
        if len(rows):
            d = series_dice(np.asarray(pred[rows]), np.asarray(masks[rows]), table["series_id"].to_numpy()[rows])
            d.insert(0, "group", group)
            d.insert(1, "patient_id", d["series_id"].map(table.groupby("series_id")["patient_id"].first()))
            frames.append(d)
    columns = ["group", "patient_id", "series_id", "slices", *SEG_ORGANS]
    dice = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    dice.to_csv(store_dir / SEGMENTER_DIR / "dice.csv", index=False)

    # Test-split series carry the prediction even where they have a mask: the test set is cropped and
    # scored as a new series without a mask would be (toolkit predict), so its figures stay honest.
    masked = has_mask(table) & bool(sc.keep_masks) & (table["split"].to_numpy() == "train")
    for start in range(0, len(table), 512):
        keep = masked[start : start + 512]
        if keep.any():
            block = np.asarray(pred[start : start + 512])
            block[keep] = np.asarray(masks[start : start + 512])[keep]
            pred[start : start + 512] = block
    pred.flush()

    area, vis = visibility(pred, table["series_id"].to_numpy(), sc.min_area * store.size[0] * store.size[1])
    organs = table[["patient_id", "series_id", "instance", "split"]].copy()
    organs["label_source"] = np.where(masked, table[MASK_SOURCE].fillna("").astype(str), PREDICTED)
    organs[list(AREA_COLUMNS)] = area
    organs[list(VIS_COLUMNS)] = np.round(vis, 4)
    missing = _warn_missing(organs, vis, reporter)
    organs.to_csv(store_dir / (ORGANS_FILE + ".tmp"), index=False)
    return {
        "dice": _dice_summary(dice),
        "labels": SEG_LABELS,
        "label_maps": (
            "real mask where a training series has one, else predicted" if sc.keep_masks else "predicted"
        ),
        "missing_organs": missing,
    }


def _resized_hu(images: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """HU slices ``rows`` at ``size`` px as int16, read chunk by chunk from the (memory-mapped) store."""
    from toolkit.transforms import resize_slices

    out = np.empty((len(rows), size, size), np.int16)
    for start in range(0, len(rows), 256):
        chunk = np.asarray(images[rows[start : start + 256]], np.float32)
        out[start : start + len(chunk)] = np.round(resize_slices(chunk, size)).astype(np.int16)
    return out


def _warn_missing(
    organs: pd.DataFrame, vis: np.ndarray, reporter: Reporter, limit: int = 20
) -> dict[str, list[str]]:
    """One warning per series in which some organ was found on no slice (the first ``limit``, then a
    count); returns {series: organs}."""
    found = pd.DataFrame(vis > 0, columns=list(SEG_ORGANS)).groupby(organs["series_id"].to_numpy()).any()
    missing: dict[str, list[str]] = {}
    for series_id, row in found.iterrows():
        absent = [o for o in SEG_ORGANS if not row[o]]
        if not absent:
            continue
        missing[str(series_id)] = absent
        if len(missing) > limit:
            continue
        patient = int(organs.loc[organs["series_id"] == series_id, "patient_id"].iloc[0])
        reporter.warn(
            f"series {series_id} (patient {patient}): no {', '.join(absent)} found on any slice; "
            f"{'its' if len(absent) == 1 else 'their'} visibility is 0 there, the other organs are usable"
        )
    if len(missing) > limit:
        reporter.warn(
            f"{len(missing) - limit} more series lack an organ; segmenter/summary.json lists all under missing_organs"
        )
    return missing
