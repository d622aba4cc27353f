"""One organ's lesion run (``toolkit gen --mode lesion``): injuries drawn into real healthy training crops.

Output folder (as :mod:`gen.run`, plus the counterfactual record)::

    synthetic/<organ>/
      images.npy, manifest.csv, meta.json   SyntheticSet mode "lesion": the injured crops, each with its
                                            source_row, source_patient, lesion_kind, lesion_grade
      lesion_masks.npy                      where each lesion was drawn (outside it the crop IS its source)
      train_patients.csv                    the training-split patients whose healthy crops were sources
      config.yaml                           resolved config
      checkpoint/, loss.csv                 fill "model" only: the lesion-mode generator (resumable)
      audit.json                            realism AUC, lesion contrast beside real injuries', filter, near copies
      grid.png                              healthy source | lesion mask | synthetic injured crop

Only healthy crops of ``split == "train"`` patients (a study's patient restriction included) are sources,
and the real injured crops the realism test compares with come from the same patients: no test patient
is ever read. The set holds injured crops only; a classifier's synthetic healthy class is their sources
(:func:`train.run.load_synthetic_pool`).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gen.data import class_names_for, train_patients_hash
from gen.lesions.audit import contrast_report, measure_lesions, organ_tail_contrast, quality_filter, realism_auc
from gen.lesions.backend import inpaint_hu
from gen.lesions.fill import fill_lesions
from gen.lesions.grid import save_lesion_grid
from gen.lesions.pairs import LesionSamples, choose_sources, eligible_sources, plan_lesions, training_plan
from gen.registry import create_generator, list_generators
from toolkit.artifacts.crops import CropSet
from toolkit.artifacts.synthetic import SyntheticSet
from toolkit.config import Config, save_config
from toolkit.errors import ContractError, DataError, ToolkitError
from toolkit.reporting import Reporter, as_reporter
from toolkit.sliceset import SliceSet
from toolkit.transforms import resize_slices, window_hu

NEAR_COPY_CHANGE = 0.005
"""A lesion crop whose windowed pixels differ from its source by less than this on average over the lesion
is a near copy of the healthy source (the lesion is invisible in the window): labelled injured, it would
teach noise, so it is flagged and train leaves it out."""


def fill_name(cfg: Config) -> str:
    """What fills the lesions: ``procedural`` or the backend (``gen.model``) for ``gen.lesion.fill=model``."""
    return "procedural" if cfg.gen.lesion.fill == "procedural" else cfg.gen.model


def crop_spacing(crops: CropSet, store: SliceSet, size: int) -> np.ndarray:
    """mm per pixel of each crop drawn at ``size`` px: the store's median pixel size x crop side / size."""
    spacing = store.meta.get("spacing_mm", {}).get("stored_median_row_col", [1.0, 1.0])
    return float(spacing[0]) * crops.table["crop_side"].to_numpy(np.float64) / float(size)


def _resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    return resize_slices(np.asarray(masks, dtype=np.float32), size) > 0.5


