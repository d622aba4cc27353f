"""Conditional GAN: DCGAN-style generator, projection discriminator, hinge loss.

The fast alternative to diffusion: one forward pass per slice when sampling
and several times the training throughput on a CPU. Adam with betas (0.0, 0.9)
for both networks (as in SNGAN/BigGAN), spectral norm in the discriminator,
optionally an EMA of the generator weights for sampling. Batch-norm statistics
of the sampling generator are recomputed after training ("standing statistics"),
so a slice does not depend on the other slices of its batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from gen.base import BaseGenerator, from_model_range
from gen.models.gan_nets import ConditionalGenerator, ProjectionDiscriminator, check_gan_size
from gen.registry import register_generator
from gen.training import TrainingParts
from toolkit.config import GANGenConfig

STANDING_STATS_BATCHES = 16


def adversarial_parts(netg: torch.nn.Module, netd: torch.nn.Module, gcfg: GANGenConfig) -> TrainingParts:
    """A generator and a discriminator with an Adam each (betas 0, 0.9) and, with ``gan.ema``, an EMA of G.

    Shared by every GAN backend (whole image and lesion inpainting).
    """
    return TrainingParts(
        modules={"generator": netg, "discriminator": netd},
        optimizers={
            "opt_g": torch.optim.Adam(netg.parameters(), lr=gcfg.lr, betas=(0.0, 0.9)),
            "opt_d": torch.optim.Adam(netd.parameters(), lr=gcfg.lr, betas=(0.0, 0.9)),
        },
        sample_from="generator",
        ema=EMAModel(netg.parameters(), decay=gcfg.ema_decay) if gcfg.ema else None,
    )


@register_generator("gan")
class GANGenerator(BaseGenerator):
    """Class-conditional GAN (hinge loss, spectral-norm projection discriminator).

    Learned attributes: ``model_`` (the generator used for sampling, EMA weights when
    ``cfg.gan.ema``), ``step_``, ``history_`` (per-step d_loss, g_loss, images/s).
    """

    log_columns = ("d_loss", "g_loss")

    def _build_sampling_model(self) -> torch.nn.Module:
        return ConditionalGenerator(self.image_size, self.cfg.gan.z_dim, self.cfg.gan.ngf, self.n_classes)

    def _build_discriminator(self) -> torch.nn.Module:
        return ProjectionDiscriminator(self.image_size, self.cfg.gan.ndf, self.n_classes)

    def _architecture_keys(self) -> tuple[str, ...]:
        return ("image_size", "gan.z_dim", "gan.ngf", "gan.ndf", "gan.ema")

    # ------------------------------------------------------------ training hooks (gen.training.fit_generator)
    def build_training(self) -> TrainingParts:
        """Generator and discriminator, an Adam for each, and optionally an EMA of the generator."""
        gcfg = self.cfg.gan
        check_gan_size(self.image_size)
        netg = self._build_sampling_model()
        netd = self._build_discriminator()
        return adversarial_parts(netg, netd, gcfg)

    def training_step(
        self,
        parts: TrainingParts,
        batch: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        accelerator: Accelerator,
    ) -> dict[str, float]:
        """One discriminator update, then one generator update on the same fake slices."""
        netg, netd = parts.modules["generator"], parts.modules["discriminator"]
        opt_g, opt_d = parts.optimizers["opt_g"], parts.optimizers["opt_d"]
        z = torch.randn(len(batch), self.cfg.gan.z_dim, generator=generator).to(batch.device)
        y_fake = torch.randint(self.n_classes, (len(batch),), generator=generator).to(batch.device)

        fake = netg(z, y_fake)
        # Discriminator: hinge loss on real and (detached) fake slices.
        d_loss = F.relu(1.0 - netd(batch, labels)).mean() + F.relu(1.0 + netd(fake.detach(), y_fake)).mean()
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(d_loss)
        opt_d.step()
        # Generator: the same fake slices against the updated discriminator.
        netd.requires_grad_(False)
        g_loss = -netd(fake, y_fake).mean()
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(g_loss)
        opt_g.step()
        netd.requires_grad_(True)
        return {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach())}

    @torch.no_grad()
    def sampling_model(self, parts: TrainingParts, accelerator: Accelerator) -> torch.nn.Module:
        """The (EMA) generator with standing batch-norm statistics, in eval mode."""
        model = self._copy_for_sampling(parts, accelerator)
        # Standing statistics: batch-norm running stats re-estimated for these (EMA) weights
        # as a plain average over fixed batches, then frozen for eval-mode sampling.
        g = torch.Generator().manual_seed(self.seed)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        model.train()
        for _ in range(STANDING_STATS_BATCHES):
            z = torch.randn(self.cfg.batch_size, self.cfg.gan.z_dim, generator=g).to(accelerator.device)
            y = torch.randint(self.n_classes, (self.cfg.batch_size,), generator=g).to(accelerator.device)
            model(z, y)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.1
        return model.eval()

    @torch.no_grad()
    def sample(
        self,
        n_per_class: int | None = None,
        labels: np.ndarray | None = None,
        seed: int = 0,
        batch_size: int = 256,
        callback: Any = None,
    ) -> np.ndarray:
        """Draw slices: ``G(z, y)`` with ``z`` from a CPU generator seeded by ``seed``.

        Returns
        -------
        ndarray of shape (n, S, S), dtype=float32, values in [0, 1] (windowed intensities)
        """
        model = self._check_fitted()
        y = torch.from_numpy(self._resolve_labels(n_per_class, labels))
        device = next(model.parameters()).device
        z = torch.randn(len(y), self.cfg.gan.z_dim, generator=torch.Generator().manual_seed(int(seed)))
        out = []
        for start in range(0, len(y), batch_size):
            out.append(model(z[start : start + batch_size].to(device), y[start : start + batch_size].to(device)).cpu())
            if callback is not None:
                callback(min(start + batch_size, len(y)))
        x = torch.cat(out) if out else torch.zeros(0, 1, self.image_size, self.image_size)
        return from_model_range(x)
