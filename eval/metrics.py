"""Evaluation metrics on arrays (numpy/scipy only, no I/O).

* ROC AUC with ties counted one half (the Mann-Whitney U statistic / (m n)).
* DeLong's variance of the AUC and the paired DeLong test of two correlated
  AUCs, computed with the fast midrank algorithm of Sun & Xu (2014), "Fast
  implementation of DeLong's algorithm for comparing the areas under correlated
  receiver operating characteristic curves", IEEE Signal Processing Letters 21(11).
* Bootstrap confidence intervals that resample *patients* (groups), never
  slices: slices of one patient are correlated, and resampling them as if they
  were independent gives intervals that are too narrow.
* Operating points (full sensitivity, Youden) and the RSNA 2023 Abdominal
  Trauma Detection weighted log loss.

Every function takes binary labels ``y`` (1 = injured) and scores ``s`` (higher =
more likely injured). With only one class present an AUC is undefined: the
functions return NaN and :func:`undefined_auc_reason` says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from toolkit import GRADED_ORGANS, ORGANS
from toolkit.artifacts.comparison import OperatingPoint  # a threshold and its figures, as reports store it

# --------------------------------------------------------------------------- validation


def _check_scores(y: ArrayLike, *scores: ArrayLike) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels as int64 0/1 and scores as float64 1-D arrays of one length."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    out = []
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        if s.shape != y.shape:
            raise ValueError(f"labels and scores differ in shape: {y.shape} vs {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError("scores contain NaN or infinite values")
        out.append(s)
    values = np.unique(y)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {values[:5].tolist()}")
    return y.astype(np.int64), out


def undefined_auc_reason(y: ArrayLike) -> str | None:
    """Why an AUC cannot be computed for labels ``y`` (None when it can).

    Parameters
    ----------
    y : array-like of shape (n,)
        Binary labels.
    """
    y = np.asarray(y)
    n_pos = int((y == 1).sum())
    n_neg = int((y == 0).sum())
    if n_pos == 0 and n_neg == 0:
        return "no samples"
    if n_pos == 0:
        return f"no injured cases among {n_neg} (only one class)"
    if n_neg == 0:
        return f"no healthy cases among {n_pos} (only one class)"
    return None


# --------------------------------------------------------------------------- AUC + DeLong


def compute_midrank(x: np.ndarray) -> np.ndarray:
    """Midranks (1-based; ties get the mean of the ranks they span) along the last axis.

    Parameters
    ----------
    x : ndarray of shape (..., n)

    Returns
    -------
    ndarray of shape (..., n), dtype=float64
    """
    return stats.rankdata(np.asarray(x, dtype=np.float64), method="average", axis=-1)


def auc(y: ArrayLike, s: ArrayLike) -> float:
    """Area under the ROC curve; ties count one half; NaN when one class is missing.

    Parameters
    ----------
    y : array-like of shape (n,)
        Binary labels, 1 = injured.
    s : array-like of shape (n,)
        Scores, higher = more likely injured.
    """
    y, (s,) = _check_scores(y, s)
    m = int(y.sum())
    n = len(y) - m
    if m == 0 or n == 0:
        return float("nan")
    ranks = compute_midrank(s)
    return float((ranks[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


def _fast_delong(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance for ``k`` score vectors on the same cases.

    Sun & Xu (2014), algorithm 2: three midrank computations replace the
    O(m n) comparisons of DeLong et al. (1988).

    Parameters
    ----------
    scores : ndarray of shape (k, n)
    y : ndarray of shape (n,), 0/1 with both classes present

    Returns
    -------
    aucs : ndarray of shape (k,)
    cov : ndarray of shape (k, k)
    """
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    m = pos.shape[1]
    n = neg.shape[1]
    tx = compute_midrank(pos)
    ty = compute_midrank(neg)
    tz = compute_midrank(np.concatenate([pos, neg], axis=1))
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    # Structural components (DeLong's placement values): v10[i] = share of negatives
    # ranked below positive i, v01[j] = share of positives ranked above negative j.
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    # The variance needs two cases of each class (sample covariances, ddof=1).
    k = len(scores)
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.full((k, k), np.nan)
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.full((k, k), np.nan)
    return aucs, s10 / m + s01 / n


def delong_roc_variance(y: ArrayLike, s: ArrayLike) -> tuple[float, float]:
    """AUC and its DeLong variance.

    Parameters
    ----------
    y : array-like of shape (n,)
        Binary labels.
    s : array-like of shape (n,)
        Scores.

    Returns
    -------
    auc : float
    variance : float
        ``S10 / m + S01 / n`` (DeLong et al. 1988), m positives, n negatives.
        Both NaN when one class is missing.
    """
    y, (s,) = _check_scores(y, s)
    if undefined_auc_reason(y):
        return float("nan"), float("nan")
    aucs, cov = _fast_delong(s[None, :], y)
    return float(aucs[0]), float(cov[0, 0])


