"""toolkit: does synthetic CT make a per-organ injury classifier better?

Stages (each reads a :class:`~toolkit.sliceset.SliceSet` and writes one):
``demo-data`` -> ``prepare`` -> ``gen`` -> ``train`` -> ``compare``.
"""

__version__ = "0.1.0"

ORGANS: tuple[str, ...] = ("bowel", "extravasation", "kidney", "liver", "spleen")
"""The five organ groups of RSNA 2023 Abdominal Trauma Detection, in its column order."""

GRADED_ORGANS: tuple[str, ...] = ("kidney", "liver", "spleen")
"""Organs labelled healthy/low/high; the others are healthy/injury."""