def lesion_training_rows(
    crops: CropSet, organ: str, cfg: Config, patients: Collection[int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rows of the crop set a lesion run may read (training split, ``patients`` if given) and their classes.

    Returns
    -------
    rows : ndarray of shape (m,), int64
    labels : ndarray of shape (m,), int64
        0 healthy, 1 injured (or 1 low / 2 high with ``gen.conditioning=grade``), from the hard labels.
    class_names : list of str
    """
    names = class_names_for(organ, cfg.gen.conditioning)
    table = crops.table
    allowed = table["split"].to_numpy() == "train"
    if patients is not None:
        allowed &= np.isin(table["patient_id"].to_numpy(), np.fromiter(patients, np.int64))
    grade = table[organ].to_numpy(np.float64)
    allowed &= np.isfinite(grade) & (grade >= 0)
    rows = np.flatnonzero(allowed).astype(np.int64)
    grade = grade[rows].astype(np.int64)
    labels = np.minimum(grade, len(names) - 1) if len(names) == 3 else (grade > 0).astype(np.int64)
    return rows, labels, names


def generate_lesions(
    ws: Any,
    cfg: Config,
    organ: str,
    crops: CropSet,
    store: SliceSet,
    out: Path,
    n: int,
    gid: str,
    resume: bool = False,
    reporter: Reporter | None = None,
    train_patients: Collection[int] | None = None,
) -> Path:
    """Plan, fill, filter, audit and write ``organ``'s lesion set into ``out`` (prepared by the caller).

    Parameters
    ----------
    crops : CropSet
        The organ's crop set (``store/crops/<organ>/``) the sources and real injured crops come from.
    store : SliceSet
        The store (its split hash and pixel spacing).
    n : int
        Lesion crops to plan; the quality filter may drop some (audit.json says how many).
    gid : str
        The generator id (:func:`gen.run.generator_id`).
    """
    reporter = as_reporter(reporter)
    lcfg = cfg.gen.lesion
    size = int(cfg.gen.image_size)
    if size > crops.size:
        raise ContractError(
            f"gen.image_size={size} is above the {crops.size} px crops of {crops.path}: lesions are drawn into "
            f"real crops at the classifier's size; lower gen.image_size or re-run `toolkit crop --force --size {size}`"
        )
    window = (float(cfg.data.windows[0][0]), float(cfg.data.windows[0][1]))
    rows, labels, names = lesion_training_rows(crops, organ, cfg, train_patients)
    if len(rows) == 0:
        raise ToolkitError(f"the {organ} crop set {crops.path} has no labelled crops of split 'train'")
    hu = resize_slices(np.asarray(crops.images[rows]), size)  # float HU at the drawing size
    hu = np.round(hu).astype(np.int16)
    organ_masks = _resize_masks(crops.masks[rows], size)
    spacing = crop_spacing(crops, store, size)[rows]
    patients = crops.table["patient_id"].to_numpy()[rows].astype(np.int64)
    rng = np.random.default_rng(cfg.seed)

    # Which healthy crop gets which lesion: sources evenly, classes evenly over the injured classes.
    # Sources come from healthy patients only: a healthy crop of an injured patient (the organ's edge) may
    # show the injury, and its twin is trained on as healthy.
    healthy_patient = crops.table[f"{organ}_patient"].to_numpy()[rows] == 0
    eligible = eligible_sources(labels, organ_masks)
    sources = choose_sources(eligible[healthy_patient[eligible]], n, rng)
    classes = 1 + np.arange(n) % (len(names) - 1)
    plan = plan_lesions(organ, organ_masks, sources, classes, names, rng, spacing, lcfg)
    method = fill_name(cfg)
    reporter.info(
        f"{organ}: {method} lesions ({', '.join(lcfg.injuries[organ])}) into {n} healthy training crops "
        f"({len(np.unique(sources))} distinct, {len(np.unique(patients[sources]))} patients), {size} px"
    )
    history: list[dict[str, float]] = []
    if method == "procedural":
        out_hu = fill_lesions(hu[sources], organ_masks[sources], plan.lesion_masks, plan.kinds, rng,
                              spacing[sources], lcfg)
    else:
        if method not in list_generators("lesion"):
            valid = ", ".join(list_generators("lesion"))
            raise ToolkitError(f"gen.model '{method}' has no lesion mode; valid: {valid}")
        generator = create_generator(method, cfg.gen, n_classes=len(names), class_names=names, seed=cfg.seed,
                                     mode="lesion")
        windowed = window_hu(hu.astype(np.float32), [window])[:, 0]
        tplan = training_plan(organ, labels, organ_masks, names, np.random.default_rng([cfg.seed, 1]), spacing, lcfg)
        with reporter.progress() as progress:
            task = progress.add_task(f"train {organ} lesions", total=cfg.gen.train_steps)
            generator.fit(windowed, labels, lesion_plan=tplan, checkpoint_dir=out / "checkpoint", resume=resume,
                          callback=lambda step, logs: progress.update(task, completed=step))
        history = list(generator.history_)
        out_hu = inpaint_hu(generator, hu[sources], plan.lesion_masks, plan.classes, window, seed=cfg.seed)
    samples = LesionSamples(out_hu, plan, patients[sources], method=method)

    # Audit: contrast against the organ, the quality filter, near copies of the source, realism.
    src_w = window_hu(hu[sources].astype(np.float32), [window])[:, 0]
    out_w = window_hu(samples.images_hu.astype(np.float32), [window])[:, 0]
    measures = measure_lesions(samples.images_hu, organ_masks[sources], plan.lesion_masks)
    keep, filter_report = quality_filter(measures, plan.kinds, lcfg, window=window)
    if not keep.any():
        raise DataError(
            f"the quality filter dropped all {n} {organ} lesion crops ({filter_report['dropped_by']}); "
            "check gen.lesion contrasts against data.windows[0]"
        )
    area = np.maximum(plan.lesion_masks.reshape(n, -1).sum(axis=1), 1)
    change = np.abs(out_w - src_w).reshape(n, -1).sum(axis=1) / area
    near_copy = change < NEAR_COPY_CHANGE
    similarity = _cosine(out_w, src_w)

    injured = np.flatnonzero(labels > 0)
    real_w = window_hu(hu[injured].astype(np.float32), [window])[:, 0]
    try:
        realism = realism_auc(real_w, out_w[keep], patients[injured], samples.source_patients[keep],
                              epochs=cfg.gen.audit_feature_epochs * 3, seed=cfg.seed)
        realism.pop("synthetic_scores")
    except DataError as exc:
        realism = {"auc": None, "note": f"not measured: {exc}"}
    healthy = np.flatnonzero(labels == 0)
    tails = {
        name: {
            "real_injured": _median(organ_tail_contrast(hu[injured], organ_masks[injured], q)),
            "real_healthy": _median(organ_tail_contrast(hu[healthy], organ_masks[healthy], q)),
            "synthetic": _median(organ_tail_contrast(samples.images_hu[keep], organ_masks[sources][keep], q)),
        }
        for name, q in (("dark_tail_q05", 0.05), ("bright_tail_q95", 0.95))
    }
    contrast = contrast_report(measures[keep], plan.kinds[keep])
    auc = realism.get("auc")
    summary = (
        f"{int(keep.sum())} of {n} lesion crops kept (filter dropped {filter_report['dropped']}); "
        f"realism AUC {'n/a' if auc is None else f'{auc:.3f}'} (0.5 = indistinguishable); "
        f"lesion - organ median {contrast['all']['synthetic']['median']:.0f} HU; "
        f"{int(near_copy[keep].sum())} near copies of their source"
    )
    report = {
        "generator_id": gid,
        "mode": "lesion",
        "fill": method,
        "summary": summary,
        "realism": realism,
        "contrast": contrast,
        "organ_tail_contrast": {
            **tails,
            "note": "median over crops of quantile_q(organ HU) - median(organ HU): real injured crops have no lesion "
            "mask, so this mask-free figure sets the synthetic crops beside the real injured and healthy ones",
        },
        "quality_filter": filter_report,
        "near_copy": {"n": int(near_copy[keep].sum()), "threshold_mean_abs_change": NEAR_COPY_CHANGE,
                      "note": "a lesion crop equal to its healthy source in the window (the lesion is invisible)"},
        "n_real_injured": int(len(injured)),
        "n_sources": int(len(np.unique(sources))),
    }
    (out / "audit.json").write_text(json.dumps(_json_ready(report), indent=2))
    if history:
        pd.DataFrame(history).to_csv(out / "loss.csv", index=False)
    shown = np.flatnonzero(keep)
    save_lesion_grid(
        out / "grid.png", src_w[shown], plan.lesion_masks[shown], out_w[shown],
        title=f"{organ}: {method} lesions into healthy training crops, {gid}",
        captions=[f"{plan.kinds[i]} g{plan.grades[i]}" for i in shown],
    )
    pd.DataFrame({"patient_id": np.unique(patients)}).to_csv(out / "train_patients.csv", index=False)
    save_config(cfg, out / "config.yaml")
    SyntheticSet.from_samples(
        samples.images_hu[keep],
        plan.classes[keep],
        near_copy[keep],
        similarity[keep],
        organ=organ,
        generator_id=gid,
        backend=method,
        window=window,
        windows=cfg.data.windows,
        class_names=names,
        split_hash=str(store.meta.get("split_hash", "")),
        train_patients_hash=train_patients_hash(patients),
        mode="lesion",
        provenance={
            "n_train_patients": int(len(np.unique(patients))),
            "seed": int(cfg.seed),
            "fill": method,
            "audit": summary,
            "realism_auc": auc,
            "input_id": crops.crop_id,
        },
        lesion_masks=plan.lesion_masks[keep],
        source_rows=rows[sources][keep],  # rows of the crop set itself
        source_patients=samples.source_patients[keep],
        lesion_kinds=plan.kinds[keep],
        lesion_grades=plan.grades[keep],
    ).save(out, force=True)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _median(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else float("nan")


def _json_ready(value: Any) -> Any:
    from gen.run import _json_ready as ready

    return ready(value)
