"""Slices in, batches out: in-memory resizing, batch-indexed datasets, windowing, augmentation.

HU slices are resized once to ``cfg.train.image_size`` and kept in memory as int16
(``resize_hu``), so the training loop never touches the memory-mapped store or
resizes again. A dataset hands out whole batches (``__getitems__``: one fancy index
into that array, no per-slice Python); windowing (:func:`window_tensor`), augmentation
and normalisation then run as batched tensor ops where the batch lives, on the device
(:class:`SliceTransform`). Only the int16 HU travel to the device (half the bytes of float32).

Every class here is module-level so DataLoader workers can be spawned (macOS, Windows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from toolkit.transforms import resize_slices
from train.balancer import REAL, Balancer, EpochPlan

_CHUNK = 512  # slices resized per step: bounds the float32 working copy


def resize_hu(images: np.ndarray, size: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Resize HU slices to ``(size, size)`` into memory, chunk by chunk.

    Parameters
    ----------
    images : ndarray of shape (n, H, W)
        Hounsfield units; may be a memory map (only ``rows`` are read).
    size : int
        Output pixels per side.
    rows : ndarray of shape (m,), optional
        Rows to read (default: all).

    Returns
    -------
    ndarray of shape (m, size, size), dtype=int16
        Rounded HU, so memory stays at 2 bytes per pixel.
    """
    rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), size, size), dtype=np.int16)
    for start in range(0, len(rows), _CHUNK):
        chunk = np.asarray(images[rows[start : start + _CHUNK]], dtype=np.float32)
        out[start : start + len(chunk)] = np.round(resize_slices(chunk, size)).astype(np.int16)
    return out


