"""The balancer: which slices make up each training epoch.

The synthetic ratio
-------------------
``r = cfg.train.synthetic_ratio`` is **the fraction of every epoch's training samples
drawn from the organ's synthetic pool**. Every epoch holds exactly
``E = cfg.train.epoch_size`` samples, whatever ``r``::

    n_synthetic = 2 * round(r * E / 2)     half injured, half healthy
    n_real      = E - n_synthetic          half injured, half healthy (real slices of the training folds)

so every ``r`` makes the same number of optimizer steps, the classes are balanced 1:1
overall and within each source, and ``r = 0`` is the count-matched real-only baseline
(the minority class is repeated to reach ``E / 2``).

Drawing within one class (``m`` samples from ``n`` candidates) takes whole shuffled
passes over the candidates, then ``m mod n`` of them without replacement, so no slice
repeats more than ``ceil(m / n)`` times. Synthetic slices may repeat at most
``cfg.train.synthetic_max_repeat`` times per epoch: a pool with fewer than
``ceil(m / max_repeat)`` usable slices of a class is refused with the ``toolkit gen``
command that makes enough. Real slices may repeat as often as needed (that is what
count-matching the minority class means).

Hard negatives
--------------
A CT series holds an organ on some of its slices only, while every injured slice shows
it: drawn uniformly, most healthy samples lack the organ and the classifier learns
"the organ is on this slice" instead of the injury (and then every patient's
organ-bearing slices score alike). A share ``h = cfg.train.matched_negatives`` of the
real healthy samples is therefore drawn *position-matched*: each slice's relative level
in its series (0 = lowest z, 1 = highest) is binned into ``POSITION_BINS`` bins, and
those healthy samples are spread over the bins as the real injured slices are, so they
come from the levels where injuries are and mostly show the organ. The other ``1 - h``
are drawn uniformly, so slices without the organ still teach "healthy". Where injured
slices spread over the whole series (patient labels on every slice) matching changes
little. Synthetic slices have no level and are drawn uniformly. A matched draw repeats
slices within its bin, so a healthy slice at a crowded level may come back more than
``ceil(m / n)`` times.

Soft targets
------------
Organ crops carry a soft target per slice (patient label x organ visibility, see
:mod:`toolkit.artifacts.crops`). The balancer stratifies on the hard label it is given and hands
each real sample its ``real_targets`` value as the training target (the loss is BCE with soft
targets); synthetic samples keep their class.

Counterfactual pairs
--------------------
A lesion set (``gen --mode lesion``) pairs every synthetic injured crop with its healthy source crop. With
``synthetic_pairs`` (``train.synthetic_pairs``) the synthetic healthy samples of an epoch are the twins of
its synthetic injured samples, and each twin sits next to its injured crop in the epoch's order (all samples
go in twos, so an even batch size keeps every pair in one batch): the classifier sees the same anatomy with
and without the lesion in one step. ``r = 0`` draws no synthetic sample, so its plan does not change.

Sampling uses ``np.random.default_rng([seed, fold, epoch])``: the plan of an epoch
depends on nothing else, which makes interrupted runs resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from toolkit.errors import ToolkitError

REAL: int = 0
SYNTHETIC: int = 1
POSITION_BINS: int = 10

Stratum = tuple[np.ndarray, int]
"""Candidates (store or pool rows) and how many samples of one epoch are drawn from them."""


@dataclass(frozen=True)
class EpochPlan:
    """The samples of one epoch, in training order.

    Attributes
    ----------
    source : ndarray of shape (epoch_size,), dtype=int8
        ``REAL`` (0) or ``SYNTHETIC`` (1).
    index : ndarray of shape (epoch_size,), dtype=int64
        Row of the real store (``source == REAL``) or of the synthetic pool.
    label : ndarray of shape (epoch_size,), dtype=float32
        Training target in [0, 1]: the real slice's target (its binary label unless ``real_targets``
        were given), the synthetic slice's class.
    """

    source: np.ndarray
    index: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


def split_counts(epoch_size: int, ratio: float) -> tuple[int, int]:
    """Per-class sample counts ``(real, synthetic)`` of one epoch; see the module docstring."""
    n_synthetic = 2 * int(round(ratio * epoch_size / 2))
    n_real = epoch_size - n_synthetic
    return n_real // 2, n_synthetic // 2


def gen_command_count(per_class: int, near_copy_fraction: float = 0.0) -> int:
    """Slices ``toolkit gen --n`` must write so that ``per_class`` usable ones of each class remain."""
    keep = max(1.0 - near_copy_fraction, 0.05)
    return int(math.ceil(2 * per_class / keep))


def series_position(series_id: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Relative level of every slice in its series: rank of ``z`` scaled to [0, 1] (0.5 if alone).

    Parameters
    ----------
    series_id, z : ndarray of shape (n,)
        Series of each slice and its position along the patient axis (mm).

    Returns
    -------
    ndarray of shape (n,), dtype=float64
    """
    frame = pd.DataFrame({"series": np.asarray(series_id), "z": np.asarray(z, dtype=np.float64)})
    rank = frame.groupby("series")["z"].rank(method="first").to_numpy() - 1.0
    count = frame.groupby("series")["z"].transform("size").to_numpy()
    return np.where(count > 1, rank / np.maximum(count - 1, 1), 0.5)


