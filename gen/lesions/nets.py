"""The inpainting generator of the lesion GAN: masked crop, mask, noise and class in; a crop out.

A small U-Net (pix2pix's encoder-decoder with skips): strided 4x4 convolutions down to 4x4
(at most four levels), the class and a latent ``z`` added at the bottleneck, then nearest 2x
upsampling + 3x3 convolutions (no transposed-convolution checkerboard) with class-conditional
group norm up again. Group norm rather than batch norm: a crop's output does not depend on the
other crops of its batch, so no standing statistics are needed for sampling. The discriminator is
the image GAN's :class:`gen.models.gan_nets.ProjectionDiscriminator`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gen.models.gan_nets import check_gan_size


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ConditionalGroupNorm(nn.Module):
    """Group norm whose scale and shift are looked up per class."""

    def __init__(self, num_features: int, n_classes: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(num_features), num_features, affine=False)
        self.embed = nn.Embedding(n_classes, 2 * num_features)
        nn.init.ones_(self.embed.weight[:, :num_features])
        nn.init.zeros_(self.embed.weight[:, num_features:])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.embed(y).chunk(2, dim=1)
        return self.norm(x) * gamma[:, :, None, None] + beta[:, :, None, None]


class _Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)
        self.norm = nn.GroupNorm(_groups(out_channels), out_channels)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class _Up(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, n_classes: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False)
        self.norm = ConditionalGroupNorm(out_channels, n_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, skip: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(torch.cat([self.up(x), skip], dim=1)), y))


class InpaintGenerator(nn.Module):
    """``G(masked, mask, noise, z, y)`` -> crop of shape (n, 1, S, S) in [-1, 1].

    Parameters
    ----------
    image_size : int
        A power of two >= 16 (as the image GAN).
    z_dim : int
        Latent size (global variation of the fill).
    ngf : int
        Channels at full resolution (doubling per level, at most 8x).
    n_classes : int
        Conditioning classes (0 = healthy).

    Inputs of ``forward``: ``masked`` (n, 1, S, S) the crop with the lesion region zeroed, ``mask``
    (n, 1, S, S) 1 where to draw, ``noise`` (n, 1, S, S) a Gaussian map (texture), ``z`` (n, z_dim),
    ``y`` (n,) classes. The caller composites: ``masked + mask * G(...)``.
    """

    def __init__(self, image_size: int, z_dim: int, ngf: int, n_classes: int) -> None:
        super().__init__()
        levels = min(4, check_gan_size(image_size))
        self.image_size, self.z_dim, self.n_classes = image_size, z_dim, n_classes
        widths = [ngf * min(2**i, 8) for i in range(levels + 1)]
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.LeakyReLU(0.2))
        self.downs = nn.ModuleList(_Down(widths[i], widths[i + 1]) for i in range(levels))
        self.embed = nn.Embedding(n_classes, widths[-1])
        self.from_z = nn.Linear(z_dim, widths[-1])
        self.ups = nn.ModuleList(
            _Up(widths[i + 1], widths[i], widths[i], n_classes) for i in reversed(range(levels))
        )
        self.to_image = nn.Conv2d(widths[0], 1, 3, padding=1)

    def forward(
        self, masked: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, z: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        h = self.stem(torch.cat([masked, mask, noise], dim=1))
        skips = [h]
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = h + (self.embed(y) + self.from_z(z))[:, :, None, None]
        for up, skip in zip(self.ups, reversed(skips[:-1]), strict=True):
            h = up(h, skip, y)
        return torch.tanh(self.to_image(h))
