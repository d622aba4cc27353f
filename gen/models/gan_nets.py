"""Conditional DCGAN-style generator and projection discriminator (Miyato & Koyama 2018).

The generator is DCGAN's ladder from a 4x4 map to ``image_size`` (channels halve
as resolution doubles; the last layer goes straight to one grey channel, which
keeps it cheap on a CPU), each step a nearest-neighbour 2x upsampling and a 3x3
convolution rather than DCGAN's 4x4 stride-2 transposed convolution, whose uneven
kernel overlap left a checkerboard speckle on the demo's short runs; the class
enters twice: an embedding concatenated with ``z`` and class-conditional batch
norm in every block. The discriminator halves the
resolution down to 4x4 with spectrally normalised strided convolutions and adds
the projection term ``<embed(y), h>`` to its unconditional score.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from toolkit.errors import ToolkitError

GAN_IMAGE_SIZES = (16, 32, 64, 128, 256, 512)


def check_gan_size(image_size: int) -> int:
    """Number of 2x up/down-sampling steps between 4x4 and ``image_size`` (a power of two >= 16)."""
    if image_size not in GAN_IMAGE_SIZES:
        raise ToolkitError(
            f"gen.image_size {image_size} is not supported by the GAN; use one of "
            f"{', '.join(map(str, GAN_IMAGE_SIZES))}"
        )
    return int(math.log2(image_size)) - 2


def _channels(width: int, image_size: int, resolution: int) -> int:
    # Wide at low resolution, ``width`` at full resolution, capped at 8x width (DCGAN's ladder).
    return width * max(1, min(8, image_size // (2 * resolution)))


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift are looked up per class."""

    def __init__(self, num_features: int, n_classes: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.embed = nn.Embedding(n_classes, 2 * num_features)
        nn.init.ones_(self.embed.weight[:, :num_features])
        nn.init.zeros_(self.embed.weight[:, num_features:])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.embed(y).chunk(2, dim=1)
        return self.bn(x) * gamma[:, :, None, None] + beta[:, :, None, None]


def upsample_conv(in_channels: int, out_channels: int, bias: bool) -> nn.Sequential:
    """Nearest 2x upsampling then a 3x3 convolution: (n, in, H, W) -> (n, out, 2H, 2W)."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
    )


class UpBlock(nn.Module):
    """Nearest 2x upsampling -> 3x3 conv -> conditional BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, n_classes: int) -> None:
        super().__init__()
        self.conv = upsample_conv(in_channels, out_channels, bias=False)
        self.norm = ConditionalBatchNorm2d(out_channels, n_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x), y))


class ConditionalGenerator(nn.Module):
    """``G(z, y)``: latent of shape (n, z_dim) and class of shape (n,) -> image (n, 1, S, S) in [-1, 1]."""

    def __init__(self, image_size: int, z_dim: int, ngf: int, n_classes: int) -> None:
        super().__init__()
        n_up = check_gan_size(image_size)
        self.image_size, self.z_dim, self.n_classes = image_size, z_dim, n_classes
        self.embed = nn.Embedding(n_classes, z_dim)
        c0 = _channels(ngf, image_size, 4)
        self.c0 = c0
        self.fc = nn.Linear(2 * z_dim, c0 * 16, bias=False)
        self.norm0 = ConditionalBatchNorm2d(c0, n_classes)
        blocks = []
        resolution, channels = 4, c0
        for _ in range(n_up - 1):
            resolution *= 2
            out = _channels(ngf, image_size, resolution)
            blocks.append(UpBlock(channels, out, n_classes))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.to_image = upsample_conv(channels, 1, bias=True)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1)).view(-1, self.c0, 4, 4)
        h = torch.relu(self.norm0(h, y))
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.to_image(h))


class ProjectionDiscriminator(nn.Module):
    """``D(x, y)``: image (n, 1, S, S) and class (n,) -> unbounded realism score (n,)."""

    def __init__(self, image_size: int, ndf: int, n_classes: int) -> None:
        super().__init__()
        n_down = check_gan_size(image_size)
        layers: list[nn.Module] = []
        channels, resolution = 1, image_size
        for _ in range(n_down):
            resolution //= 2
            out = _channels(ndf, image_size, resolution)
            layers += [spectral_norm(nn.Conv2d(channels, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            channels = out
        self.features = nn.Sequential(*layers)
        # Minibatch standard deviation (ProGAN): one extra 4x4 channel holding how much the batch
        # varies, so the discriminator can spot a generator that ignores z (mode collapse).
        self.final = spectral_norm(nn.Conv2d(channels + 1, channels, 3, padding=1))
        self.act = nn.LeakyReLU(0.2)
        self.linear = spectral_norm(nn.Linear(channels, 1))
        self.embed = spectral_norm(nn.Embedding(n_classes, channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        std = h.std(dim=0, unbiased=False).mean() if len(h) > 1 else h.new_zeros(())
        h = torch.cat([h, std.expand(len(h), 1, *h.shape[2:])], dim=1)
        h = self.act(self.final(h)).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)
