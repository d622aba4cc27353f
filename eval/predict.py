"""``toolkit predict``: per-organ injury probabilities for one CT series from a trained run.

The study is scored exactly as the run scored its test patients: the series is
read into HU at the slice size and count of the store the run was trained on
(:func:`run_settings`), every slice is scored by each fold model, fold
probabilities are averaged, and slices are aggregated to one study score by the
run's rule (``train.aggregate``: max, or mean of the top k).
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
        ``study``, ``n_slices``, ``organs`` ({organ: run, prob, prob_folds, aggregate,
        full_sensitivity_threshold, top_slices}), ``elapsed_s``. No DICOM tag values
        other than geometry (instance number, z) appear in it.
    """
    from toolkit.data.dicom import read_series
    from train.inference import aggregate_patient, load_fold_models, predict_probs

    start = time.perf_counter()
    study = Path(study)
    if not study.is_dir():
        raise ToolkitError(f"study folder {study} does not exist; give a folder of one series' DICOM files")
    chosen = choose_runs(ws, run)
    store_meta = _store_meta(ws)
    settings = {organ: run_settings(r, store_meta, organ) for organ, r in chosen.items()}
    # Organs whose models see the same input (series read, image size, windows) are scored together:
    # the series is read, resized and windowed once, and every fold model of every such organ runs
    # over all its slices in large batches.
    groups: dict[tuple, list[str]] = {}
    for organ, r in chosen.items():
        s = settings[organ]
        key = (s["size"], s["slices"], s["crop_body"], r.image_size(organ), json.dumps(s["windows"]))
        groups.setdefault(key, []).append(organ)
    series_cache: dict[tuple[int, int, bool], tuple[np.ndarray, Any]] = {}
    fold_probs: dict[str, np.ndarray] = {}
    for (size, slices, crop_body, image_size, _), group in groups.items():
        if (size, slices, crop_body) not in series_cache:
            series_cache[size, slices, crop_body] = read_series(study, size=size, slices=slices, crop_body=crop_body)
        hu, _ = series_cache[size, slices, crop_body]
        models = {organ: load_fold_models(chosen[organ].path, organ) for organ in group}
        probs = predict_probs([m for organ in group for m in models[organ]], hu, settings[group[0]]["windows"],
                              image_size, device=device)
        offsets = np.cumsum([0] + [len(models[organ]) for organ in group])
        for organ, lo, hi in zip(group, offsets[:-1], offsets[1:], strict=True):
            fold_probs[organ] = probs[lo:hi]
    organs: dict[str, Any] = {}
    n_slices = 0
    for organ, r in chosen.items():
        s = settings[organ]
        _, table = series_cache[s["size"], s["slices"], s["crop_body"]]
        n_slices = max(n_slices, len(table))
        slice_probs = fold_probs[organ].mean(axis=0)
        top = np.argsort(-slice_probs)[:3]
        organs[organ] = {
            "run": r.name,
            "prob": aggregate_patient(slice_probs, s["aggregate"], s["top_k"]),
            "prob_folds": [aggregate_patient(p, s["aggregate"], s["top_k"]) for p in fold_probs[organ]],
            "aggregate": s["aggregate"] if s["aggregate"] == "max" else f"top{s['top_k']}",
            "full_sensitivity_threshold": full_sensitivity_threshold(r, organ),
            "top_slices": [
                {
                    "instance": int(table["instance"].iloc[i]),
                    "z": float(table["z"].iloc[i]),
                    "prob": float(slice_probs[i]),
                }
                for i in top
            ],
        }
    return {
        "study": str(study),
        "n_slices": int(n_slices),
        "organs": organs,
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
