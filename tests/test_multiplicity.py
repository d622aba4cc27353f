"""Holm's procedure against a hand-computed example, and verdicts that stay honest in a null study."""

from __future__ import annotations

import numpy as np
import pytest

from eval.multiplicity import holm
from study.collect import primary_comparisons
from study.plan import Arm
from study.stats import bootstrap_models, per_seed_aucs, pooled_seed_variance, seed_mean_delta


def test_holm_matches_a_hand_computed_example():
    # m = 5 at alpha 0.05. Sorted: 0.004 (x5 = 0.020 < 0.05), 0.010 (x4 = 0.040), 0.012 (x3 = 0.036 -> the running
    # maximum keeps 0.040), 0.030 (x2 = 0.060: 0.030 >= 0.05 / 2, the procedure stops here), 0.200 (x1 = 0.200).
    p = [0.030, 0.004, 0.200, 0.012, 0.010]
    result = holm(p, alpha=0.05)
    assert result.adjusted == pytest.approx([0.060, 0.020, 0.200, 0.040, 0.040])
    assert result.rejected.tolist() == [False, True, False, True, True]
    # Rejected at steps 1-3: tested at 0.05/5, 0.05/4, 0.05/3; the rest at the step where it stopped (0.05/2).
    assert result.alpha == pytest.approx([0.025, 0.01, 0.025, 0.05 / 3, 0.0125])
    assert result.levels == pytest.approx(1 - result.alpha)
    # Bonferroni would have rejected only p < 0.01; unadjusted, four of five.
    assert sum(np.array(p) < 0.05 / 5) == 1 and sum(np.array(p) < 0.05) == 4


def test_holm_counts_an_undefined_comparison_but_never_rejects_it():
    result = holm([0.001, float("nan")], alpha=0.05)
    assert result.adjusted == pytest.approx([0.002, 1.0]) and result.rejected.tolist() == [True, False]
    assert holm([], 0.05).m == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([1.5])


def _null_study(rng: np.random.Generator, organs: int, arms: int, seeds: int, n: int, n_boot: int) -> list:
    """The primary comparisons of one simulated study in which no arm differs from its control.

    Every model scores patient i as ``separation * label + patient effect + noise``: the patient effect is
    shared by every model (one test set), the noise is the model's own, and each trained model (arm, seed)
    draws its own separation around the same mean (retraining noise, alike in every arm).
    """
    y = np.r_[np.ones(n), np.zeros(n)].astype(np.int64)
    family = [Arm(1.0, 0.5, "image", f"backend{a}") for a in range(1, arms + 1)]
    deltas = {}
    for o in range(organs):
        patient = rng.normal(size=2 * n)
        models = np.array([(1.0 + rng.normal(0, 0.4)) * y + patient + rng.normal(0, 0.3, 2 * n)
                           for _ in range((arms + 1) * seeds)])
        boot = bootstrap_models(y, models, n_boot, int(rng.integers(1 << 31)))
        rows = [slice(a * seeds, (a + 1) * seeds) for a in range(arms + 1)]  # rows[0]: the control
        aucs = [per_seed_aucs(y, models[r]) for r in rows]
        pooled = pooled_seed_variance(aucs)
        for a, arm in enumerate(family, 1):
            deltas[(f"organ{o}", arm.name)] = seed_mean_delta(aucs[a], aucs[0], boot[rows[a]], boot[rows[0]], pooled)
    return primary_comparisons(deltas, [f"organ{o}" for o in range(organs)], family, 0.05, seeds)


def test_a_null_study_keeps_the_family_wise_false_verdict_rate_at_alpha():
    """5 organs x 3 arms, 2 seeds, 40 injured / 40 healthy test patients, no true difference anywhere."""
    rng = np.random.default_rng(2023)
    studies = [_null_study(rng, organs=5, arms=3, seeds=2, n=40, n_boot=200) for _ in range(200)]
    false_verdict = np.mean([any(c.verdict in ("improved", "worse") for c in study) for study in studies])
    error = np.sqrt(0.05 * 0.95 / len(studies))
    assert false_verdict <= 0.05 + 2 * error, false_verdict  # measured: 0.04
    # The same comparisons judged one by one at p < 0.05 (no correction) would be wrong in many more studies.
    uncorrected = np.mean([any(c.p < 0.05 for c in study) for study in studies])
    assert uncorrected > 0.15, uncorrected  # measured: 0.385
    assert all(len(study) == 15 for study in studies)
