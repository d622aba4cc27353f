"""eval.metrics against definitions computed independently (brute force, scipy, scikit-learn, by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import log_loss

from eval import metrics
from eval.metrics import (
    auc,
    bootstrap_auc_ci,
    bootstrap_auc_delta_ci,
    delong_paired_test,
    delong_roc_variance,
    operating_point_full_sensitivity,
    rsna_weighted_log_loss,
    undefined_auc_reason,
    youden_point,
)


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _components(y, s):
    """DeLong's structural components by definition, with O(m n) loops."""
    pos = [v for v, t in zip(s, y, strict=True) if t == 1]
    neg = [v for v, t in zip(s, y, strict=True) if t == 0]
    v10 = [sum(_psi(x, z) for z in neg) / len(neg) for x in pos]
    v01 = [sum(_psi(x, z) for x in pos) / len(pos) for z in neg]
    return np.array(v10), np.array(v01), sum(v10) / len(pos)


def _data(seed: int, n: int = 20, ties: bool = True):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2, int), np.zeros(n - n // 2, int)]
    rng.shuffle(y)
    s1 = rng.normal(size=n) + y
    s2 = 0.6 * s1 + rng.normal(size=n) * 0.8 + 0.5 * y
    if ties:  # coarse scores so midranks matter
        s1, s2 = np.round(s1, 0), np.round(s2, 0)
    return y, s1, s2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_delong_variance_match_brute_force(seed):
    y, s, _ = _data(seed)
    v10, v01, a = _components(y, s)
    m, n = len(v10), len(v01)
    var = sum((v - a) ** 2 for v in v10) / (m - 1) / m + sum((v - a) ** 2 for v in v01) / (n - 1) / n
    got_auc, got_var = delong_roc_variance(y, s)
    assert got_auc == pytest.approx(a, abs=1e-12)
    assert got_var == pytest.approx(var, rel=1e-10)
    u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert auc(y, s) == pytest.approx(u / (m * n), abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_paired_delong_matches_covariance_by_definition(seed):
    y, s1, s2 = _data(seed, n=24)
    a10, a01, a1 = _components(y, s1)
    b10, b01, a2 = _components(y, s2)
    m, n = len(a10), len(a01)

    def cov(a, b, ma, mb):
        return sum((x - ma) * (z - mb) for x, z in zip(a, b, strict=True)) / (len(a) - 1)

    var1 = cov(a10, a10, a1, a1) / m + cov(a01, a01, a1, a1) / n
    var2 = cov(b10, b10, a2, a2) / m + cov(b01, b01, a2, a2) / n
    c12 = cov(a10, b10, a1, a2) / m + cov(a01, b01, a1, a2) / n
    se = math.sqrt(var1 + var2 - 2 * c12)
    z = (a2 - a1) / se
    res = delong_paired_test(y, s1, s2)
    auc1, auc2, delta, got_se, got_z, p = res
    assert (auc1, auc2) == (pytest.approx(a1), pytest.approx(a2))
    assert delta == pytest.approx(a2 - a1)
    assert got_se == pytest.approx(se, rel=1e-10)
    assert got_z == pytest.approx(z, rel=1e-10)
    assert p == pytest.approx(2 * (1 - stats.norm.cdf(abs(z))), rel=1e-8)


def test_paired_delong_identical_and_degenerate():
    y, s1, _ = _data(5)
    assert delong_paired_test(y, s1, s1)[3:] == (0.0, 0.0, 1.0)
    one_class = np.ones(6, int)
    assert math.isnan(auc(one_class, np.arange(6)))
    assert "only one class" in undefined_auc_reason(one_class)
    assert all(math.isnan(v) for v in delong_paired_test(one_class, np.arange(6), np.arange(6)))
    ci = bootstrap_auc_ci(one_class, np.arange(6.0), n_boot=20)
    assert math.isnan(ci.estimate) and ci.n_valid == 0
    assert math.isnan(operating_point_full_sensitivity(np.zeros(4, int), np.arange(4.0)).threshold)


def test_weighted_resample_auc_equals_auc_of_materialised_resample():
    """The bootstrap scores a resample through case weights; check against copying the rows."""
    y, s, _ = _data(6, n=30)
    groups = np.arange(30) // 3  # 10 patients of 3 slices
    rng = np.random.default_rng(0)
    counts, inverse = metrics._group_weights(groups, 50, rng)
    w = counts[:, inverse]
    got = metrics._weighted_auc_rows(y, s, w)
    for b in range(50):
        drawn = np.repeat(np.arange(10), counts[b])
        rows = np.concatenate([np.flatnonzero(groups == g) for g in drawn])
        assert np.all(w[b][groups == groups[0]] == w[b][0])  # a patient's slices move together
        assert got[b] == pytest.approx(auc(y[rows], s[rows]), nan_ok=True)


def test_bootstrap_ci_covers_true_auc():
    d = 1.0
    true_auc = stats.norm.cdf(d / math.sqrt(2))  # binormal model, equal variances
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(200):
        y = np.r_[np.ones(40, int), np.zeros(40, int)]
        s = rng.normal(size=80) + d * y
        ci = bootstrap_auc_ci(y, s, n_boot=200, seed=i)
        hits += ci.low <= true_auc <= ci.high
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_resamples_patients_not_slices():
    """Slices of a patient share a patient effect: slice resampling understates the uncertainty."""
    rng = np.random.default_rng(1)
    n_pat, per = 16, 25
    y_pat = np.r_[np.ones(8, int), np.zeros(8, int)]
    effect = rng.normal(0, 1.0, n_pat) + 0.8 * y_pat
    groups = np.repeat(np.arange(n_pat), per)
    y = y_pat[groups]
    s = effect[groups] + rng.normal(0, 0.1, n_pat * per)
    by_patient = bootstrap_auc_ci(y, s, groups=groups, n_boot=500, seed=0)
    by_slice = bootstrap_auc_ci(y, s, groups=None, n_boot=500, seed=0)
    assert by_patient.unit == "patient" and by_slice.unit == "row"
    assert (by_patient.high - by_patient.low) > 2 * (by_slice.high - by_slice.low)


def test_paired_delta_ci_brackets_delta_and_is_zero_for_identical_scores():
    y, s1, s2 = _data(7, n=60, ties=False)
    ci = bootstrap_auc_delta_ci(y, s1, s2, n_boot=300)
    assert ci.low <= ci.estimate <= ci.high
    assert ci.estimate == pytest.approx(auc(y, s2) - auc(y, s1))
    same = bootstrap_auc_delta_ci(y, s1, s1, n_boot=100)
    assert same.low == same.high == 0.0


def test_full_sensitivity_and_youden_by_hand():
    y = np.array([0, 0, 1, 0, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])
    op = operating_point_full_sensitivity(y, s)
    # lowest injured score 0.35; healthy 0.4 and 0.8 are above it
    assert (op.threshold, op.sensitivity, op.specificity) == (0.35, 1.0, 0.5)
    assert op.accuracy == pytest.approx(4 / 6)
    yd = youden_point(y, s)
    # J = 0.5 at 0.9 (sens .5, spec 1) and at 0.35 (sens 1, spec .5): the higher threshold wins
    assert (yd.threshold, yd.sensitivity, yd.specificity) == (0.9, 0.5, 1.0)


def test_rsna_log_loss_by_hand_on_four_patients():
    grades = {
        "bowel": np.array([0, 1, 0, 0]),
        "extravasation": np.array([0, 0, 1, 0]),
        "kidney": np.array([0, 0, 0, 2]),
        "liver": np.array([1, 0, 0, 0]),
        "spleen": np.array([0, 0, 0, 0]),
    }
    p_inj = {
        "bowel": np.array([0.1, 0.6, 0.2, 0.3]),
        "extravasation": np.array([0.2, 0.1, 0.7, 0.4]),
        "kidney": np.array([0.1, 0.2, 0.1, 0.5]),
        "liver": np.array([0.5, 0.1, 0.2, 0.1]),
        "spleen": np.array([0.1, 0.1, 0.1, 0.05]),
    }
    kidney3 = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.9, 0.05, 0.05], [0.5, 0.1, 0.4]])
    ln = math.log
    bowel = (-ln(0.9) - 2 * ln(0.6) - ln(0.8) - ln(0.7)) / (1 + 2 + 1 + 1)
    extra = (-ln(0.8) - ln(0.9) - 6 * ln(0.7) - ln(0.6)) / (1 + 1 + 6 + 1)
    kidney = (-ln(0.9) - ln(0.8) - ln(0.9) - 4 * ln(0.4)) / (1 + 1 + 1 + 4)
    # any_injury: max over organs of 1 - p(healthy); all four patients are injured somewhere
    any_p = [
        max(0.1, 0.2, 0.1, 0.5, 0.1),
        max(0.6, 0.1, 0.2, 0.1, 0.1),
        max(0.2, 0.7, 0.1, 0.2, 0.1),
        max(0.3, 0.4, 0.5, 0.1, 0.05),
    ]
    any_inj = sum(-6 * ln(p) for p in any_p) / 24
    res = rsna_weighted_log_loss(grades, p_inj, {"kidney": kidney3})
    assert res.groups["bowel"] == pytest.approx(bowel)
    assert res.groups["extravasation"] == pytest.approx(extra)
    assert res.groups["kidney"] == pytest.approx(kidney)
    assert res.groups["any_injury"] == pytest.approx(any_inj)
    assert set(res.left_out) == {"liver", "spleen"}
    assert res.score == pytest.approx((bowel + extra + kidney + any_inj) / 4)
    # the same group losses as scikit-learn's weighted log loss (what the Kaggle metric calls)
    w = np.array([1, 2, 1, 1])
    assert res.groups["bowel"] == pytest.approx(
        log_loss(grades["bowel"], np.c_[1 - p_inj["bowel"], p_inj["bowel"]], sample_weight=w)
    )
    partial = rsna_weighted_log_loss({"bowel": grades["bowel"]}, {"bowel": p_inj["bowel"]})
    assert list(partial.groups) == ["bowel"] and "any_injury" in partial.left_out
