"""Training data of the organ localizer: which series, their slices and masks, augmentation.

Only series with a real mask (``mask_source``) of TRAIN-split patients are trained on; a share
of those patients is held out to measure Dice, and annotated test-split series are only ever
measured (:func:`split_annotated`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from seg.store import has_mask
from toolkit.transforms import window_hu

FIT, HOLDOUT, TEST = "fit", "holdout", "test"


@dataclass
class AnnotatedSplit:
    """Store rows of annotated series by role.

    ``fit``: trained on; ``holdout``: annotated training-split patients never trained on;
    ``test``: annotated test-split series, never trained on. Arrays are store row indices.
    """

    fit: np.ndarray
    holdout: np.ndarray
    test: np.ndarray

    def rows(self, group: str) -> np.ndarray:
        return {FIT: self.fit, HOLDOUT: self.holdout, TEST: self.test}[group]


def split_annotated(table: pd.DataFrame, holdout_fraction: float, seed: int) -> AnnotatedSplit:
    """Assign the annotated series' rows to fit / holdout / test, grouped by patient.

    ``round(holdout_fraction * n)`` of the ``n`` annotated training patients (at least one when
    ``holdout_fraction > 0`` and ``n >= 2``, and never all of them) are held out, drawn with
    ``seed``. Test-split rows are never fit.

    Returns
    -------
    AnnotatedSplit
    """
    masked = has_mask(table)
    split = table["split"].astype(str).to_numpy()
    train_rows = masked & (split == "train")
    patients = np.unique(table.loc[train_rows, "patient_id"].to_numpy())
    n_hold = 0
    if holdout_fraction > 0 and len(patients) >= 2:
        n_hold = min(len(patients) - 1, max(1, int(round(holdout_fraction * len(patients)))))
    held = np.random.default_rng(seed).permutation(patients)[:n_hold]
    is_held = table["patient_id"].isin(held).to_numpy()
    return AnnotatedSplit(
        fit=np.flatnonzero(train_rows & ~is_held),
        holdout=np.flatnonzero(train_rows & is_held),
        test=np.flatnonzero(masked & (split == "test")),
    )


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of label maps (n, H, H) to (n, size, size) (codes stay codes)."""
    labels = np.asarray(labels)
    h = labels.shape[-1]
    if h == size:
        return labels.copy()
    idx = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    return labels[:, idx][:, :, idx]


class SegmentDataset(Dataset):
    """Slices and label maps held in memory at the network's size, in a seeded order per epoch.

    Holds plain numpy arrays (no open files), so it pickles into spawned DataLoader workers.

    Parameters
    ----------
    hu : ndarray of shape (n, S, S), dtype=int16
        Resized HU slices.
    labels : ndarray of shape (n, S, S), dtype=uint8
        Label codes.
    windows : list of (level, width)
        HU windows, one input channel each.
    seed : int
        With the epoch, fixes the order (:meth:`reorder`).
    """

    def __init__(self, hu: np.ndarray, labels: np.ndarray, windows: list[list[float]], seed: int) -> None:
        self.hu = hu
        self.labels = labels
        self.windows = windows
        self.seed = seed
        self.order = np.arange(len(hu))

    def reorder(self, epoch: int) -> None:
        """Shuffle for ``epoch``: the same order for the same (seed, epoch), also after a resume.

        Not ``set_epoch``: accelerate calls that with its own pass count.
        """
        self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.hu))

    def __len__(self) -> int:
        return len(self.hu)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.order[i])
        return {
            "x": torch.from_numpy(window_hu(self.hu[j], self.windows)),
            "y": torch.from_numpy(self.labels[j].astype(np.int64))[None],
        }


def create_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A DataLoader in the dataset's order; workers are spawned (safe with CUDA and on macOS)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        multiprocessing_context="spawn" if num_workers > 0 else None,
        persistent_workers=False,  # a new epoch's order reaches fresh workers
    )


class RandAffineIntensity:
    """Random rotation, scale, shift and contrast on a batch of slices and their label maps.

    Labels are resampled with nearest neighbours, so they stay codes. No flips: a mirrored
    abdomen would swap the left and right kidney. Draws from torch's global generator (seeded
    per epoch by the trainer).

    Parameters
    ----------
    degrees : float, default=10
    scale : (float, float), default=(0.9, 1.1)
    translate : float, default=0.06
        Largest shift as a share of the side.
    contrast : (float, float), default=(0.85, 1.15)
    brightness : float, default=0.05
    """

    def __init__(
        self,
        degrees: float = 10.0,
        scale: tuple[float, float] = (0.9, 1.1),
        translate: float = 0.06,
        contrast: tuple[float, float] = (0.85, 1.15),
        brightness: float = 0.05,
    ) -> None:
        self.degrees = degrees
        self.scale = scale
        self.translate = translate
        self.contrast = contrast
        self.brightness = brightness

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, S, S) float in [0, 1]; y: (B, 1, S, S) int64 -> the same shapes."""
        b, device = x.shape[0], x.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(b, device=device) * (high - low) + low

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180.0)
        s = uniform(*self.scale)
        tx, ty = uniform(-self.translate, self.translate) * 2, uniform(-self.translate, self.translate) * 2
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
        gain = uniform(*self.contrast).view(b, 1, 1, 1)
        shift = uniform(-self.brightness, self.brightness).view(b, 1, 1, 1)
        x = ((x - 0.5) * gain + 0.5 + shift).clamp(0.0, 1.0)
        return x, y
