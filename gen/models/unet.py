"""The class-conditional denoiser: a diffusers ``UNet2DModel`` with one grey channel."""

from __future__ import annotations

import math

from diffusers import UNet2DModel

from toolkit.errors import ToolkitError


def build_unet(
    image_size: int,
    n_classes: int,
    block_out_channels: list[int] | tuple[int, ...],
    layers_per_block: int,
) -> UNet2DModel:
    """A ``UNet2DModel`` predicting noise for 1-channel slices of ``image_size`` pixels.

    Parameters
    ----------
    image_size : int
        Pixels per side; must be divisible by ``2 ** (len(block_out_channels) - 1)``.
    n_classes : int
        Conditioning classes. The model gets ``n_classes + 1`` class embeddings: index
        ``n_classes`` is the null label used for classifier-free guidance.
    block_out_channels : list of int
        Channels per resolution level, e.g. ``[64, 128, 256, 256]``.
    layers_per_block : int
        ResNet layers per level.
    """
    channels = tuple(int(c) for c in block_out_channels)
    levels = len(channels)
    if levels < 2:
        raise ToolkitError(f"gen.unet_channels needs at least 2 levels, got {list(channels)}")
    if image_size % (2 ** (levels - 1)):
        raise ToolkitError(
            f"gen.image_size {image_size} must be divisible by {2 ** (levels - 1)} "
            f"for {levels} UNet levels (gen.unet_channels={list(channels)})"
        )
    # GroupNorm needs a group count dividing every level's channels; 32 is diffusers' default.
    groups = min(32, math.gcd(*channels))
    down, up = [], []
    for level in range(levels):
        # Self-attention only at the coarsest level (plus diffusers' mid block): its cost grows with
        # pixels squared, and at 16 px it already doubles the CPU cost of a small UNet's step.
        attn = level == levels - 1
        down.append("AttnDownBlock2D" if attn else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if attn else "UpBlock2D")
    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        attention_head_dim=min(8, channels[-1]),
        num_class_embeds=n_classes + 1,
    )
