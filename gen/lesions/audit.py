"""Audit of synthetic lesions: realism two-sample test, HU contrast against the organ, quality filter.

1. **Realism** (:func:`realism_auc`): a classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017).
   A small CNN learns to tell real injured crops from synthetic ones under grouped K-fold
   cross-validation (a patient's real crops and the synthetic crops drawn into that patient's
   healthy crops share a fold, so the net cannot win by recognising anatomy); the AUC of its
   out-of-fold scores is 0.5 when the two sets are indistinguishable to it and 1.0 when it always
   tells them apart. Its out-of-fold score per synthetic crop feeds the quality filter.
2. **Contrast** (:func:`measure_lesions`, :func:`contrast_report`): the lesion's mean HU against the
   median HU of the rest of the organ, per crop, summarised per kind beside the real injuries'
   (where real lesion masks exist; :func:`organ_tail_contrast` is the mask-free comparison: how far
   the darkest (or brightest) 5 % of the organ lie from its median, in real healthy, real injured
   and synthetic crops alike).
3. **Quality filter** (:func:`quality_filter`): drops crops whose lesion is implausible (contrast
   outside the expected range widened by a margin, a lesion of a pixel or two or covering most of
   the organ, or a realism score the net found obviously synthetic), with the count per reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gen.base import draw_balanced_batch
from gen.lesions.fill import contrast_of
from toolkit.config import LesionGenConfig
from toolkit.errors import DataError


# ------------------------------------------------------------------ contrast
def measure_lesions(images_hu: np.ndarray, organ_masks: np.ndarray, lesion_masks: np.ndarray) -> pd.DataFrame:
    """HU of each crop's lesion against its organ.

    Parameters
    ----------
    images_hu : ndarray of shape (n, H, W)
    organ_masks, lesion_masks : ndarray of shape (n, H, W), bool

    Returns
    -------
    DataFrame with one row per crop: ``lesion_mean_hu``, ``organ_median_hu`` (organ pixels outside the
    lesion), ``delta_hu`` (their difference), ``area_px``, ``organ_px``, ``area_fraction`` (of the organ).
    NaN where the lesion or the rest of the organ is empty.
    """
    images = np.asarray(images_hu, dtype=np.float64)
    organs = np.asarray(organ_masks, dtype=bool)
    lesions = np.asarray(lesion_masks, dtype=bool)
    if organs.shape != images.shape or lesions.shape != images.shape:
        raise DataError(f"images {images.shape}, organ masks {organs.shape} and lesion masks {lesions.shape} differ")
    rows = []
    for img, organ, lesion in zip(images, organs, lesions, strict=True):
        rest = organ & ~lesion
        lesion_mean = float(img[lesion].mean()) if lesion.any() else float("nan")
        organ_median = float(np.median(img[rest])) if rest.any() else float("nan")
        rows.append({
            "lesion_mean_hu": lesion_mean,
            "organ_median_hu": organ_median,
            "delta_hu": lesion_mean - organ_median,
            "area_px": int(lesion.sum()),
            "organ_px": int(organ.sum()),
            "area_fraction": float(lesion.sum() / organ.sum()) if organ.any() else float("nan"),
        })
    return pd.DataFrame(rows)


def contrast_range(delta_hu: np.ndarray, quantiles: tuple[float, float] = (10.0, 90.0)) -> tuple[float, float]:
    """The ``(low, high)`` percentiles of measured ``delta_hu`` (NaN ignored): the contrast of real injuries
    as :func:`gen.lesions.fill.fill_lesions` (``measured_delta_hu``) and :func:`quality_filter` (``delta_hu``)
    take it, e.g. ``{kind: contrast_range(measure_lesions(real_hu, organs, lesions)["delta_hu"])}``."""
    values = np.asarray(delta_hu, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        raise DataError("no measured lesion contrast to take a range from (every lesion or organ was empty)")
    low, high = np.percentile(values, quantiles)
    return float(low), float(high)


def organ_tail_contrast(images_hu: np.ndarray, organ_masks: np.ndarray, q: float = 0.05) -> np.ndarray:
    """``quantile_q(organ HU) - median(organ HU)`` per crop: a lesion contrast that needs no lesion mask.

    ``q=0.05`` looks at the darkest 5 % of the organ (hypodense injuries), ``q=0.95`` the brightest
    (a contrast blush). Returns an ndarray of shape (n,), NaN for an empty organ.
    """
    images = np.asarray(images_hu, dtype=np.float64)
    organs = np.asarray(organ_masks, dtype=bool)
    out = np.full(len(images), np.nan)
    for i, (img, organ) in enumerate(zip(images, organs, strict=True)):
        if organ.any():
            values = img[organ]
            out[i] = float(np.quantile(values, q) - np.median(values))
    return out


def _quantiles(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"n": 0, "p5": float("nan"), "median": float("nan"), "p95": float("nan")}
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {"n": int(len(values)), "p5": float(p5), "median": float(p50), "p95": float(p95)}


def contrast_report(
    synthetic: pd.DataFrame,
    synthetic_kinds: Sequence[str],
    real: pd.DataFrame | None = None,
    real_kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Lesion-vs-organ contrast (``delta_hu`` of :func:`measure_lesions`) per kind, synthetic beside real.

    Returns
    -------
    dict
        ``{kind: {"synthetic": {n, p5, median, p95}, "real": {...} or None}}`` plus ``"all"``.
    """
    synth_kinds = np.asarray(synthetic_kinds, dtype=object)
    real_kinds_arr = np.asarray(real_kinds, dtype=object) if real_kinds is not None else None
    report: dict[str, Any] = {}
    for kind in ["all", *sorted(set(synth_kinds.tolist()))]:
        pick = np.ones(len(synth_kinds), bool) if kind == "all" else synth_kinds == kind
        entry: dict[str, Any] = {"synthetic": _quantiles(synthetic["delta_hu"].to_numpy()[pick]), "real": None}
        if real is not None:
            rpick = np.ones(len(real), bool) if (kind == "all" or real_kinds_arr is None) else real_kinds_arr == kind
            entry["real"] = _quantiles(real["delta_hu"].to_numpy()[rpick])
        report[kind] = entry
    report["note"] = "delta_hu = mean HU in the lesion - median HU of the rest of the organ (per crop)"
    return report


