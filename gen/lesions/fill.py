"""Procedural lesion fill: the knowledge-driven baseline (and the fast one for tests).

A healthy crop, its organ mask and a lesion mask in; the injured crop out::

    fill = RandFillLesion(contrast_hu=(-80, -30), reference="organ", edge_mm=1.0)
    injured = fill(crop_hu, organ_mask, lesion_mask, rng, spacing=0.8)

Inside the lesion the crop becomes ``level + texture``: ``level`` is the organ's mean HU plus a
contrast drawn from ``contrast_hu`` (``reference="organ"``, a hypodense hematoma) or a value drawn
from ``contrast_hu`` itself (``reference="absolute"``, a contrast blush, fluid or gas); ``texture``
is the healthy crop's own deviation from the organ's mean under the lesion (``texture="source"``, the
default: the crop shifted by the contrast, as image-domain lesion insertion in CT does, keeping the
scanner's noise and resampling exactly), or Gaussian-correlated noise with the organ's own standard
deviation and pixel-to-pixel correlation (``texture="matched"``). The rim is
feathered *inward* over ``edge_mm``: a lesion pixel at distance ``d`` (px) from the nearest
non-lesion pixel is blended with weight ``min(1, d / edge_px)``.

Tolerance outside the lesion: none. Pixels outside the lesion mask are returned exactly as given
(the same dtype; int16 HU stay int16), because the feathering lies inside the mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from gen.lesions.shapes import check_spacing
from toolkit.config import LesionGenConfig
from toolkit.errors import ConfigError, DataError

REFERENCES = ("organ", "absolute")
TEXTURES = ("source", "matched")
MAX_CORRELATION_PX = 3.0
"""Longest noise correlation (Gaussian sigma, px) the fill reproduces; beyond it the organ's variation is anatomy."""


@dataclass(frozen=True)
class OrganStats:
    """HU statistics of an organ in one crop.

    Attributes
    ----------
    mean : float
        Median HU of the organ's inner pixels (robust to vessels and to a lesion already there).
    std : float
        Robust standard deviation (1.4826 x MAD) of those pixels: the texture a fill reproduces.
    correlation_px : float
        Sigma (px) of the Gaussian filter that gives white noise the organ's lag-1 autocorrelation
        ``rho = exp(-1 / (4 sigma^2))``; 0 = uncorrelated.
    n_pixels : int
    """

    mean: float
    std: float
    correlation_px: float
    n_pixels: int


def organ_statistics(crop_hu: np.ndarray, organ_mask: np.ndarray, exclude: np.ndarray | None = None) -> OrganStats:
    """Mean, noise and noise correlation of the organ's HU in ``crop_hu`` (H, W).

    The organ's outermost pixel ring is left out (partial volume with its neighbours), as are
    ``exclude`` pixels (a lesion) unless they leave fewer than 16; a tiny organ falls back to all
    its pixels.
    """
    crop = np.asarray(crop_hu, dtype=np.float64)
    organ = np.asarray(organ_mask, dtype=bool)
    if exclude is not None and (organ & ~np.asarray(exclude, dtype=bool)).sum() >= 16:
        organ = organ & ~np.asarray(exclude, dtype=bool)
    inner = ndimage.binary_erosion(organ, border_value=1)
    use = inner if inner.sum() >= 16 else organ
    values = crop[use]
    if values.size == 0:
        raise DataError("the organ mask is empty: no organ HU to match a lesion to")
    mean = float(np.median(values))
    std = float(1.4826 * np.median(np.abs(values - mean)))
    # Lag-1 autocorrelation over horizontal and vertical neighbour pairs that both lie in the organ.
    centred = crop - mean
    products, squares = [], []
    for a, b, ma, mb in (
        (centred[:, :-1], centred[:, 1:], use[:, :-1], use[:, 1:]),
        (centred[:-1, :], centred[1:, :], use[:-1, :], use[1:, :]),
    ):
        both = ma & mb
        products.append((a * b)[both])
        squares.append(0.5 * (a**2 + b**2)[both])
    prod, sq = np.concatenate(products), np.concatenate(squares)
    rho = float(prod.mean() / sq.mean()) if sq.size and sq.mean() > 0 else 0.0
    sigma = math.sqrt(-1.0 / (4.0 * math.log(rho))) if 0.05 < rho < 1.0 else 0.0
    return OrganStats(mean=mean, std=std, correlation_px=min(sigma, MAX_CORRELATION_PX), n_pixels=int(values.size))