def _matched_counts(pos_bins: np.ndarray, neg_bins: np.ndarray, m: int) -> np.ndarray:
    """``m`` split over the bins as ``pos_bins`` are spread (largest remainder), bins without negatives skipped."""
    weight = np.bincount(pos_bins, minlength=POSITION_BINS).astype(np.float64)
    weight[np.bincount(neg_bins, minlength=POSITION_BINS) == 0] = 0.0
    if weight.sum() == 0:
        return np.zeros(POSITION_BINS, dtype=np.int64)
    share = weight / weight.sum() * m
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share, kind="stable")[: m - counts.sum()]] += 1
    return counts


def _position_strata(
    healthy: np.ndarray, healthy_bins: np.ndarray, injured_bins: np.ndarray, m: int, share: float
) -> list[Stratum]:
    """The ``m`` healthy draws: ``share`` of them per level bin as the injured slices lie, the rest uniform."""
    counts = _matched_counts(injured_bins, healthy_bins, int(round(share * m)))
    strata = [(healthy[healthy_bins == b], int(c)) for b, c in enumerate(counts) if c]
    return [*strata, (healthy, m - int(counts.sum()))]


def _draw(rng: np.random.Generator, candidates: np.ndarray, m: int) -> np.ndarray:
    """``m`` items of ``candidates``: whole shuffled passes, then a partial one without replacement."""
    if m == 0:
        return np.empty(0, dtype=np.int64)
    passes, rest = divmod(m, len(candidates))
    parts = [rng.permutation(candidates) for _ in range(passes)]
    parts.append(rng.choice(candidates, size=rest, replace=False))
    return np.concatenate(parts).astype(np.int64)


