"""toolkit: does synthetic CT make a per-organ injury classifier better?

Stages (each reads a :class:`~toolkit.sliceset.SliceSet` and writes one):
``demo-data`` -> ``prepare`` -> ``gen`` -> ``train`` -> ``compare``.
"""

__version__ = "0.1.0"

ORGANS: tuple[str, ...] = ("bowel", "extravasation", "kidney", "liver", "spleen")
"""The five organ groups of RSNA 2023 Abdominal Trauma Detection, in its column order."""

GRADED_ORGANS: tuple[str, ...] = ("kidney", "liver", "spleen")
"""Organs labelled healthy/low/high; the others are healthy/injury."""

CROP_ORGANS: tuple[str, ...] = ("kidney", "liver", "spleen")
"""Organs with a crop set around the organ (``toolkit crop``); bowel and extravasation keep the body crop."""

INPUTS: tuple[str, ...] = ("crops", "slices")
"""What a classifier or generator of an organ reads: its organ crops, or the stored (body-cropped) slices."""