def correlated_noise(
    shape: tuple[int, int], std: float, correlation_px: float, rng: np.random.Generator
) -> np.ndarray:
    """Zero-mean Gaussian noise of standard deviation ``std``, smoothed by a Gaussian of ``correlation_px``.

    Returns
    -------
    ndarray of shape ``shape``, float64
    """
    white = rng.standard_normal(shape)
    if correlation_px > 0:
        white = ndimage.gaussian_filter(white, correlation_px, mode="wrap")
        white /= max(float(white.std()), 1e-12)
    return white * std


def feather_weights(lesion_mask: np.ndarray, edge_px: float) -> np.ndarray:
    """Blend weight per pixel: ``min(1, d / edge_px)`` inside the lesion (``d`` = px to the nearest
    non-lesion pixel, 1 on its rim), exactly 0 outside."""
    lesion = np.asarray(lesion_mask, dtype=bool)
    if edge_px <= 1.0:
        return lesion.astype(np.float64)
    # Padded so the crop's border does not count as lesion continuing beyond it.
    depth = ndimage.distance_transform_edt(np.pad(lesion, 1))[1:-1, 1:-1]
    return np.clip(depth / edge_px, 0.0, 1.0)


def contrast_of(kind: str, cfg: LesionGenConfig) -> tuple[str, tuple[float, float]]:
    """``(reference, (low, high))`` of ``kind``: ``absolute_hu`` when it lists the kind, else ``delta_hu``."""
    if kind in cfg.absolute_hu:
        return "absolute", (float(cfg.absolute_hu[kind][0]), float(cfg.absolute_hu[kind][1]))
    if kind in cfg.delta_hu:
        return "organ", (float(cfg.delta_hu[kind][0]), float(cfg.delta_hu[kind][1]))
    raise ConfigError(
        f"lesion kind '{kind}' has no contrast; set gen.lesion.delta_hu.{kind}=[low, high] (HU relative to the "
        f"organ) or gen.lesion.absolute_hu.{kind}=[low, high]"
    )