class PairedDeLong(NamedTuple):
    """Result of :func:`delong_paired_test`; unpacks as a 6-tuple."""

    auc1: float
    auc2: float
    delta: float  # auc2 - auc1
    se: float
    z: float
    p: float  # two-sided


def delong_paired_test(y: ArrayLike, s1: ArrayLike, s2: ArrayLike) -> PairedDeLong:
    """DeLong's test of two correlated AUCs measured on the same cases.

    Parameters
    ----------
    y : array-like of shape (n,)
        Binary labels.
    s1, s2 : array-like of shape (n,)
        Scores of the reference model (e.g. the real-only baseline) and the other model.

    Returns
    -------
    PairedDeLong
        ``(auc1, auc2, delta, se, z, p)`` with ``delta = auc2 - auc1``,
        ``se = sqrt(var1 + var2 - 2 cov12)``, ``z = delta / se`` and the
        two-sided normal p-value. Identical scores give ``se = 0, z = 0, p = 1``.
        All NaN when one class is missing.
    """
    y, (s1, s2) = _check_scores(y, s1, s2)
    if undefined_auc_reason(y):
        nan = float("nan")
        return PairedDeLong(nan, nan, nan, nan, nan, nan)
    aucs, cov = _fast_delong(np.stack([s1, s2]), y)
    delta = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se <= 1e-12:
        # Identical rankings: no difference and no variance; call it no evidence.
        z = 0.0 if abs(delta) <= 1e-12 else float(np.sign(delta) * np.inf)
    else:
        z = delta / se
    p = float(2.0 * stats.norm.sf(abs(z)))
    return PairedDeLong(float(aucs[0]), float(aucs[1]), delta, se, float(z), p)


# --------------------------------------------------------------------------- bootstrap


@dataclass
class BootstrapCI:
    """A point estimate with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    ci: float
    n_boot: int
    n_valid: int  # resamples in which both classes were present
    unit: str  # what was resampled: "patient" or "row"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _group_weights(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-group multiplicities of ``n_boot`` resamples of the groups with replacement.

    Returns ``counts`` of shape (n_boot, n_groups) and ``inverse`` (n,) mapping rows to groups.
    """
    _, inverse = np.unique(groups, return_inverse=True)
    g = int(inverse.max()) + 1
    draws = rng.integers(0, g, size=(n_boot, g))
    offsets = (np.arange(n_boot) * g)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * g).reshape(n_boot, g)
    return counts, inverse


