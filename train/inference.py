"""Scoring slices with a trained run: fold models, slice probabilities, patient aggregation.

Used by ``train`` itself (patient-level files) and by ``toolkit predict`` / ``explain``.
Preprocessing matches training exactly: resize HU to the model's image size
(:func:`train.data.resize_hu`), window (:func:`toolkit.transforms.window_hu`),
normalise with the checkpoint's ``mean``/``std``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from toolkit.artifacts.run import RunFolder
from toolkit.errors import ToolkitError
from toolkit.transforms import window_hu
from train.data import resize_hu
from train.model import load_classifier

AGGREGATES: tuple[str, ...] = ("max", "topk")


def aggregate_patient(probs: np.ndarray, how: str = "max", top_k: int = 3) -> float:
    """One patient score from the scores of their slices.

    Parameters
    ----------
    probs : ndarray of shape (n_slices,) or (n_models, n_slices)
        Slice probabilities; a 2-D array is first averaged over models (the ensemble).
    how : {"max", "topk"}
        ``max``: the highest slice; ``topk``: the mean of the ``top_k`` highest slices.
    top_k : int
        Slices averaged by ``topk`` (all of them when fewer).

    Returns
    -------
    float
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 2:
        probs = probs.mean(axis=0)
    if probs.size == 0:
        raise ToolkitError("cannot aggregate a patient with no slices")
    if how == "max":
        return float(probs.max())
    if how == "topk":
        if top_k < 1:
            raise ToolkitError(f"train.top_k must be >= 1, got {top_k}")
        return float(np.sort(probs)[-top_k:].mean())
    raise ToolkitError(f"unknown train.aggregate '{how}'; choose one of {', '.join(AGGREGATES)}")


def patient_scores(
    slices: pd.DataFrame, how: str = "max", top_k: int = 3, by: tuple[str, ...] = ("patient_id",)
) -> pd.Series:
    """Patient scores from a table of slice scores: ``prob`` aggregated per group of ``by``.

    Parameters
    ----------
    slices : DataFrame
        One row per scored slice, with ``prob`` and the ``by`` columns.
    how, top_k
        As :func:`aggregate_patient`.
    by : tuple of str, default=("patient_id",)
        Grouping columns, e.g. ``("patient_id", "fold")`` for one score per patient and fold model.

    Returns
    -------
    Series
        Float scores indexed by ``by``, sorted.
    """
    return slices.groupby(list(by), sort=True)["prob"].agg(lambda p: aggregate_patient(p.to_numpy(), how, top_k))


def load_fold_models(run_dir: Path, organ: str) -> list[nn.Module]:
    """Every fold's best checkpoint of ``organ`` in a run, ordered by fold (CPU, eval mode)."""
    folder = RunFolder(run_dir)
    folds = folder.checkpoints(organ)
    if not folds:
        raise ToolkitError(
            f"no fold checkpoints for {organ} in {folder.organ_dir(organ)}: run `toolkit train --organ {organ}`"
        )
    return [load_classifier(f.path) for f in folds]


def default_device() -> torch.device:
    """CUDA, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@torch.inference_mode()
def predict_probs(
    models: Sequence[nn.Module],
    hu: np.ndarray,
    windows: Sequence[Sequence[float]],
    image_size: int,
    device: str | torch.device | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Injury probability of every slice under every model.

    Parameters
    ----------
    models : sequence of nn.Module
        Classifiers from :func:`load_fold_models` (their ``pretrained_cfg`` holds mean/std).
    hu : ndarray of shape (n, H, W)
        Slices in Hounsfield units, any size.
    windows : sequence of (level, width)
        The run's ``data.windows`` (one channel each).
    image_size : int
        The run's ``train.image_size``.
    device : str or torch.device, optional
        Default: CUDA, else MPS, else CPU. Models are moved there.
    batch_size : int, default=64

    Returns
    -------
    ndarray of shape (n_models, n), dtype=float32
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ToolkitError(f"predict_probs expects HU slices of shape (n, H, W), got {hu.shape}")
    device = torch.device(device) if device is not None else default_device()
    resized = resize_hu(hu, image_size)
    out = np.zeros((len(models), len(hu)), dtype=np.float32)
    if len(hu) == 0:
        return out
    stats = []
    for model in models:
        in_chans = model.pretrained_cfg["input_size"][0]
        if in_chans != len(windows):
            raise ToolkitError(f"model expects {in_chans} channel(s) but {len(windows)} window(s) were given")
        model.eval().to(device)
        mean = torch.tensor(model.pretrained_cfg["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(model.pretrained_cfg["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        stats.append((mean, std))
    for start in range(0, len(resized), batch_size):
        x = torch.from_numpy(window_hu(resized[start : start + batch_size], windows)).to(device)
        for m, (model, (mean, std)) in enumerate(zip(models, stats, strict=True)):
            logits = model((x - mean) / std).squeeze(1).float()
            out[m, start : start + len(x)] = torch.sigmoid(logits).cpu().numpy()
    return out
