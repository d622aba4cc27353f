"""Pure array -> array transforms on CT slices (no I/O).

Windowing maps Hounsfield units to display intensities when slices are loaded;
the store keeps raw HU so a different window never needs a re-ingest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ABDOMEN_WINDOW: tuple[float, float] = (40.0, 400.0)
"""(level, width) in HU of the standard soft-tissue abdomen window."""


def window_hu(hu: np.ndarray, windows: Sequence[Sequence[float]] = (ABDOMEN_WINDOW,)) -> np.ndarray:
    """Window Hounsfield units into [0, 1], one channel per window.

    Parameters
    ----------
    hu : ndarray of shape (..., H, W)
        Hounsfield units (any numeric dtype).
    windows : sequence of (level, width)
        Each window becomes one channel.

    Returns
    -------
    ndarray of shape (..., C, H, W), dtype=float32, values in [0, 1]
    """
    hu = np.asarray(hu, dtype=np.float32)
    channels = []
    for level, width in windows:
        low = level - width / 2.0
        channels.append(np.clip((hu - low) / float(width), 0.0, 1.0))
    return np.stack(channels, axis=-3).astype(np.float32, copy=False)


def unwindow_hu(x: np.ndarray, window: Sequence[float] = ABDOMEN_WINDOW) -> np.ndarray:
    """Inverse of :func:`window_hu` for one channel: [0, 1] -> int16 HU (values outside the window are lost).

    Parameters
    ----------
    x : ndarray of shape (..., H, W), values in [0, 1]

    Returns
    -------
    ndarray of shape (..., H, W), dtype=int16
    """
    level, width = window
    hu = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * float(width) + (level - width / 2.0)
    return np.round(hu).astype(np.int16)


class WindowHU:
    """Callable form of :func:`window_hu` for pipelines."""

    def __init__(self, windows: Sequence[Sequence[float]] = (ABDOMEN_WINDOW,)) -> None:
        self.windows = [tuple(float(v) for v in w) for w in windows]

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        return window_hu(hu, self.windows)


def resize_slices(images: np.ndarray, size: int) -> np.ndarray:
    """Resize float or HU slices (n, H, W) to (n, size, size) with area/bilinear interpolation (torch)."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(images, dtype=np.float32)
    if arr.shape[-2:] == (size, size):
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1)
    mode = "area" if arr.shape[-1] > size else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=(size, size), mode=mode, **kwargs).squeeze(1).numpy()
