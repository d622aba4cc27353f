"""AUCs averaged over training seeds, with intervals that include both sources of noise.

A study trains every arm with several seeds and scores each model on the same test patients.
The figure reported for an arm is the mean over seeds of the patient-level AUC; for a
comparison, the mean over seeds of ``AUC(arm, seed s) - AUC(control, seed s)``. Its variance
has two parts:

* the test patients: ``v_patients``, the variance of the seed mean over patient-bootstrap
  resamples (:func:`eval.metrics.bootstrap_auc_samples`; every model of an organ is scored on
  the same resamples, so comparisons are paired);
* the training seeds: ``v_seeds``, the seed-to-seed variance of one model's AUC divided by the
  number of seeds (twice that for a difference), pooled over the arms of one organ at one
  real-data fraction (:func:`pooled_seed_variance`), because two or three seeds per arm
  estimate it too unstably on their own; it has ``df`` degrees of freedom.

The interval is Banerjee's (1960) for a sum of variance components estimated with different
degrees of freedom: ``mean +/- sqrt(z^2 v_patients + t_df^2 v_seeds)``, never narrower than its
level says. Welch-Satterthwaite's single t quantile is not safe here: on simulated null studies
(5 organs x 3 arms, 2 seeds) it gave a false verdict in one study of nine after Holm's
correction, because the runs in which the seed variance is underestimated by chance are the
runs that get the most degrees of freedom. Measured on a fixed test set, the seed variance also
holds some patient noise the bootstrap part counts, so the interval errs on the wide side. With
one seed there is no seed part (the interval then ignores retraining noise, and a study gives no
verdict). The p-value of "no difference" is the level at which the interval reaches 0, so an
interval at level ``1 - a`` excludes 0 exactly when ``p < a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special

from eval import metrics


@dataclass
class SeedMean:
    """A per-seed figure averaged over seeds, with its patient and seed variance.

    Attributes
    ----------
    per_seed : list of float
        The figure of each seed (AUC, or AUC minus the control's).
    var_patients : float
        Patient-bootstrap variance of the seed mean.
    var_seeds : float
        Between-seed variance divided by the number of seeds (0 with one seed).
    seed_df : int
        Degrees of freedom the between-seed variance was estimated with.
    """

    per_seed: list[float]
    var_patients: float
    var_seeds: float
    seed_df: int  # degrees of freedom of the seed variance (0: none)

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def estimate(self) -> float:
        """Mean over seeds (NaN when any seed's figure is undefined)."""
        return float(np.mean(self.per_seed)) if self.per_seed else float("nan")

    @property
    def sd_seeds(self) -> float:
        """Standard deviation of the per-seed figures (NaN with one seed)."""
        return float(np.std(self.per_seed, ddof=1)) if self.n_seeds > 1 else float("nan")

    @property
    def se(self) -> float:
        return math.sqrt(self.var_patients + self.var_seeds)

    @property
    def df(self) -> float:
        """Degrees of freedom of the seed part (inf when there is none: one seed)."""
        return float(self.seed_df) if self.seed_df >= 1 else math.inf

    def half_width(self, level: float) -> float:
        """Banerjee's half-width ``sqrt(z^2 v_patients + t_df^2 v_seeds)`` at confidence ``level``."""
        q = 0.5 + level / 2.0
        z = float(special.ndtri(q))  # the quantile functions of scipy.stats.norm and .t, without their overhead
        t = z if math.isinf(self.df) else float(special.stdtrit(self.df, q))
        return math.sqrt(z**2 * self.var_patients + t**2 * self.var_seeds)

    def interval(self, level: float) -> tuple[float, float]:
        """``(low, high)`` at confidence ``level``; NaN when the estimate or its variance is."""
        est, se = self.estimate, self.se
        if not (math.isfinite(est) and math.isfinite(se)):
            return float("nan"), float("nan")
        half = self.half_width(level)
        return est - half, est + half

    def p_value(self) -> float:
        """Two-sided p-value of "the true mean is 0": the ``a`` whose ``1 - a`` interval just reaches 0.

        1 when estimate and variance are both 0; NaN when either is undefined.
        """
        est, se = self.estimate, self.se
        if not (math.isfinite(est) and math.isfinite(se)):
            return float("nan")
        if se <= 1e-12:
            return 1.0 if abs(est) <= 1e-12 else 0.0
        if self.half_width(1.0 - 1e-15) <= abs(est):
            return 1e-15
        # The half-width grows as a shrinks (from 0 at a = 1): one root, found on log10(a).
        root = optimize.brentq(lambda u: self.half_width(1.0 - 10.0**u) - abs(est), -15.0, 0.0, xtol=1e-7)
        return float(10.0**root)


def pooled_seed_variance(per_seed: list[ArrayLike]) -> tuple[float, int]:
    """Variance of one model's AUC from seed to seed, pooled over arms; and its degrees of freedom.

    Each arm's per-seed AUCs vary around their own mean; pooling (sum of squares over sum of
    ``n_seeds - 1``) assumes that spread is alike across the arms pooled (one organ at one real-data
    fraction), which with two or three seeds per arm is the only way to estimate it stably.

    Parameters
    ----------
    per_seed : list of array-like of shape (n_seeds,)
        Each arm's per-seed AUCs (NaN ones are left out).

    Returns
    -------
    variance : float
        0 when no arm has two seeds.
    df : int
    """
    squares, df = 0.0, 0
    for values in per_seed:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) > 1:
            squares += float(((values - values.mean()) ** 2).sum())
            df += len(values) - 1
    return (squares / df if df else 0.0), df


def _boot_variance(samples: np.ndarray) -> float:
    """Variance of bootstrap samples, leaving out resamples that lacked a class (NaN)."""
    valid = samples[np.isfinite(samples)]
    return float(np.var(valid, ddof=1)) if len(valid) > 1 else float("nan")


def bootstrap_models(y: ArrayLike, scores: ArrayLike, n_boot: int, seed: int) -> np.ndarray:
    """Patient-bootstrap AUCs of several models scored on the same patients, on shared resamples.

    Parameters
    ----------
    y : array-like of shape (n_patients,)
        0/1 patient labels.
    scores : array-like of shape (n_models, n_patients)
    n_boot : int
    seed : int

    Returns
    -------
    ndarray of shape (n_models, n_boot)
        NaN for resamples without both classes.
    """
    return metrics.bootstrap_auc_samples(y, list(np.asarray(scores, dtype=np.float64)), None, n_boot, seed)


def per_seed_aucs(y: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Patient-level AUC of each seed's model, shape (n_seeds,), from scores of shape (n_seeds, n_patients)."""
    return np.array([metrics.auc(y, s) for s in np.asarray(scores)])


def seed_mean_auc(aucs: ArrayLike, boot: np.ndarray, seed_variance: tuple[float, int]) -> SeedMean:
    """Mean AUC over seeds of one arm.

    Parameters
    ----------
    aucs : array-like of shape (n_seeds,)
        :func:`per_seed_aucs` of the arm.
    boot : ndarray of shape (n_seeds, n_boot)
        Those models' rows of :func:`bootstrap_models`.
    seed_variance : (float, int)
        :func:`pooled_seed_variance` of the arms it is pooled with.
    """
    aucs = np.asarray(aucs, dtype=np.float64)
    var, df = seed_variance
    return SeedMean(aucs.tolist(), _boot_variance(boot.mean(axis=0)), var / len(aucs), df)


def seed_mean_delta(aucs: ArrayLike, control_aucs: ArrayLike, boot: np.ndarray, boot_control: np.ndarray,
                    seed_variance: tuple[float, int]) -> SeedMean:
    """Mean over seeds of ``AUC(arm, s) - AUC(control, s)``.

    The seed part of its variance is ``2 * var / n_seeds`` with the pooled per-model seed variance
    ``var``: arm and control seeds counted as independent (when a shared seed value makes them
    alike, the true variance is smaller, so the interval errs on the wide side).

    Parameters
    ----------
    aucs, control_aucs : array-like of shape (n_seeds,)
    boot, boot_control : ndarray of shape (n_seeds, n_boot)
        Their rows of one :func:`bootstrap_models` call (the same resamples).
    seed_variance : (float, int)
        :func:`pooled_seed_variance`.
    """
    aucs, control_aucs = np.asarray(aucs, dtype=np.float64), np.asarray(control_aucs, dtype=np.float64)
    if aucs.shape != control_aucs.shape:
        raise ValueError(f"arm and control need the same seeds, got {aucs.shape} vs {control_aucs.shape}")
    var, df = seed_variance
    return SeedMean((aucs - control_aucs).tolist(), _boot_variance(boot.mean(axis=0) - boot_control.mean(axis=0)),
                    2.0 * var / len(aucs), df)
