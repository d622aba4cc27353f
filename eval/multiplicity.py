"""Verdicts that stay honest when many comparisons are made at once: Holm's step-down procedure.

With five organs and three synthetic arms, fifteen comparisons each at alpha = 0.05 give at
least one false "improved" or "worse" in about four studies of ten when nothing changed.
Holm (1979), "A simple sequentially rejective multiple test procedure", Scandinavian Journal
of Statistics 6(2), keeps the family-wise error rate (the chance of any false verdict) at or
below alpha under any dependence between the tests, and rejects at least what Bonferroni does.

Step down through the p-values in increasing order, the j-th (0-based) against
``alpha / (m - j)``; stop at the first that misses its threshold: it and every larger one are
not rejected. The adjusted p-value ``max_{i <= j} min(1, (m - i) p_(i))`` is below alpha
exactly for the rejected ones.

An interval at the matching level excludes 0 exactly when its comparison is rejected (when
interval and p-value come from one statistic): a rejected hypothesis at step j is reported at
level ``1 - alpha / (m - j)``; the others at the level of the step where the procedure stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

METHOD = "Holm"


@dataclass
class HolmResult:
    """Holm's procedure over ``m`` p-values (in the order given).

    Attributes
    ----------
    adjusted : ndarray of shape (m,)
        Holm-adjusted p-values; a comparison is rejected when its adjusted p < alpha.
    alpha : ndarray of shape (m,)
        The level each comparison was tested at (its matched interval has level ``1 - alpha``).
    rejected : ndarray of shape (m,), dtype=bool
    family_alpha : float
        The family-wise error rate controlled.
    """

    adjusted: np.ndarray
    alpha: np.ndarray
    rejected: np.ndarray
    family_alpha: float

    @property
    def m(self) -> int:
        return len(self.adjusted)

    @property
    def levels(self) -> np.ndarray:
        """Confidence level of each comparison's matched interval, shape (m,)."""
        return 1.0 - self.alpha


def holm(p: ArrayLike, alpha: float = 0.05) -> HolmResult:
    """Holm's step-down procedure at family-wise level ``alpha``.

    Parameters
    ----------
    p : array-like of shape (m,)
        Unadjusted two-sided p-values. NaN (a comparison that could not be made, e.g. an
        organ without injured test patients) counts as p = 1: it stays in the family (so the
        others are not tested more leniently) and is never rejected.
    alpha : float, default=0.05

    Returns
    -------
    HolmResult
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    m = len(p)
    p = np.where(np.isfinite(p), p, 1.0)
    order = np.argsort(p, kind="stable")
    multipliers = m - np.arange(m)  # m, m-1, ..., 1
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(multipliers * p[order]))
    thresholds = alpha / multipliers
    missed = np.flatnonzero(p[order] >= thresholds)
    stop = int(missed[0]) if len(missed) else m  # first step that is not rejected
    alpha_sorted = np.where(np.arange(m) < stop, thresholds, thresholds[min(stop, m - 1)] if m else alpha)
    adjusted = np.empty(m)
    level_alpha = np.empty(m)
    adjusted[order] = adjusted_sorted
    level_alpha[order] = alpha_sorted
    return HolmResult(adjusted=adjusted, alpha=level_alpha, rejected=adjusted < alpha, family_alpha=float(alpha))
