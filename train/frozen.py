"""The frozen front of a partly trained classifier, computed once per slice for validation and test.

With ``train.trainable_blocks = n`` the stem and all but the last ``n`` backbone blocks are frozen,
batch norms included (:func:`train.model.set_trainable_blocks`). On an un-augmented slice they give
the same features in every epoch of a fold, and in every fold of an organ that starts from the
same weights (pretrained ones). The front is most of MobileNetV2's forward pass: 65% at 64 px and
nearly all of it at 128 px with the last 3 blocks trainable (CPU, channels-last), so scoring the
validation fold every epoch and the shared test set once per fold mostly recomputed the same
features. :class:`FrozenFeatures` keeps them; later passes run only the trainable back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from train.inference import fold_batchnorm, refold_batchnorm


class _Back(nn.Module):
    """The layers of a timm EfficientNet-family model after its first ``start`` blocks, to the logits."""

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.model = model  # shared, not copied: the back always has the model's current weights
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.blocks[self.start:]:
            x = block(x)
        return self.model.forward_head(self.model.bn2(self.model.conv_head(x)))


def split_frozen_front(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(front, back)`` with ``back(front(x)) == model(x)``: front = the stem and the leading blocks
    without a trainable parameter. Both share ``model``'s layers.

    Returns ``None`` when nothing at the front is frozen (``trainable_blocks = -1``) or the model is
    not of timm's EfficientNet family (``conv_stem``, ``bn1``, ``blocks``, ``conv_head``, ``bn2``).
    """
    if not all(hasattr(model, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        return None
    if not isinstance(model.blocks, nn.Sequential):
        return None
    stem = [model.conv_stem, model.bn1]
    if any(p.requires_grad for m in stem for p in m.parameters()):
        return None
    start = 0
    while start < len(model.blocks) and not any(p.requires_grad for p in model.blocks[start].parameters()):
        start += 1
    return nn.Sequential(*stem, *model.blocks[:start]), _Back(model, start)


def _fingerprint(module: nn.Module) -> str:
    """Hash of a module's weights and buffers: equal fronts give equal features."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenFeatures:
    """Front features of validation and test batches, kept between scoring passes.

    One instance serves an organ's folds: each split's batches are keyed by their store rows, and
    everything is dropped when the front's weights change (a fold trained from another random
    start). Batches beyond ``max_bytes`` are scored in full every time.

    Parameters
    ----------
    max_bytes : int
        Memory the kept features may take (on the device that computed them); 0 keeps nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._splits: dict[str, dict[bytes, torch.Tensor]] = {}
        self._bytes = 0
        self._front_id: str | None = None
        self._back: tuple[nn.Module, nn.Module] | None = None  # (model, its folded back)

    @property
    def nbytes(self) -> int:
        """Memory the kept features take."""
        return self._bytes

    def scorer(self, model: nn.Module, split: str, transform: Callable[[dict[str, Any]], torch.Tensor]
               ) -> Callable[[dict[str, Any]], torch.Tensor] | None:
        """A function batch -> logits of shape (b, num_classes) for ``model`` in eval mode that computes
        each ``split`` batch's front features once (with the front's batch norms folded,
        :func:`train.inference.fold_batchnorm`); ``None`` when ``model`` has no frozen front or nothing
        may be kept. The back's batch norms are folded too, traced once per model and refolded
        (:func:`train.inference.refold_batchnorm`) at each call.

        ``transform`` turns a loader batch into the network input (windowing, normalisation).
        """
        parts = split_frozen_front(model) if self.max_bytes > 0 else None
        if parts is None:
            return None
        front, back = parts
        front_id = _fingerprint(front)
        if front_id != self._front_id:
            self._splits.clear()
            self._bytes, self._front_id = 0, front_id
        # The back with its batch norms folded: traced once per model (fold), brought up to date after each epoch.
        if self._back is None or self._back[0] is not model:
            self._back = (model, fold_batchnorm(back))
        back = refold_batchnorm(self._back[1])
        kept = self._splits.setdefault(split, {})
        folded_front: nn.Module | None = None  # made at the first batch not kept (often none: nothing to trace)

        def score(batch: dict[str, Any]) -> torch.Tensor:
            nonlocal folded_front
            key = batch["index"].cpu().numpy().tobytes()
            features = kept.get(key)
            if features is None:
                folded_front = folded_front or fold_batchnorm(front)
                features = folded_front(transform(batch))
                size = features.element_size() * features.nelement()
                if self._bytes + size <= self.max_bytes:
                    kept[key] = features
                    self._bytes += size
            return back(features)

        return score

    def forget(self, split: str) -> None:
        """Drop one split's features (a finished fold's validation batches)."""
        for features in self._splits.pop(split, {}).values():
            self._bytes -= features.element_size() * features.nelement()
