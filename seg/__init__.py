"""seg: the organ localizer (``toolkit segment``).

A 2D MONAI UNet trained on the store's annotated training series (real masks from
``toolkit prepare``) labels every stored slice with liver, spleen, left and right kidney and
bowel (RSNA 2023's codes, :data:`seg.store.SEG_LABELS`), and gives each slice a per-organ
visibility. Modules: :mod:`seg.store` (codes, files, readers), :mod:`seg.data` (which series,
augmentation), :mod:`seg.model` (the network + checkpoint), :mod:`seg.engine` (train, predict,
Dice), :mod:`seg.run` (the stage), :mod:`seg.cli`.
"""

from seg.store import SEG_LABELS, SEG_ORGANS, read_organ_labels, read_organs

__all__ = ["SEG_LABELS", "SEG_ORGANS", "read_organ_labels", "read_organs"]
