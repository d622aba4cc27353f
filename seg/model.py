"""The organ localizer: MONAI's 2D UNet, with its preprocessing saved beside the weights.

A checkpoint is a folder with ``config.json`` (network shape, input size, HU windows, label
codes) and ``model.safetensors``; :meth:`OrganSegmenter.from_pretrained` rebuilds it, so a
checkpoint knows how to prepare its own input (as timm's ``pretrained_cfg`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from seg.store import SEG_LABELS
from toolkit.config import SegmentConfig
from toolkit.errors import ConfigError, DataError
from toolkit.transforms import resize_slices, window_hu

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class OrganSegmenter(nn.Module):
    """A 2D UNet (``monai.networks.nets.UNet``) mapping windowed CT slices to organ logits.

    Parameters
    ----------
    image_size : int
        Input pixels per side; a multiple of ``2 ** (len(channels) - 1)``.
    windows : list of (level, width)
        HU windows of the input channels.
    channels : list of int
        Feature maps per UNet level (stride 2 between levels).
    num_res_units : int
        Residual units per block (0: plain convolutions).
    labels : dict of str to int
        Label code per organ; the network predicts ``len(labels) + 1`` classes (0 = background).
    """

    def __init__(
        self,
        image_size: int,
        windows: list[list[float]],
        channels: list[int],
        num_res_units: int = 1,
        labels: dict[str, int] | None = None,
    ) -> None:
        from monai.networks.nets import UNet

        super().__init__()
        labels = dict(labels or SEG_LABELS)
        self.config: dict[str, Any] = {
            "arch": "monai.networks.nets.UNet",
            "image_size": int(image_size),
            "windows": [[float(v) for v in w] for w in windows],
            "channels": [int(c) for c in channels],
            "num_res_units": int(num_res_units),
            "labels": labels,
        }
        self.net = UNet(
            spatial_dims=2,
            in_channels=len(windows),
            out_channels=len(labels) + 1,
            channels=tuple(channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
            # Batch norm: on a CPU about 3x faster per step than MONAI's default instance norm here.
            norm="batch",
        )

    @classmethod
    def from_config(cls, sc: SegmentConfig) -> OrganSegmenter:
        """A new, randomly initialised segmenter shaped by ``cfg.segment``."""
        return cls(sc.image_size, sc.windows, sc.channels, sc.num_res_units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, n_classes, S, S) for windowed input (B, C, S, S)."""
        return self.net(x)

    def preprocess(self, hu: np.ndarray) -> np.ndarray:
        """HU slices (n, H, W) -> network input (n, C, S, S), float32 in [0, 1].

        Resized HU are rounded to integers, as the training slices were held (int16).
        """
        size = self.config["image_size"]
        return window_hu(np.round(resize_slices(np.asarray(hu, np.float32), size)), self.config["windows"])

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` (+ ``extra`` keys) and ``model.safetensors`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / (WEIGHTS_NAME + ".tmp")))
        (directory / CONFIG_NAME).write_text(json.dumps({**self.config, **(extra or {})}, indent=2))
        (directory / (WEIGHTS_NAME + ".tmp")).replace(directory / WEIGHTS_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> OrganSegmenter:
        """Rebuild a saved segmenter (on the CPU, in eval mode)."""
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).exists():
            raise DataError(f"no segmenter checkpoint at {directory / WEIGHTS_NAME}; run `toolkit segment`")
        config = json.loads((directory / CONFIG_NAME).read_text())
        model = cls(
            config["image_size"], config["windows"], config["channels"], config["num_res_units"], config["labels"]
        )
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()


def check_segment_config(sc: SegmentConfig) -> None:
    """The rule across ``segment`` keys that field rules cannot state: the UNet halves the size per level.

    Every single-key rule (ranges, choices) is checked once, where the config is loaded.
    """
    step = 2 ** (len(sc.channels) - 1)
    if sc.image_size < step or sc.image_size % step:
        raise ConfigError(
            f"segment.image_size must be a multiple of {step} (2 ** (len(segment.channels) - 1)), got {sc.image_size}"
        )