def window_tensor(hu: torch.Tensor, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """Window HU into [0, 1], one channel per window: the tensor form of :func:`toolkit.transforms.window_hu`.

    Parameters
    ----------
    hu : tensor of shape (B, H, W)
        Hounsfield units, any dtype, on any device.
    windows : sequence of (level, width)

    Returns
    -------
    tensor of shape (B, C, H, W), float32, on ``hu``'s device
        The same float32 values as ``window_hu`` (same operations in the same order).
    """
    hu = hu.float()
    channels = [((hu - (level - width / 2.0)) / float(width)).clamp_(0.0, 1.0) for level, width in windows]
    return torch.stack(channels, dim=1)


class RandSliceAugment:
    """Random affine + intensity + cutout on a batch of windowed slices (tensors in [0, 1]).

    Per sample: rotation in ``[-degrees, degrees]``, isotropic scale in ``scale``, shift up
    to ``translate`` of the side, brightness shift up to ``brightness``, contrast factor in
    ``contrast``, and with probability ``cutout_p`` one square of side ``cutout`` x H set to 0.

    The random numbers (a few per sample) are drawn on the CPU from ``generator``, so a seed
    gives the same augmentation on every device; the image work runs on ``x``'s device.

    Parameters
    ----------
    degrees, scale, translate, brightness, contrast, cutout_p, cutout :
        Ranges as above.
    """

    def __init__(
        self,
        degrees: float = 10.0,
        scale: tuple[float, float] = (0.9, 1.1),
        translate: float = 0.06,
        brightness: float = 0.1,
        contrast: tuple[float, float] = (0.85, 1.15),
        cutout_p: float = 0.5,
        cutout: float = 0.2,
    ) -> None:
        self.degrees = degrees
        self.scale = scale
        self.translate = translate
        self.brightness = brightness
        self.contrast = contrast
        self.cutout_p = cutout_p
        self.cutout = cutout

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x : tensor of shape (B, C, H, W), float32 in [0, 1] -> same shape, same device."""
        b, _, h, w = x.shape
        device = x.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(b, generator=generator) * (high - low) + low

        # Every draw first, in a fixed order (the augmentation's random stream), then to the device.
        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180.0)
        scale = uniform(*self.scale)
        shift = torch.stack([uniform(-self.translate, self.translate) for _ in range(2)], 1) * 2.0
        gain = uniform(*self.contrast)
        offset = uniform(-self.brightness, self.brightness)
        cy, cx = uniform(0, h), uniform(0, w)
        keep = torch.rand(b, generator=generator) >= self.cutout_p

        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        ).to(device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        gain, offset = gain.to(device).view(b, 1, 1, 1), offset.to(device).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * gain + mean + offset).clamp_(0.0, 1.0)

        half = self.cutout * h / 2.0
        yy = torch.arange(h, dtype=torch.float32, device=device).view(1, h, 1)
        xx = torch.arange(w, dtype=torch.float32, device=device).view(1, 1, w)
        cy, cx, keep = cy.to(device).view(b, 1, 1), cx.to(device).view(b, 1, 1), keep.to(device).view(b, 1, 1)
        hole = ((yy - cy).abs() < half) & ((xx - cx).abs() < half) & ~keep
        return x * (~hole).unsqueeze(1).to(x.dtype)


class SliceDataset(Dataset):
    """Slices listed by ``(source, index)`` from an in-memory real array and an optional synthetic one.

    Parameters
    ----------
    real : ndarray of shape (n_real, S, S), dtype=int16
        Resized HU of the real store (``resize_hu``); ``index`` of REAL samples are its rows.
    synthetic : ndarray of shape (n_syn, S, S), dtype=int16, optional
        Resized HU of the usable synthetic pool.
    source, index, label : ndarray of shape (n,)
        What each item is (see :class:`train.balancer.EpochPlan`).
    seeds : ndarray of shape (n,), dtype=int64, optional
        Augmentation seed of each item (a batch uses its first item's).

    Batches (:meth:`__getitems__`, what a DataLoader fetches) are dicts: ``hu`` (B, S, S) int16,
    ``y`` (B,) float32, ``index`` and ``source`` (B,) int64, ``seed`` (int).
    """

    def __init__(
        self,
        real: np.ndarray,
        synthetic: np.ndarray | None,
        source: np.ndarray,
        index: np.ndarray,
        label: np.ndarray,
        seeds: np.ndarray | None = None,
    ) -> None:
        # Tensors share their storage with DataLoader workers instead of being copied to each.
        self.real = torch.from_numpy(np.ascontiguousarray(real))
        self.synthetic = None if synthetic is None else torch.from_numpy(np.ascontiguousarray(synthetic))
        self._set_items(source, index, label, seeds)

    def _set_items(
        self, source: np.ndarray, index: np.ndarray, label: np.ndarray, seeds: np.ndarray | None
    ) -> None:
        self.source = np.asarray(source, dtype=np.int8)
        self.index = np.asarray(index, dtype=np.int64)
        self.label = np.asarray(label, dtype=np.float32)
        self.seeds = np.zeros(len(self.index), np.int64) if seeds is None else np.asarray(seeds, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, positions: Sequence[int]) -> dict[str, Any]:
        """The batch of items at ``positions``: one gather per source, no per-item Python."""
        positions = np.asarray(positions, dtype=np.int64)
        source, index = self.source[positions], self.index[positions]
        is_real = source == REAL
        if is_real.all():
            hu = self.real[torch.from_numpy(index)]
        else:
            hu = torch.empty((len(positions), *self.real.shape[1:]), dtype=self.real.dtype)
            hu[torch.from_numpy(is_real)] = self.real[torch.from_numpy(index[is_real])]
            hu[torch.from_numpy(~is_real)] = self.synthetic[torch.from_numpy(index[~is_real])]
        return {
            "hu": hu,
            "y": torch.from_numpy(self.label[positions]),
            "index": torch.from_numpy(index),
            "source": torch.from_numpy(source.astype(np.int64)),
            "seed": int(self.seeds[positions[0]]) if len(positions) else 0,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Item ``i`` as a batch of one."""
        return self.__getitems__([i])


class BalancedEpochDataset(SliceDataset):
    """The training set of one fold: :meth:`set_epoch` draws that epoch's plan from a :class:`Balancer`."""

    def __init__(
        self, real: np.ndarray, synthetic: np.ndarray | None, balancer: Balancer, seed: int
    ) -> None:
        self.balancer = balancer
        self.seed = int(seed)
        self.plan: EpochPlan | None = None
        super().__init__(real, synthetic, np.zeros(0), np.zeros(0), np.zeros(0))
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.plan = self.balancer.plan(epoch)
        rng = np.random.default_rng([self.seed, self.balancer.fold, self.epoch, 1])
        seeds = rng.integers(0, 2**62, size=len(self.plan))
        self._set_items(self.plan.source, self.plan.index, self.plan.label, seeds)


def batch_as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate_fn: ``__getitems__`` already returns a whole batch."""
    return batch


def memory_format_for(device: torch.device) -> torch.memory_format:
    """``channels_last`` on CPU and CUDA, where oneDNN / cuDNN run MobileNet's depthwise convolutions
    faster in it (CPU, 64 px: ~1.5x per training step, ~2x per inference batch); MPS keeps NCHW."""
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


class SliceTransform:
    """HU batch -> model input on the batch's device: window into channels, augment, normalise.

    Parameters
    ----------
    windows : sequence of (level, width)
        One channel per window (:func:`window_tensor`).
    mean, std : sequence of float, one per channel
        Normalisation of the windowed [0, 1] values (the model's ``pretrained_cfg``).
    augment : RandSliceAugment, optional
        Applied with a CPU generator seeded by the batch's ``seed`` (its first item's).
    memory_format : torch.memory_format, default=torch.contiguous_format
        Layout of the returned tensor (``torch.channels_last`` for a channels-last model).

    Call with a batch dict (``hu`` (B, S, S) on any device, ``seed``) -> (B, C, S, S) float32.
    """

    def __init__(
        self,
        windows: Sequence[Sequence[float]],
        mean: Sequence[float],
        std: Sequence[float],
        augment: RandSliceAugment | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.windows = [tuple(float(v) for v in w) for w in windows]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self.memory_format = memory_format

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        hu = batch["hu"]
        if self.mean.device != hu.device:  # once per device
            self.mean, self.std = self.mean.to(hu.device), self.std.to(hu.device)
        x = window_tensor(hu, self.windows)
        if self.augment is not None:
            x = self.augment(x, torch.Generator().manual_seed(int(batch["seed"])))
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)


def create_loader(dataset: SliceDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A DataLoader of whole batches in dataset order (training order is already shuffled by the balancer)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=batch_as_is,
        persistent_workers=False,  # workers re-read the dataset each epoch, after set_epoch
    )
