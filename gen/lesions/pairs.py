"""Counterfactual pairs: which healthy crop each synthetic injury is drawn into, and with which mask.

Every synthetic injured crop keeps its healthy source (a row of the real organ-crop set) and its
lesion mask, so a classifier can be shown the same anatomy with and without the injury, and an
audit can ask whether the classifier looks at the lesion. The plan is drawn first
(:func:`plan_lesions`: sources, classes, kinds, grades, masks), then any filler (procedural,
diffusion, GAN) turns it into images, and :class:`LesionSamples` holds both for the synthetic set.

Only training-split crops may be sources: a synthetic crop carries its source patient
(``source_patients``), and a classifier's K-fold must treat it as that patient's data (never
train on a crop whose source patient is in the validation fold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gen.lesions.shapes import create_lesion_mask, grades_for_class
from toolkit.config import LesionGenConfig
from toolkit.errors import ConfigError, DataError

MIN_ORGAN_PX = 32
"""Fewest organ pixels a healthy crop needs to receive a lesion (below it the organ is a sliver)."""


def eligible_sources(labels: np.ndarray, organ_masks: np.ndarray, min_organ_px: int = MIN_ORGAN_PX) -> np.ndarray:
    """Rows of healthy crops (label 0) whose organ mask has at least ``min_organ_px`` pixels.

    Parameters
    ----------
    labels : ndarray of shape (N,), int
    organ_masks : ndarray of shape (N, H, W), bool

    Returns
    -------
    ndarray of shape (k,), int64, sorted
    """
    labels = np.asarray(labels)
    if len(labels) != len(organ_masks):
        raise DataError(f"got {len(labels)} labels but {len(organ_masks)} organ masks")
    area = np.asarray(organ_masks, dtype=bool).reshape(len(labels), -1).sum(axis=1)
    return np.flatnonzero((labels == 0) & (area >= min_organ_px)).astype(np.int64)


def choose_sources(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` source rows drawn from ``candidates`` evenly: each used ``n // k`` or ``n // k + 1`` times."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if len(candidates) == 0:
        raise DataError("no healthy crops with enough organ to draw lesions into; check the organ masks")
    rounds = -(-n // len(candidates))
    return np.concatenate([rng.permutation(candidates) for _ in range(rounds)])[:n]


@dataclass
class LesionPlan:
    """What to draw where: one row per synthetic injured crop.

    Attributes
    ----------
    source_rows : ndarray of shape (n,), int64
        Row of the healthy source crop in the organ-crop set.
    classes : ndarray of shape (n,), int64
        Class the synthetic crop is labelled with (1 injured, or 1 low / 2 high).
    kinds : ndarray of shape (n,), str
        Lesion kind (:data:`gen.lesions.shapes.LESION_SHAPES`).
    grades : ndarray of shape (n,), int64
        Grade 1-3 the lesion's size was drawn for.
    lesion_masks : ndarray of shape (n, H, W), bool
        Inside the source crop's organ mask.
    """

    source_rows: np.ndarray
    classes: np.ndarray
    kinds: np.ndarray
    grades: np.ndarray
    lesion_masks: np.ndarray

    def __len__(self) -> int:
        return len(self.source_rows)


def plan_lesions(
    organ: str,
    organ_masks: np.ndarray,
    source_rows: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    rng: np.random.Generator,
    spacing: float | np.ndarray = 1.0,
    cfg: LesionGenConfig | None = None,
) -> LesionPlan:
    """Draw a lesion (kind, grade, mask) for each requested synthetic crop.

    Parameters
    ----------
    organ : str
        Picks the kinds (``cfg.injuries[organ]``, one drawn uniformly per crop).
    organ_masks : ndarray of shape (N, H, W), bool
        Organ masks of the whole crop set ``source_rows`` index.
    source_rows : ndarray of shape (n,), int
        Healthy crop each lesion goes into (:func:`choose_sources`).
    classes : ndarray of shape (n,), int
        Class of each synthetic crop, > 0; its name (``class_names``) picks the grades
        (:func:`gen.lesions.shapes.grades_for_class`).
    class_names : sequence of str
        E.g. ``["healthy", "injured"]`` or ``["healthy", "low", "high"]``.
    rng : np.random.Generator
    spacing : float or ndarray of shape (N,), default=1.0
        mm per pixel of each crop of the set.
    cfg : LesionGenConfig, optional

    Returns
    -------
    LesionPlan
    """
    cfg = cfg or LesionGenConfig()
    if organ not in cfg.injuries:
        raise ConfigError(f"gen.lesion.injuries has no entry for '{organ}'; add the lesion kinds to draw into it")
    masks = np.asarray(organ_masks, dtype=bool)
    source_rows = np.asarray(source_rows, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int64)
    if masks.ndim != 3 or len(source_rows) != len(classes):
        raise DataError(
            f"need organ masks of shape (N, H, W) and one class per source row; got masks {masks.shape}, "
            f"{len(source_rows)} rows and {len(classes)} classes"
        )
    if len(source_rows) and (source_rows.min() < 0 or source_rows.max() >= len(masks)):
        raise DataError(
            f"source rows must index the {len(masks)} organ masks, got {source_rows.min()}..{source_rows.max()}"
        )
    if (classes <= 0).any() or (classes >= len(class_names)).any():
        raise DataError(f"lesion classes must lie in 1..{len(class_names) - 1} ({', '.join(class_names[1:])})")
    spacings = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (len(masks),))
    kinds_pool = list(cfg.injuries[organ])
    kinds, grades, out = [], [], np.zeros((len(source_rows), *masks.shape[1:]), dtype=bool)
    for i, (row, cls) in enumerate(zip(source_rows, classes, strict=True)):
        kind = kinds_pool[int(rng.integers(len(kinds_pool)))]
        options = grades_for_class(class_names[cls])
        grade = int(options[int(rng.integers(len(options)))])
        out[i] = create_lesion_mask(kind, grade, cfg)(masks[row], rng, spacing=float(spacings[row]))
        kinds.append(kind)
        grades.append(grade)
    return LesionPlan(
        source_rows=source_rows,
        classes=classes,
        kinds=np.array(kinds, dtype=object),
        grades=np.array(grades, dtype=np.int64),
        lesion_masks=out,
    )


@dataclass
class LesionSamples:
    """Synthetic injured crops and their counterfactual pairs: what ``SyntheticSet`` mode "lesion" stores.

    Attributes
    ----------
    images_hu : ndarray of shape (n, H, W)
        The injured crops, HU; equal to their source crop outside ``plan.lesion_masks``.
    plan : LesionPlan
        Source rows, classes, kinds, grades and lesion masks.
    source_patients : ndarray of shape (n,), int64
        Patient id of each source crop.
    method : {"procedural", "diffusion", "gan"}
        What filled the lesions.
    """

    images_hu: np.ndarray
    plan: LesionPlan
    source_patients: np.ndarray
    method: str

    def __post_init__(self) -> None:
        n = len(self.plan)
        if len(self.images_hu) != n or len(self.source_patients) != n:
            raise DataError(
                f"lesion samples need one image and one source patient per plan row ({n}), got "
                f"{len(self.images_hu)} and {len(self.source_patients)}"
            )

    def __len__(self) -> int:
        return len(self.plan)


def training_plan(
    organ: str,
    labels: np.ndarray,
    organ_masks: np.ndarray,
    class_names: Sequence[str],
    rng: np.random.Generator,
    spacing: float | np.ndarray = 1.0,
    cfg: LesionGenConfig | None = None,
) -> LesionPlan:
    """The lesion GAN's training triples: ``cfg.gan_masks_per_source`` lesions per eligible healthy crop.

    Each gets a class drawn uniformly among the injured classes (1..n_classes-1) and a mask from
    the shape priors of that class's grades, as at sampling time (:func:`plan_lesions`).

    Parameters
    ----------
    organ : str
    labels : ndarray of shape (N,), int
        Class of each training crop (sources are the healthy ones, :func:`eligible_sources`).
    organ_masks : ndarray of shape (N, H, W), bool
    class_names : sequence of str
    rng : np.random.Generator
    spacing : float or ndarray of shape (N,), default=1.0
    cfg : LesionGenConfig, optional
    """
    cfg = cfg or LesionGenConfig()
    sources = np.repeat(eligible_sources(labels, organ_masks), cfg.gan_masks_per_source)
    if len(sources) == 0:
        raise DataError(f"no healthy {organ} crops with >= {MIN_ORGAN_PX} organ pixels to train the lesion GAN on")
    classes = rng.integers(1, len(class_names), len(sources))
    return plan_lesions(organ, organ_masks, sources, classes, class_names, rng, spacing=spacing, cfg=cfg)