def _weighted_auc_rows(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of each row of case weights ``w`` (b, n); ties count one half; NaN without both classes.

    A resample with replacement is the same as integer case weights, so one sort
    of the scores serves every resample.
    """
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, np.diff(s_sorted) != 0])
    ws = w[:, order].astype(np.float64)
    pos = np.add.reduceat(ws * y_sorted, starts, axis=1)
    neg = np.add.reduceat(ws * (1.0 - y_sorted), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_auc_samples(
    y: ArrayLike,
    scores: list[ArrayLike] | tuple[ArrayLike, ...],
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    chunk: int = 4_000_000,
) -> np.ndarray:
    """AUCs of each score vector on the same ``n_boot`` group resamples.

    Parameters
    ----------
    y : array-like of shape (n,)
        Binary labels.
    scores : sequence of k array-likes of shape (n,)
        Score vectors evaluated on identical resamples (paired).
    groups : array-like of shape (n,), optional
        Resampling unit of each row, e.g. patient ids for slice-level scores.
        None resamples rows (right when each row is a patient).
    n_boot : int, default=2000
    seed : int, default=0
    chunk : int, default=4_000_000
        Bounds memory: resamples are processed ``chunk // n`` at a time.

    Returns
    -------
    ndarray of shape (k, n_boot)
        NaN for resamples that lack a class.
    """
    y, scores = _check_scores(y, *scores)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups and labels differ in shape: {groups.shape} vs {y.shape}")
    rng = np.random.default_rng(seed)
    counts, inverse = _group_weights(groups, n_boot, rng)
    out = np.empty((len(scores), n_boot))
    step = max(1, chunk // max(1, len(y)))
    for start in range(0, n_boot, step):
        w = counts[start : start + step][:, inverse]
        for k, s in enumerate(scores):
            out[k, start : start + step] = _weighted_auc_rows(y, s, w)
    return out


def _percentile_ci(estimate: float, samples: np.ndarray, ci: float, unit: str) -> BootstrapCI:
    valid = samples[np.isfinite(samples)]
    alpha = (1.0 - ci) / 2.0
    if len(valid) == 0 or not np.isfinite(estimate):
        low = high = float("nan")
    else:
        low, high = (float(v) for v in np.quantile(valid, [alpha, 1.0 - alpha]))
    return BootstrapCI(float(estimate), low, high, ci, len(samples), len(valid), unit)


def bootstrap_auc_ci(
    y: ArrayLike,
    s: ArrayLike,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap interval of the AUC, resampling patients (``groups``).

    Parameters
    ----------
    y : array-like of shape (n,)
        Binary labels.
    s : array-like of shape (n,)
        Scores.
    groups : array-like of shape (n,), optional
        Patient id of each row. All rows of a drawn patient enter the resample
        together. None: each row is its own unit (patient-level tables).
    n_boot : int, default=2000
    ci : float, default=0.95
    seed : int, default=0

    Returns
    -------
    BootstrapCI
        Estimate on the full data and the ``ci`` percentile interval.
    """
    estimate = auc(y, s)
    samples = bootstrap_auc_samples(y, [s], groups, n_boot, seed)[0]
    return _percentile_ci(estimate, samples, ci, "row" if groups is None else "patient")


def bootstrap_auc_delta_ci(
    y: ArrayLike,
    s1: ArrayLike,
    s2: ArrayLike,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Paired bootstrap interval of ``auc(y, s2) - auc(y, s1)``.

    Both models are scored on the same patient resamples, so the interval
    reflects the correlation between them (as DeLong's paired test does).
    Parameters as in :func:`bootstrap_auc_ci`.
    """
    estimate = auc(y, s2) - auc(y, s1)
    samples = bootstrap_auc_samples(y, [s1, s2], groups, n_boot, seed)
    return _percentile_ci(estimate, samples[1] - samples[0], ci, "row" if groups is None else "patient")


# --------------------------------------------------------------------------- ROC + operating points


def roc_curve(y: ArrayLike, s: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points, one per distinct score (predict injured when ``s >= threshold``).

    Returns
    -------
    fpr, tpr, thresholds : ndarray of shape (n_distinct + 1,)
        Thresholds decrease; the first is ``+inf`` (nothing called injured).
        fpr/tpr are NaN when the class they divide by is missing.
    """
    y, (s,) = _check_scores(y, s)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s) - 1]
    tp = np.r_[0, np.cumsum(y_sorted)[last]]
    fp = np.r_[0, np.cumsum(1 - y_sorted)[last]]
    thresholds = np.r_[np.inf, s_sorted[last]]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / tp[-1] if tp[-1] > 0 else np.full(len(tp), np.nan)
        fpr = fp / fp[-1] if fp[-1] > 0 else np.full(len(fp), np.nan)
    return fpr, tpr, thresholds


def _point(rule: str, y: np.ndarray, s: np.ndarray, threshold: float) -> OperatingPoint:
    pred = s >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else float("nan")
    spec = float((~pred[neg]).mean()) if neg.any() else float("nan")
    acc = float((pred == pos).mean()) if len(y) else float("nan")
    return OperatingPoint(rule, float(threshold), sens, spec, acc)


def operating_point_full_sensitivity(y: ArrayLike, s: ArrayLike) -> OperatingPoint:
    """The highest threshold that still calls every injured case injured (sensitivity 1).

    This is the lowest score of any injured case. Specificity and accuracy at
    that point say how many healthy cases a screen that misses nobody would
    flag. NaN threshold when there is no injured case.
    """
    y, (s,) = _check_scores(y, s)
    if not (y == 1).any():
        return OperatingPoint("full_sensitivity", float("nan"), float("nan"), float("nan"), float("nan"))
    return _point("full_sensitivity", y, s, float(s[y == 1].min()))


def youden_point(y: ArrayLike, s: ArrayLike) -> OperatingPoint:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 (highest on ties)."""
    y, (s,) = _check_scores(y, s)
    if undefined_auc_reason(y):
        return OperatingPoint("youden", float("nan"), float("nan"), float("nan"), float("nan"))
    fpr, tpr, thresholds = roc_curve(y, s)
    best = int(np.argmax(tpr - fpr))
    return _point("youden", y, s, float(thresholds[best]))


# --------------------------------------------------------------------------- RSNA 2023 metric

RSNA_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bowel": (1.0, 2.0),  # healthy, injury
    "extravasation": (1.0, 6.0),
    "kidney": (1.0, 2.0, 4.0),  # healthy, low, high
    "liver": (1.0, 2.0, 4.0),
    "spleen": (1.0, 2.0, 4.0),
    "any_injury": (1.0, 6.0),
}
"""Sample weight by true class, from the RSNA 2023 Abdominal Trauma Detection metric."""

_EPS = 1e-15


def weighted_log_loss(classes: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> float:
    """Sample-weighted multi-class log loss ``sum(w * -log p[true]) / sum(w)``.

    Parameters
    ----------
    classes : ndarray of shape (n,), int
        True class index of each sample.
    probs : ndarray of shape (n, c)
        Class probabilities; each row is normalised to sum to 1 and clipped to [1e-15, 1].
    weights : ndarray of shape (n,)
    """
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    p_true = np.clip(probs[np.arange(len(classes)), classes], _EPS, 1.0)
    return float((weights * -np.log(p_true)).sum() / weights.sum())


@dataclass
class RSNALogLoss:
    """The RSNA 2023 score on the label groups that could be computed."""

    score: float  # mean of ``groups``; NaN when empty
    groups: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # group -> reason

    def to_dict(self) -> dict:
        return {"score": self.score, "groups": dict(self.groups), "left_out": dict(self.left_out)}


def rsna_weighted_log_loss(
    grades: Mapping[str, ArrayLike],
    p_injured: Mapping[str, ArrayLike],
    p_graded: Mapping[str, ArrayLike] | None = None,
) -> RSNALogLoss:
    """RSNA 2023 Abdominal Trauma Detection weighted log loss, on the groups available.

    The competition metric averages six label-group log losses (bowel,
    extravasation, kidney, liver, spleen, any_injury), each weighted per sample
    by its true class (:data:`RSNA_WEIGHTS`). ``any_injury`` is predicted as the
    maximum over the five organs of ``1 - p(healthy)`` and is injured when any
    organ is.

    Our classifiers give one probability of injury per organ. That suffices for
    bowel and extravasation (``p(healthy) = 1 - p``) and for ``any_injury``. The
    graded organs (kidney, liver, spleen) need healthy/low/high probabilities;
    their group is computed only when ``p_graded`` holds them and is otherwise
    listed in ``left_out`` (so the score is *not* comparable to the
    leaderboard unless ``left_out`` is empty).

    Parameters
    ----------
    grades : mapping organ -> array-like of shape (n,), int
        True grade per patient: 0 healthy, 1 injury/low, 2 high. Same patient order for every organ.
    p_injured : mapping organ -> array-like of shape (n,)
        Probability of injury (any grade).
    p_graded : mapping organ -> array-like of shape (n, 3), optional
        Healthy/low/high probabilities of graded organs.

    Returns
    -------
    RSNALogLoss
    """
    p_graded = dict(p_graded or {})
    groups: dict[str, float] = {}
    left_out: dict[str, str] = {}
    p_healthy: dict[str, np.ndarray] = {}
    for organ in ORGANS:
        if organ not in grades or (organ not in p_injured and organ not in p_graded):
            left_out[organ] = "no predictions for this organ"
            continue
        g = np.asarray(grades[organ]).astype(np.int64)
        weights = np.asarray(RSNA_WEIGHTS[organ])
        if organ in GRADED_ORGANS:
            if organ in p_graded:
                probs = np.asarray(p_graded[organ], dtype=np.float64)
                if probs.shape != (len(g), 3):
                    raise ValueError(f"{organ}: graded probabilities must have shape ({len(g)}, 3), got {probs.shape}")
                groups[organ] = weighted_log_loss(g, probs, weights[g])
                p_healthy[organ] = probs[:, 0] / probs.sum(axis=1)
                continue
            left_out[organ] = "binary classifier gives no healthy/low/high probabilities"
            p_healthy[organ] = 1.0 - np.asarray(p_injured[organ], dtype=np.float64)
            continue
        if g.max(initial=0) > 1:
            raise ValueError(f"{organ}: grades must be 0/1, got {int(g.max())}")
        p = np.clip(np.asarray(p_injured[organ], dtype=np.float64), 0.0, 1.0)
        groups[organ] = weighted_log_loss(g, np.stack([1.0 - p, p], axis=1), weights[g])
        p_healthy[organ] = 1.0 - p
    if len(p_healthy) == len(ORGANS):
        any_true = np.max([np.asarray(grades[o]) > 0 for o in ORGANS], axis=0).astype(np.int64)
        any_p = np.clip(np.max([1.0 - p_healthy[o] for o in ORGANS], axis=0), 0.0, 1.0)
        weights = np.asarray(RSNA_WEIGHTS["any_injury"])
        groups["any_injury"] = weighted_log_loss(any_true, np.stack([1.0 - any_p, any_p], axis=1), weights[any_true])
    else:
        missing = [o for o in ORGANS if o not in p_healthy]
        left_out["any_injury"] = f"needs all five organs; missing {', '.join(missing)}"
    score = float(np.mean(list(groups.values()))) if groups else float("nan")
    return RSNALogLoss(score, groups, left_out)
