"""``toolkit predict``: per-organ injury probabilities for one CT series from a trained run.

The study is scored exactly as the run scored its test patients: the series is
read into HU at the slice size and count of the store the run was trained on
(:func:`run_settings`). An organ trained on organ crops (run.json ``inputs``) is
found by the store's organ localizer (``toolkit segment``), cut into crops with the
run's crop settings (:func:`seg.crops.series_crops`, the same code as ``toolkit crop``),
and its crops are scored; an organ trained on slices scores every slice. Fold
probabilities are averaged, and slices (crops) are aggregated to one study score by
the run's rule (``train.aggregate``: max, or mean of the top k); both kidneys' crops
count for the kidney. The time of each step is reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from eval import metrics
from eval.runs import Run, list_runs, load_run
from toolkit import ORGANS
from toolkit.config import Config
from toolkit.errors import ToolkitError
from toolkit.workspace import Workspace

BEST = "best"


def oof_auc(run: Run, organ: str) -> float:
    """Out-of-fold patient AUC of ``run`` for ``organ`` (NaN when unavailable).

    Picking a run by it never looks at the test set.
    """
    df = run.table(organ, "oof_patients", required=False)
    if df is None:
        return float("nan")
    return metrics.auc(df["label"].to_numpy().astype(int), df["prob"].to_numpy(float))


def full_sensitivity_threshold(run: Run, organ: str) -> float | None:
    """The full-sensitivity operating threshold fixed on out-of-fold patients (None when unavailable)."""
    df = run.table(organ, "oof_patients", required=False)
    if df is None or not (df["label"] > 0).any():
        return None
    return metrics.operating_point_full_sensitivity(
        df["label"].to_numpy().astype(int), df["prob"].to_numpy(float)
    ).threshold


def choose_runs(ws: Workspace, run: str) -> dict[str, Run]:
    """Organ -> run that scores it: one named run for every organ it has, or per organ the best OOF AUC."""
    if run != BEST:
        r = load_run(ws, run)
        organs = [o for o in ORGANS if r.has_models(o)]
        if not organs:
            raise ToolkitError(f"run '{run}' has no trained fold models under {r.path}; run `toolkit train --resume`")
        return {o: r for o in organs}
    runs = [load_run(ws, n) for n in list_runs(ws)]
    if not runs:
        raise ToolkitError(f"no complete run in {ws.runs_dir}; train one with `toolkit train`")
    chosen: dict[str, Run] = {}
    for organ in ORGANS:
        scored = [(oof_auc(r, organ), r.name, r) for r in runs if organ in r.organs]
        scored = [s for s in scored if np.isfinite(s[0])]
        if scored:
            chosen[organ] = max(scored, key=lambda s: (s[0], s[1]))[2]
    if not chosen:
        raise ToolkitError(f"no run in {ws.runs_dir} has oof_patients.csv to pick the best from; pass --run NAME")
    return chosen


def _store_meta(ws: Workspace) -> dict[str, Any]:
    path = ws.store_dir / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_settings(run: Run, store_meta: dict[str, Any] | None = None, organ: str | None = None) -> dict[str, Any]:
    """How ``run`` saw its slices: store size, slices per series and body crop, windows, aggregate rule.

    With ``organ``, the settings run.json records for it apply (``Run.organ_settings``; its image
    size: ``Run.image_size``); without, the run's.

    The store the run was trained on (same ``split_hash``) is the authority for slice size and
    count: a run's config.yaml records the config of the train command, whose ``data`` section
    need not be the one ``prepare`` used. Without that store the run's config is used.
    """
    data = run.config.get("data") or {}
    meta = store_meta or {}
    if meta.get("split_hash") is not None and meta.get("split_hash") == run.info.split_hash:
        size, slices = meta.get("size"), meta.get("slices_per_series")
        size = size[0] if isinstance(size, list) else size
        crop_body = meta.get("crop_body", False)  # stores written before the crop existed: whole image
    else:
        size, slices = data.get("size"), data.get("slices_per_series")
        crop_body = data.get("crop_body", False)
    if size is None:
        raise ToolkitError(
            f"cannot tell the slice size run '{run.name}' was trained at: no store with split "
            f"{run.info.split_hash} and no data.size in {run.folder.config_path}"
        )
    if organ is not None:
        settings = run.organ_settings(organ)
        aggregate, top_k = settings.aggregate, settings.top_k
    else:
        aggregate, top_k = run.organ_setting(None, "aggregate"), run.organ_setting(None, "top_k")
    return {
        "size": int(size),
        "slices": int(slices or 0),
        "crop_body": bool(crop_body),
        "windows": run.info.windows or data.get("windows"),
        "aggregate": aggregate or "max",
        "top_k": int(top_k or 3),
    }


def segment_series(segmenter_dir: str | Path, hu: np.ndarray, device: str | None = None) -> dict[str, np.ndarray]:
    """Label maps and per-organ visibility of one series with a trained localizer.

    Parameters
    ----------
    segmenter_dir : path
        ``store/segmenter/`` (config.json + model.safetensors; summary.json for ``segment.min_area``).
    hu : ndarray of shape (n, S, S)
        The series' slices in HU, read as the store's.

    Returns
    -------
    dict
        ``labels`` (n, S, S) uint8, and ``vis_<organ>`` (n,) float32 for each localizer organ.
    """
    import torch

    from seg.engine import predict_labels
    from seg.model import OrganSegmenter
    from seg.store import SEG_ORGANS, visibility
    from train.inference import default_device

    segmenter_dir = Path(segmenter_dir)
    if not (segmenter_dir / "model.safetensors").exists():
        raise ToolkitError(
            f"no organ localizer in {segmenter_dir} (the run's organ crops were cut with it): run `toolkit segment`"
        )
    dev = torch.device(device) if device is not None else default_device()
    model = OrganSegmenter.from_pretrained(segmenter_dir).to(dev)
    labels = np.zeros(hu.shape, np.uint8)
    with torch.inference_mode():
        predict_labels(model, hu, np.arange(len(hu)), labels, dev)
    summary_path = segmenter_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    min_area = float((summary.get("outputs") or {}).get("min_area", 0.0))
    _, vis = visibility(labels, np.zeros(len(hu), np.int64), min_area * hu.shape[-2] * hu.shape[-1])
    return {"labels": labels, **{f"vis_{o}": vis[:, k] for k, o in enumerate(SEG_ORGANS)}}


def predict_study(
    ws: Workspace,
    cfg: Config,
    study: str | Path,
    run: str,
    device: str | None = None,
) -> dict[str, Any]:
    """Score one CT series folder with a run's fold ensemble(s).

    Parameters
    ----------
    ws : Workspace
    cfg : Config
        Unused beyond the workspace defaults today; kept for a uniform command signature.
    study : path-like
        Folder of single-frame DICOM files of one series.
    run : str
        Run name, or ``"best"``: per organ the run with the highest out-of-fold patient AUC.
    device : str, optional
        Torch device (default: what train.inference picks).

    Returns
    -------
    dict
        ``study``, ``n_slices``, ``organs`` ({organ: run, input ("crops" or "slices"), scored (crops or
        slices scored), prob, prob_folds, aggregate, full_sensitivity_threshold, top_slices, note}),
        ``seconds`` (read, segment, crop, classify) and ``elapsed_s``. No DICOM tag values other than
        geometry (instance number, z) appear in it.
    """
    from seg.crops import series_crops
    from toolkit.config import CropConfig
    from toolkit.data.dicom import read_series
    from train.inference import aggregate_patient, load_fold_models, predict_probs

    start = time.perf_counter()
    seconds = {"read": 0.0, "segment": 0.0, "crop": 0.0, "classify": 0.0}

    def timed(step: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[step] += time.perf_counter() - t0
        return out

    study = Path(study)
    if not study.is_dir():
        raise ToolkitError(f"study folder {study} does not exist; give a folder of one series' DICOM files")
    chosen = choose_runs(ws, run)
    store_meta = _store_meta(ws)
    # Each organ reads the series once per (size, slices, crop) and is segmented once per localizer; every
    # fold model of an organ then scores its slices or crops in large batches (predict_probs).
    series_cache: dict[tuple[int, int, bool], tuple[np.ndarray, Any]] = {}
    seg_cache: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
    organs: dict[str, Any] = {}
    n_slices = 0
    for organ, r in chosen.items():
        s = run_settings(r, store_meta, organ)
        key = (s["size"], s["slices"], s["crop_body"])
        if key not in series_cache:
            series_cache[key] = timed(
                "read", read_series, study, size=s["size"], slices=s["slices"], crop_body=s["crop_body"]
            )
        hu, table = series_cache[key]
        n_slices = max(n_slices, len(hu))
        record = r.info.input(organ)
        note = None
        if record["input"] == "crops":
            seg_key = (*key, record["segmenter_dir"])
            if seg_key not in seg_cache:
                seg_cache[seg_key] = timed("segment", segment_series, record["segmenter_dir"], hu, device)
                seg_cache[seg_key]["vis"] = {k[4:]: v for k, v in seg_cache[seg_key].items() if k.startswith("vis_")}
            found = seg_cache[seg_key]
            crop = CropConfig(organs=[organ], size=int(record["size"]), margin=float(record["margin"]),
                              min_visibility=float(record["min_visibility"]))
            crops = timed("crop", series_crops, hu, found["labels"], found["vis"], organ, crop)
            images = np.concatenate([c.images for c in crops]) if crops else np.zeros((0, crop.size, crop.size))
            where = [(int(i), c.side) for c in crops for i in c.rows]
            if not crops:
                note = f"the organ localizer found no {organ} on this series: it has no {organ} crop and scores 0"
        else:
            images, where = hu, [(i, "") for i in range(len(hu))]
        models = load_fold_models(r.path, organ)
        fold_probs = np.asarray(
            timed("classify", predict_probs, models, images, s["windows"], r.image_size(organ), device=device)
        )
        if len(where):
            slice_probs = fold_probs.mean(axis=0)
            prob = aggregate_patient(slice_probs, s["aggregate"], s["top_k"])
            prob_folds = [aggregate_patient(p, s["aggregate"], s["top_k"]) for p in fold_probs]
        else:  # as train scores a test patient without crops
            slice_probs, prob, prob_folds = np.zeros(0), 0.0, [0.0] * len(models)
        top = np.argsort(-slice_probs)[:3]
        organs[organ] = {
            "run": r.name,
            "input": record["input"],
            "scored": int(len(where)),
            "prob": prob,
            "prob_folds": prob_folds,
            "aggregate": s["aggregate"] if s["aggregate"] == "max" else f"top{s['top_k']}",
            "full_sensitivity_threshold": full_sensitivity_threshold(r, organ),
            "top_slices": [
                {
                    "instance": int(table["instance"].iloc[where[i][0]]),
                    "z": float(table["z"].iloc[where[i][0]]),
                    **({"side": where[i][1]} if where[i][1] else {}),
                    "prob": float(slice_probs[i]),
                }
                for i in top
            ],
            "note": note,
        }
    return {
        "study": str(study),
        "n_slices": int(n_slices),
        "organs": organs,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
