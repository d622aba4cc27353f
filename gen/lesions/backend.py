"""What a lesion-mode generator adds to :class:`gen.base.BaseGenerator`, and the HU-level entry point.

A lesion-mode backend (``create_generator(name, cfg, mode="lesion")``) is trained on organ crops and
draws injuries into given healthy crops instead of whole new slices::

    gen.fit(images, labels, lesion_plan=plan, checkpoint_dir=...)          # plan: LesionPlan (pairs.py)
    out = gen.inpaint(crops, lesion_masks, labels, seed=0)                  # windowed [0, 1] in and out
    out_hu = inpaint_hu(gen, crops_hu, lesion_masks, labels, window, seed=0)  # HU in and out

Outside the lesion masks the output *is* the input (composited last, in the caller's own units), so
the tolerance there is zero for both backends.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ContractError, ToolkitError
from toolkit.transforms import unwindow_hu, window_hu


class LesionBackend:
    """Mixin for lesion-mode backends (put before the image backend it extends in the bases)."""

    mode = "lesion"

    def config_dict(self) -> dict[str, Any]:
        """The image backend's ``config.json`` plus ``mode`` and the ``gen.lesion`` settings."""
        config = super().config_dict()  # type: ignore[misc]
        config["mode"] = "lesion"
        config["gen"]["lesion"] = dataclasses.asdict(self.cfg.lesion)  # type: ignore[attr-defined]
        return config

    def _load_training_state(self, directory: Path) -> dict[str, Any] | None:
        config_file = Path(directory) / "config.json"
        if config_file.exists():
            saved = json.loads(config_file.read_text()).get("mode", "image")
            if saved != "lesion":
                raise ContractError(
                    f"checkpoint at {directory} is a '{saved}' mode generator, not 'lesion'; pass --force to start over"
                )
        return super()._load_training_state(directory)  # type: ignore[misc]

    def sample(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise ToolkitError(
            f"a lesion-mode {self.generator_name} generator draws into given crops: call inpaint(crops, "  # type: ignore[attr-defined]
            "lesion_masks, labels, seed)"
        )

    def inpaint(
        self, crops: np.ndarray, lesion_masks: np.ndarray, labels: np.ndarray, seed: int = 0, **kwargs: Any
    ) -> np.ndarray:
        """Fill ``lesion_masks`` of ``crops`` (n, S, S) windowed to [0, 1] with class ``labels``; see backends."""
        raise NotImplementedError

    def _check_inpaint_inputs(
        self, crops: np.ndarray, lesion_masks: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Float32 crops, bool masks and int64 labels, or a one-line error naming what does not fit."""
        crops = np.asarray(crops, dtype=np.float32)
        masks = np.asarray(lesion_masks, dtype=bool)
        size = self.image_size  # type: ignore[attr-defined]
        if crops.ndim != 3 or crops.shape[1:] != (size, size):
            raise ContractError(
                f"crops of shape {crops.shape} do not fit the lesion generator, which draws at {size} px "
                f"(gen.image_size); crop the organs at {size} px or retrain with --image-size {crops.shape[-1]}"
            )
        if masks.shape != crops.shape:
            raise ContractError(f"lesion masks have shape {masks.shape} but the crops {crops.shape}")
        labels = self._resolve_labels(None, labels)  # type: ignore[attr-defined]
        if len(labels) != len(crops):
            raise ContractError(f"got {len(crops)} crops but {len(labels)} labels")
        return crops, masks, labels


def inpaint_hu(
    generator: LesionBackend,
    crops_hu: np.ndarray,
    lesion_masks: np.ndarray,
    labels: np.ndarray,
    window: tuple[float, float] | list[float],
    seed: int = 0,
    **kwargs: Any,
) -> np.ndarray:
    """:meth:`LesionBackend.inpaint` in Hounsfield units.

    The crops are windowed as the generator was trained (``window``), inpainted, mapped back to HU,
    and the lesion pixels pasted into the original HU crops: outside ``lesion_masks`` the result
    equals ``crops_hu`` exactly (values outside the window included); inside, HU lie within the window.

    Parameters
    ----------
    generator : a lesion-mode generator (``create_generator(name, cfg, mode="lesion")``), fitted
    crops_hu : ndarray of shape (n, S, S), int16 or float
    lesion_masks : ndarray of shape (n, S, S), bool
    labels : ndarray of shape (n,), int
        Class to draw (1 injured, or 1 low / 2 high).
    window : (level, width)
        The HU window the generator's training crops were in (``data.windows[0]``).
    seed : int, default=0
    **kwargs
        Passed to ``inpaint`` (sampler settings).

    Returns
    -------
    ndarray of shape (n, S, S), the dtype of ``crops_hu``
    """
    crops = np.asarray(crops_hu)
    masks = np.asarray(lesion_masks, dtype=bool)
    windowed = window_hu(crops.astype(np.float32), [window])[:, 0]
    filled = unwindow_hu(generator.inpaint(windowed, masks, labels, seed=seed, **kwargs), window)  # int16 HU
    return np.where(masks, filled.astype(crops.dtype), crops)