class RandFillLesion:
    """Paint a lesion into a healthy crop with the organ's own texture (see the module docstring).

    Parameters
    ----------
    contrast_hu : (low, high)
        HU drawn uniformly per lesion: relative to the organ's mean, or absolute (``reference``).
    reference : {"organ", "absolute"}, default="organ"
    edge_mm : float, default=1.0
        Width of the feathered rim inside the lesion (0: a hard edge).
    texture : {"source", "matched"}, default="source"
        Inside the lesion: the crop's own pixels shifted, or new noise matched to the organ's.
    """

    def __init__(self, contrast_hu: Sequence[float], reference: str = "organ", edge_mm: float = 1.0,
                 texture: str = "source") -> None:
        self.contrast_hu = contrast_hu
        self.reference = reference
        self.edge_mm = edge_mm
        self.texture = texture

    def __call__(
        self,
        crop_hu: np.ndarray,
        organ_mask: np.ndarray,
        lesion_mask: np.ndarray,
        rng: np.random.Generator,
        spacing: float | Sequence[float] = 1.0,
    ) -> np.ndarray:
        """The injured crop.

        Parameters
        ----------
        crop_hu : ndarray of shape (H, W), int16 or float
            The healthy crop in HU.
        organ_mask, lesion_mask : ndarray of shape (H, W), bool
        rng : np.random.Generator
        spacing : float or (row, col), default=1.0
            mm per pixel (for ``edge_mm``).

        Returns
        -------
        ndarray of shape (H, W), the dtype of ``crop_hu``; equal to it outside ``lesion_mask``.
        """
        if self.reference not in REFERENCES:
            raise ConfigError(f"unknown contrast reference '{self.reference}'; choose one of {', '.join(REFERENCES)}")
        if self.texture not in TEXTURES:
            raise ConfigError(f"unknown gen.lesion.texture '{self.texture}'; choose one of {', '.join(TEXTURES)}")
        crop = np.asarray(crop_hu)
        lesion = np.asarray(lesion_mask, dtype=bool)
        if crop.ndim != 2 or lesion.shape != crop.shape or np.shape(organ_mask) != crop.shape:
            raise DataError(
                f"crop, organ mask and lesion mask must share one (H, W) shape, got {crop.shape}, "
                f"{np.shape(organ_mask)} and {lesion.shape}"
            )
        if not lesion.any():
            return crop.copy()
        stats = organ_statistics(crop, organ_mask, exclude=lesion)
        drawn = rng.uniform(float(self.contrast_hu[0]), float(self.contrast_hu[1]))
        level = stats.mean + drawn if self.reference == "organ" else drawn
        if self.texture == "source":
            texture = crop.astype(np.float64) - stats.mean
        else:
            texture = correlated_noise(crop.shape, stats.std, stats.correlation_px, rng)
        sy, sx = check_spacing(spacing)
        alpha = feather_weights(lesion, self.edge_mm / (0.5 * (sy + sx)))
        value = crop.astype(np.float64) + alpha * (level + texture - crop)
        out = crop.copy()
        if np.issubdtype(crop.dtype, np.integer):
            info = np.iinfo(crop.dtype)
            out[lesion] = np.clip(np.round(value[lesion]), info.min, info.max).astype(crop.dtype)
        else:
            out[lesion] = value[lesion].astype(crop.dtype)
        return out


def fill_lesions(
    crops_hu: np.ndarray,
    organ_masks: np.ndarray,
    lesion_masks: np.ndarray,
    kinds: Sequence[str],
    rng: np.random.Generator,
    spacing: float | np.ndarray = 1.0,
    cfg: LesionGenConfig | None = None,
    measured_delta_hu: dict[str, Sequence[float]] | None = None,
) -> np.ndarray:
    """:class:`RandFillLesion` over a stack, each lesion with its kind's contrast.

    Parameters
    ----------
    crops_hu : ndarray of shape (n, H, W), int16 or float
    organ_masks, lesion_masks : ndarray of shape (n, H, W), bool
    kinds : sequence of n str
        Lesion kind of each mask (its contrast: :func:`contrast_of`).
    rng : np.random.Generator
    spacing : float or ndarray of shape (n,), default=1.0
    cfg : LesionGenConfig, optional
        Contrasts and ``edge_mm`` (default: the ``gen.lesion`` defaults).
    measured_delta_hu : dict of kind to (low, high), optional
        HU relative to the organ measured on real injured crops (:func:`gen.lesions.audit.lesion_contrast`);
        replaces the configured contrast of those kinds.

    Returns
    -------
    ndarray of shape (n, H, W), the dtype of ``crops_hu``
    """
    cfg = cfg or LesionGenConfig()
    crops = np.asarray(crops_hu)
    n = len(crops)
    if np.shape(organ_masks) != crops.shape or np.shape(lesion_masks) != crops.shape or len(kinds) != n:
        raise DataError(
            f"got {n} crops of shape {crops.shape[1:]} but organ masks {np.shape(organ_masks)}, lesion masks "
            f"{np.shape(lesion_masks)} and {len(kinds)} kinds"
        )
    spacings = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (n,))
    out = np.empty_like(crops)
    for i in range(n):
        if measured_delta_hu is not None and kinds[i] in measured_delta_hu:
            reference, contrast = "organ", tuple(measured_delta_hu[kinds[i]])
        else:
            reference, contrast = contrast_of(kinds[i], cfg)
        fill = RandFillLesion(contrast, reference=reference, edge_mm=cfg.edge_mm, texture=cfg.texture)
        out[i] = fill(crops[i], organ_masks[i], lesion_masks[i], rng, spacing=float(spacings[i]))
    return out
