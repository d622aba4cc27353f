"""The balancer: epoch size, class balance, synthetic share, seeding, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.errors import ToolkitError
from train.balancer import REAL, SYNTHETIC, Balancer, series_position, split_counts


def _real(n_pos: int = 10, n_neg: int = 90) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(1000, 1000 + n_pos + n_neg)
    labels = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(np.int64)
    return index, labels


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_every_ratio_gives_the_same_epoch_size_balanced_within_each_source(ratio: float) -> None:
    index, labels = _real()
    synthetic = np.r_[np.ones(200), np.zeros(200)]
    balancer = Balancer(index, labels, synthetic, epoch_size=256, ratio=ratio, seed=0, fold=1)
    plan = balancer.plan(epoch=3)

    assert len(plan) == 256
    is_syn = plan.source == SYNTHETIC
    assert is_syn.mean() == pytest.approx(ratio, abs=1 / 256)
    for source in (REAL, SYNTHETIC):
        mask = plan.source == source
        if mask.any():
            assert plan.label[mask].mean() == 0.5
    # Real samples come only from the rows handed in (the training folds) with their true labels.
    real = plan.source == REAL
    assert set(plan.index[real]) <= set(index)
    lookup = dict(zip(index, labels, strict=True))
    assert all(lookup[i] == y for i, y in zip(plan.index[real], plan.label[real], strict=True))
    assert (synthetic[plan.index[is_syn]] == plan.label[is_syn]).all()


def test_real_only_baseline_repeats_the_minority_class_evenly() -> None:
    index, labels = _real(n_pos=10, n_neg=90)
    plan = Balancer(index, labels, epoch_size=200, ratio=0.0, seed=0, fold=0).plan(0)
    positives = plan.index[plan.label == 1]
    counts = np.unique(positives, return_counts=True)[1]
    assert len(positives) == 100 and len(counts) == 10 and (counts == 10).all()
    negatives = plan.index[plan.label == 0]
    assert len(np.unique(negatives)) == 90  # every healthy slice used, none more than twice
    assert np.unique(negatives, return_counts=True)[1].max() == 2


def test_plans_are_seeded_by_seed_fold_and_epoch() -> None:
    index, labels = _real()
    make = lambda seed, fold: Balancer(index, labels, epoch_size=64, ratio=0.0, seed=seed, fold=fold)  # noqa: E731
    assert np.array_equal(make(0, 0).plan(2).index, make(0, 0).plan(2).index)
    assert not np.array_equal(make(0, 0).plan(2).index, make(0, 0).plan(3).index)
    assert not np.array_equal(make(0, 0).plan(2).index, make(1, 0).plan(2).index)
    assert not np.array_equal(make(0, 0).plan(2).index, make(0, 1).plan(2).index)


def test_split_counts_keep_the_epoch_size() -> None:
    for ratio in np.linspace(0, 1, 11):
        real, syn = split_counts(512, ratio)
        assert 2 * (real + syn) == 512


def test_no_injured_training_slice_is_an_error_naming_organ_and_counts() -> None:
    index, labels = _real(n_pos=0, n_neg=50)
    with pytest.raises(ToolkitError, match=r"0 injured and 50 healthy real spleen"):
        Balancer(index, labels, epoch_size=64, ratio=0.0, seed=0, fold=2, organ="spleen")


def test_too_small_pool_says_how_many_to_generate() -> None:
    index, labels = _real()
    pool = np.r_[np.ones(5), np.zeros(300)]  # 256 * 0.5 / 2 = 64 per class, <= 4 uses each -> 16 needed
    with pytest.raises(ToolkitError, match=r"toolkit gen --organ liver --n 32`"):
        Balancer(index, labels, pool, epoch_size=256, ratio=0.5, seed=0, fold=0, organ="liver")
    with pytest.raises(ToolkitError, match=r"--n 64`"):  # half the pool were near copies
        Balancer(index, labels, pool, epoch_size=256, ratio=0.5, seed=0, fold=0, organ="liver",
                 near_copy_fraction=0.5)
    missing_class = np.zeros(300)
    with pytest.raises(ToolkitError, match="0 injured"):
        Balancer(index, labels, missing_class, epoch_size=256, ratio=0.5, seed=0, fold=0, organ="liver")
    # Enough slices: each used at most max_repeat times.
    plan = Balancer(index, labels, np.r_[np.ones(16), np.zeros(16)], epoch_size=256, ratio=0.5, seed=0,
                    fold=0).plan(0)
    syn = plan.index[plan.source == SYNTHETIC]
    assert np.unique(syn, return_counts=True)[1].max() <= 4


def test_bad_settings_are_refused() -> None:
    index, labels = _real()
    with pytest.raises(ToolkitError, match="synthetic_ratio"):
        Balancer(index, labels, epoch_size=64, ratio=1.5, seed=0, fold=0)
    with pytest.raises(ToolkitError, match="epoch_size"):
        Balancer(index, labels, epoch_size=63, ratio=0.0, seed=0, fold=0)
    with pytest.raises(ToolkitError, match="needs a synthetic pool"):
        Balancer(index, labels, None, epoch_size=64, ratio=0.5, seed=0, fold=0)


def test_series_position_ranks_slices_within_their_series() -> None:
    series = np.array([7, 7, 7, 9, 9, 3])
    z = np.array([-10.0, 20.0, 5.0, 1.0, 0.0, 4.0])
    assert series_position(series, z).tolist() == [0.0, 1.0, 0.5, 1.0, 0.0, 0.5]


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_matched_negatives_come_from_the_levels_of_the_injured_slices(share: float) -> None:
    # 20 series of 10 slices; injuries only on levels 0.3-0.5 (the organ's levels).
    position = np.tile(np.linspace(0.0, 1.0, 10), 20)
    labels = ((position > 0.25) & (position < 0.5) & (np.arange(200) < 100)).astype(np.int64)
    index = np.arange(200)
    plan = Balancer(index, labels, epoch_size=400, ratio=0.0, seed=0, fold=0,
                    real_position=position, matched_negatives=share).plan(0)

    negatives = plan.index[plan.label == 0]
    assert len(negatives) == 200 and labels[negatives].max() == 0
    at_level = (position > 0.25) & (position < 0.5)
    at_injury_levels = at_level[negatives].mean()
    uniform = at_level[labels == 0].mean()  # 20 of the 180 healthy slices
    assert at_injury_levels == pytest.approx(share + (1 - share) * uniform, abs=0.08)


def test_matched_negatives_need_positions_and_a_share_in_range() -> None:
    index, labels = _real()
    with pytest.raises(ToolkitError, match="real_position"):
        Balancer(index, labels, epoch_size=64, ratio=0.0, seed=0, fold=0, matched_negatives=0.5)
    with pytest.raises(ToolkitError, match="matched_negatives must lie in"):
        Balancer(index, labels, epoch_size=64, ratio=0.0, seed=0, fold=0,
                 real_position=np.zeros(len(index)), matched_negatives=1.5)


def test_soft_targets_ride_on_the_hard_classes() -> None:
    """Organ crops: the classes are balanced on the hard labels; each real sample carries its own soft target."""
    index, labels = _real(n_pos=10, n_neg=90)
    targets = np.where(labels > 0, 0.5 + np.arange(100) / 200.0, np.arange(100) / 250.0).astype(np.float32)
    synthetic = np.r_[np.ones(50), np.zeros(50)]
    kwargs = dict(epoch_size=128, ratio=0.25, seed=0, fold=2)
    soft = Balancer(index, labels, synthetic, real_targets=targets, **kwargs).plan(1)
    hard = Balancer(index, labels, synthetic, **kwargs).plan(1)
    # The same samples in the same order: only the real samples' targets differ.
    np.testing.assert_array_equal(soft.index, hard.index)
    np.testing.assert_array_equal(soft.source, hard.source)
    real = soft.source == REAL
    target_of = dict(zip(index, targets, strict=True))
    np.testing.assert_array_equal(soft.label[real], [target_of[i] for i in soft.index[real]])
    np.testing.assert_array_equal(soft.label[~real], hard.label[~real])
    assert ((soft.label[real] > 0) & (soft.label[real] < 1)).any()
    # Without soft targets the labels are the hard ones, as before.
    assert set(np.unique(hard.label[real])) == {0.0, 1.0}
    with pytest.raises(ToolkitError, match="one target in \\[0, 1\\] per real row"):
        Balancer(index, labels, synthetic, real_targets=targets[:5], **kwargs)