# ------------------------------------------------------------------ realism: classifier two-sample test
class RealismNet(nn.Module):
    """Three strided conv-BN-ReLU layers, global average pooling, one logit: (n, 1, H, W) -> (n,)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, 2, 1, bias=False), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


def _as_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1) - 0.5


def realism_auc(
    real: np.ndarray,
    synthetic: np.ndarray,
    real_groups: np.ndarray,
    synthetic_groups: np.ndarray,
    n_splits: int = 5,
    epochs: int = 10,
    batch_size: int = 32,
    width: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated AUC of a small CNN telling real from synthetic crops (0.5 = indistinguishable).

    Parameters
    ----------
    real : ndarray of shape (n_real, S, S), float in [0, 1]
        Real injured crops, windowed.
    synthetic : ndarray of shape (n_synth, S, S), float in [0, 1]
        Synthetic injured crops, windowed the same way.
    real_groups : ndarray of shape (n_real,)
        Patient id of each real crop.
    synthetic_groups : ndarray of shape (n_synth,)
        Patient id of each synthetic crop's healthy source: crops of one patient share a fold.
    n_splits : int, default=5
        Folds of ``StratifiedGroupKFold`` (fewer when there are fewer groups of either set).
    epochs : int, default=10
        Passes over each fold's training part, class-balanced batches.
    batch_size, width, seed : int

    Returns
    -------
    dict
        ``auc`` (pooled out-of-fold), ``fold_auc`` (list), ``n_real``, ``n_synthetic``, ``n_splits``, ``note``,
        and ``synthetic_scores``: ndarray of shape (n_synth,), each synthetic crop's out-of-fold
        P(synthetic) (pop it before writing JSON).
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    real = np.asarray(real, dtype=np.float32)
    synthetic = np.asarray(synthetic, dtype=np.float32)
    if real.ndim != 3 or synthetic.shape[1:] != real.shape[1:]:
        raise DataError(f"real crops {real.shape} and synthetic crops {synthetic.shape} must be (n, S, S) of one size")
    if len(real_groups) != len(real) or len(synthetic_groups) != len(synthetic):
        raise DataError("realism_auc needs one group (patient id) per real and per synthetic crop")
    x = np.concatenate([real, synthetic])
    y = np.concatenate([np.zeros(len(real), np.int64), np.ones(len(synthetic), np.int64)])
    groups = np.concatenate([np.asarray(real_groups), np.asarray(synthetic_groups)]).astype(str)
    k = min(n_splits, len(np.unique(groups[y == 0])), len(np.unique(groups[y == 1])))
    if k < 2:
        raise DataError("realism_auc needs at least 2 patients (groups) among the real and the synthetic crops")
    scores = np.full(len(y), np.nan)
    fold_auc = []
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (train, test) in enumerate(splitter.split(x, y, groups)):
        net = _fit_realism_net(x[train], y[train], epochs, batch_size, width, seed + fold)
        with torch.no_grad():
            scores[test] = torch.sigmoid(net(_as_input(x[test]))).double().numpy()
        if len(np.unique(y[test])) == 2:
            fold_auc.append(float(roc_auc_score(y[test], scores[test])))
    return {
        "auc": float(roc_auc_score(y, scores)),
        "fold_auc": fold_auc,
        "n_real": int(len(real)),
        "n_synthetic": int(len(synthetic)),
        "n_splits": int(k),
        "note": "classifier two-sample test: a small CNN tells real from synthetic crops; out-of-fold AUC, "
        "0.5 = indistinguishable, 1.0 = always told apart (folds grouped by patient)",
        "synthetic_scores": scores[len(real):],
    }


def _fit_realism_net(x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, width: int, seed: int) -> RealismNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RealismNet(width)
    class_index = [np.flatnonzero(y == c) for c in (0, 1)]
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs * max(1, -(-len(y) // batch_size))):
        idx, labels = draw_balanced_batch(class_index, batch_size, 2, g)
        loss = F.binary_cross_entropy_with_logits(net(_as_input(x[idx])), torch.from_numpy(labels).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


# ------------------------------------------------------------------ quality filter
def expected_contrast(
    kind: str, organ_median_hu: float, cfg: LesionGenConfig, window: Sequence[float] | None = None
) -> tuple[float, float]:
    """The ``delta_hu`` range a lesion of ``kind`` should show in a crop whose organ has ``organ_median_hu``.

    Absolute contrasts become deltas against the organ. With ``window`` (level, width), the lesion's
    HU are first clipped to what the window shows (gas below it reads as the window's floor).
    """
    reference, (low, high) = contrast_of(kind, cfg)
    if reference == "organ":
        low, high = organ_median_hu + low, organ_median_hu + high
    if window is not None:
        floor, top = window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
        low, high = float(np.clip(low, floor, top)), float(np.clip(high, floor, top))
    return low - organ_median_hu, high - organ_median_hu


def quality_filter(
    measures: pd.DataFrame,
    kinds: Sequence[str],
    cfg: LesionGenConfig | None = None,
    window: Sequence[float] | None = None,
    margin_hu: float = 20.0,
    min_area_px: int = 3,
    max_area_fraction: float = 0.8,
    realism_scores: np.ndarray | None = None,
    max_realism_score: float | None = None,
    delta_hu: dict[str, Sequence[float]] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Which synthetic crops to keep, and how many each rule dropped.

    Parameters
    ----------
    measures : DataFrame
        :func:`measure_lesions` of the synthetic crops (their own lesion masks and organ masks).
    kinds : sequence of n str
        Lesion kind of each crop.
    cfg : LesionGenConfig, optional
        The expected contrasts (:func:`expected_contrast`).
    window : (level, width), optional
        The window the crops will be seen in (clips the expected range).
    margin_hu : float, default=20.0
        Tolerance around the expected contrast range.
    min_area_px, max_area_fraction : int, float
        A lesion smaller than ``min_area_px`` pixels, or covering more than ``max_area_fraction`` of
        the organ, is dropped.
    realism_scores : ndarray of shape (n,), optional
        Out-of-fold P(synthetic) of :func:`realism_auc`.
    max_realism_score : float, optional
        Drop crops scored above it (needs ``realism_scores``).
    delta_hu : dict of kind to (low, high), optional
        Contrast ranges measured on real injuries; replace the configured ones of those kinds.

    Returns
    -------
    keep : ndarray of shape (n,), bool
    report : dict
        ``n``, ``kept``, ``dropped`` (total) and ``dropped_by`` ``{"contrast", "area", "realism"}`` (a crop
        failing several rules counts under each), plus the settings used.
    """
    cfg = cfg or LesionGenConfig()
    n = len(measures)
    if len(kinds) != n:
        raise DataError(f"quality_filter got {n} measured crops but {len(kinds)} kinds")
    delta = measures["delta_hu"].to_numpy(dtype=np.float64)
    organ = measures["organ_median_hu"].to_numpy(dtype=np.float64)
    bad_contrast = np.zeros(n, bool)
    for i, kind in enumerate(kinds):
        if delta_hu is not None and kind in delta_hu:
            low, high = float(delta_hu[kind][0]), float(delta_hu[kind][1])
        else:
            low, high = expected_contrast(kind, organ[i], cfg, window)
        bad_contrast[i] = not (np.isfinite(delta[i]) and low - margin_hu <= delta[i] <= high + margin_hu)
    area = measures["area_px"].to_numpy()
    bad_area = (area < min_area_px) | ~(measures["area_fraction"].to_numpy(dtype=np.float64) <= max_area_fraction)
    bad_realism = np.zeros(n, bool)
    if max_realism_score is not None:
        if realism_scores is None or len(realism_scores) != n:
            raise DataError("max_realism_score needs one realism score per synthetic crop")
        bad_realism = np.asarray(realism_scores, dtype=np.float64) > max_realism_score
    keep = ~(bad_contrast | bad_area | bad_realism)
    report = {
        "n": int(n),
        "kept": int(keep.sum()),
        "dropped": int((~keep).sum()),
        "dropped_by": {"contrast": int(bad_contrast.sum()), "area": int(bad_area.sum()),
                       "realism": int(bad_realism.sum())},
        "rules": {"margin_hu": margin_hu, "min_area_px": min_area_px, "max_area_fraction": max_area_fraction,
                  "max_realism_score": max_realism_score, "window": list(window) if window is not None else None},
    }
    return keep, report