class Balancer:
    """Builds each epoch's class-balanced mix of real and synthetic slices for one fold.

    Parameters
    ----------
    real_index : ndarray of shape (n_real,), dtype=int64
        Store rows of the real slices allowed in training (the training folds only).
    real_labels : ndarray of shape (n_real,)
        Their binary (hard) labels: what the classes are balanced on.
    synthetic_labels : ndarray of shape (n_synthetic,), optional
        Binary labels of the usable synthetic pool (near copies already removed);
        ``plan().index`` of synthetic samples refers to positions in this array.
    epoch_size : int
        Samples per epoch, even.
    ratio : float
        The synthetic ratio ``r`` in [0, 1].
    seed, fold : int
        Seed the per-epoch generator together with the epoch.
    max_repeat : int, default=4
        Most times one synthetic slice may appear in one epoch.
    organ : str
        Named in error messages.
    near_copy_fraction : float, default=0.0
        Share of the synthetic pool flagged as near copies (sizes the suggested ``toolkit gen --n``).
    real_position : ndarray of shape (n_real,), optional
        Relative level of each real slice in its series (:func:`series_position`); needed when
        ``matched_negatives > 0``.
    matched_negatives : float, default=0.0
        Share ``h`` of the real healthy samples drawn position-matched to the injured slices.
    real_targets : ndarray of shape (n_real,), optional
        Soft training target of each real row, in [0, 1]; default: its binary label.
    synthetic_pairs : ndarray of shape (n_synthetic,), optional
        For each injured synthetic position, the position of its healthy twin in the pool (-1 for
        healthy positions): draw pairs together (see "Counterfactual pairs" above).
    """

    def __init__(
        self,
        real_index: np.ndarray,
        real_labels: np.ndarray,
        synthetic_labels: np.ndarray | None = None,
        *,
        epoch_size: int,
        ratio: float,
        seed: int,
        fold: int,
        max_repeat: int = 4,
        organ: str = "organ",
        near_copy_fraction: float = 0.0,
        real_position: np.ndarray | None = None,
        matched_negatives: float = 0.0,
        real_targets: np.ndarray | None = None,
        synthetic_pairs: np.ndarray | None = None,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ToolkitError(f"train.synthetic_ratio must lie in [0, 1], got {ratio}")
        if epoch_size < 2 or epoch_size % 2:
            raise ToolkitError(f"train.epoch_size must be an even number >= 2, got {epoch_size}")
        if max_repeat < 1:
            raise ToolkitError(f"train.synthetic_max_repeat must be >= 1, got {max_repeat}")
        self.real_index = np.asarray(real_index, dtype=np.int64)
        real_labels = np.asarray(real_labels) > 0
        if len(real_labels) != len(self.real_index):
            raise ToolkitError(
                f"balancer got {len(self.real_index)} real rows but {len(real_labels)} labels"
            )
        targets = real_labels.astype(np.float32) if real_targets is None else np.asarray(real_targets, np.float32)
        if len(targets) != len(self.real_index) or not ((targets >= 0) & (targets <= 1)).all():
            raise ToolkitError(f"balancer needs one target in [0, 1] per real row ({len(self.real_index)})")
        # Store row -> target, for the rows an epoch draws.
        self._target_of = pd.Series(targets, index=self.real_index)
        self.epoch_size = int(epoch_size)
        self.ratio = float(ratio)
        self.seed = int(seed)
        self.fold = int(fold)
        self.organ = organ
        self.real_per_class, self.synthetic_per_class = split_counts(self.epoch_size, self.ratio)
        self._twin: np.ndarray | None = None

        if not 0.0 <= matched_negatives <= 1.0:
            raise ToolkitError(f"train.matched_negatives must lie in [0, 1], got {matched_negatives}")
        if matched_negatives > 0 and (real_position is None or len(real_position) != len(self.real_index)):
            raise ToolkitError("balancer: matched_negatives > 0 needs one real_position per real row")
        healthy, injured = self.real_index[~real_labels], self.real_index[real_labels]
        if self.real_per_class and (len(injured) == 0 or len(healthy) == 0):
            raise ToolkitError(
                f"the training folds of fold {fold} hold {len(injured)} injured and {len(healthy)} healthy real "
                f"{organ} slices; both classes are needed: skip this organ (--organ) or use fewer folds (--folds)"
            )
        healthy_strata: list[Stratum] = [(healthy, self.real_per_class)]
        if matched_negatives > 0:
            bins = np.minimum((np.asarray(real_position) * POSITION_BINS).astype(np.int64), POSITION_BINS - 1)
            healthy_strata = _position_strata(
                healthy, bins[~real_labels], bins[real_labels], self.real_per_class, matched_negatives
            )
        # (source, label, strata) in drawing order: one epoch draws every stratum once.
        self._classes: list[tuple[int, int, list[Stratum]]] = [
            (REAL, 0, healthy_strata),
            (REAL, 1, [(injured, self.real_per_class)]),
        ]

        if self.synthetic_per_class:
            if synthetic_labels is None:
                raise ToolkitError(
                    f"synthetic ratio {ratio:g} needs a synthetic pool for {organ}: "
                    f"run `toolkit gen --organ {organ}` or pass --synthetic-ratio 0"
                )
            syn = np.asarray(synthetic_labels) > 0
            pool = {"healthy": np.flatnonzero(~syn), "injured": np.flatnonzero(syn)}
            need = math.ceil(self.synthetic_per_class / max_repeat)
            if min(len(c) for c in pool.values()) < need:
                n = gen_command_count(need, near_copy_fraction)
                raise ToolkitError(
                    f"synthetic pool for {organ} has {len(pool['injured'])} injured and {len(pool['healthy'])} "
                    f"healthy usable slices; ratio {ratio:g} x epoch_size {epoch_size} needs >= {need} of each "
                    f"(each used <= {max_repeat} times per epoch): run `toolkit gen --organ {organ} --n {n}`"
                )
            self._classes += [
                (SYNTHETIC, 0, [(pool["healthy"], self.synthetic_per_class)]),
                (SYNTHETIC, 1, [(pool["injured"], self.synthetic_per_class)]),
            ]
            if synthetic_pairs is not None:
                twins = np.asarray(synthetic_pairs, dtype=np.int64)
                if len(twins) != len(syn) or (twins[syn] < 0).any() or syn[twins[syn]].any():
                    raise ToolkitError(
                        f"balancer: synthetic_pairs must give every injured synthetic {organ} crop a healthy twin"
                    )
                self._twin = twins

    def plan(self, epoch: int) -> EpochPlan:
        """The shuffled samples of ``epoch`` (depends only on seed, fold and epoch)."""
        rng = np.random.default_rng([self.seed, self.fold, int(epoch)])
        if self._twin is not None:
            return self._paired_plan(rng)
        sources, indices, labels = [], [], []
        for source, label, strata in self._classes:
            drawn = np.concatenate([_draw(rng, candidates, m) for candidates, m in strata])
            indices.append(drawn)
            sources.append(np.full(len(drawn), source, dtype=np.int8))
            if source == REAL:
                labels.append(self._target_of.loc[drawn].to_numpy(np.float32))
            else:
                labels.append(np.full(len(drawn), label, dtype=np.float32))
        order = rng.permutation(self.epoch_size)
        return EpochPlan(
            source=np.concatenate(sources)[order],
            index=np.concatenate(indices)[order],
            label=np.concatenate(labels)[order],
        )

    def _paired_plan(self, rng: np.random.Generator) -> EpochPlan:
        """The plan with counterfactual pairs: injured synthetic draws, their twins, order in units of two."""
        real_index, real_label = [], []
        injured = np.zeros(0, np.int64)
        for source, label, strata in self._classes:
            if source == SYNTHETIC:
                if label == 1:
                    injured = np.concatenate([_draw(rng, candidates, m) for candidates, m in strata])
                continue
            drawn = np.concatenate([_draw(rng, candidates, m) for candidates, m in strata])
            real_index.append(drawn)
            real_label.append(self._target_of.loc[drawn].to_numpy(np.float32))
        twin = self._twin if self._twin is not None else np.zeros(0, np.int64)
        shuffle = rng.permutation(sum(len(r) for r in real_index))  # real samples pair off at random
        reals, real_targets = np.concatenate(real_index)[shuffle], np.concatenate(real_label)[shuffle]
        n_real, m = len(reals), len(injured)
        # Units of two positions: real samples paired off at random, and each (injured, twin) pair.
        source = np.concatenate([np.full(n_real, REAL), np.tile([SYNTHETIC, SYNTHETIC], m)]).astype(np.int8)
        index = np.concatenate([reals, np.stack([injured, twin[injured]], axis=1).ravel()])
        label = np.concatenate([real_targets, np.tile(np.array([1.0, 0.0], np.float32), m)])
        units = rng.permutation(len(index) // 2)
        order = np.stack([2 * units, 2 * units + 1], axis=1).ravel()
        return EpochPlan(source=source[order], index=index[order], label=label[order])
