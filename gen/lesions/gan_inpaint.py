"""The lesion GAN: an inpainting generator against the class-projection discriminator.

``G`` (:class:`gen.lesions.nets.InpaintGenerator`) gets a healthy crop with a lesion-shaped hole
(drawn from the shape priors), the hole's mask, noise and a class, and fills the hole; the
composite ``crop * (1 - mask) + G(...) * mask`` is what the discriminator sees. ``D``
(:class:`gen.models.gan_nets.ProjectionDiscriminator`, the image GAN's) sees real organ crops
with their classes, healthy and injured (class-balanced), against the composites with the class
they were asked for, so ``G`` learns what makes a crop of that class look real where it may
draw: an injured-looking lesion for an injured class.

Half of the fakes of a step ask for class healthy: their hole must be refilled with the source's
own tissue, an L1 target (weight ``gen.lesion.gan_recon_weight``) that teaches ``G`` the crop's
anatomy and texture around the hole from the first step, while the adversarial loss teaches
the injuries. Hinge losses, Adam (0.0, 0.9) and the EMA of ``G`` follow the image GAN
(``gen.gan``: lr, z_dim, ngf, ndf, ema, ema_decay). Trained by :func:`gen.training.fit_generator`;
the (healthy crop, lesion mask, class) triples of each step come through its ``step_inputs``
hook from a :class:`gen.lesions.pairs.LesionPlan` drawn in advance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from gen.base import BaseGenerator, from_model_range, to_model_range
from gen.gan import adversarial_parts
from gen.lesions.backend import LesionBackend
from gen.lesions.nets import InpaintGenerator
from gen.lesions.pairs import LesionPlan
from gen.models.gan_nets import ProjectionDiscriminator, check_gan_size
from gen.registry import register_generator
from gen.training import TrainingParts, fit_generator
from toolkit.errors import ContractError

HEALTHY_SHARE = 0.5
"""Share of a step's fakes asked to refill their hole as healthy (the L1 reconstruction target)."""


@register_generator("gan", mode="lesion")
class InpaintGANGenerator(LesionBackend, BaseGenerator):
    """Conditional inpainting GAN for lesions (see the module docstring).

    Learned attributes: ``model_`` (the EMA inpainting generator), ``step_``, ``history_``
    (per-step d_loss, g_loss (adversarial), recon_l1, images/s).
    """

    log_columns = ("d_loss", "g_loss", "recon_l1")

    def _build_sampling_model(self) -> torch.nn.Module:
        gcfg = self.cfg.gan
        return InpaintGenerator(self.image_size, gcfg.z_dim, gcfg.ngf, self.n_classes)

    def _architecture_keys(self) -> tuple[str, ...]:
        return ("image_size", "gan.z_dim", "gan.ngf", "gan.ndf", "gan.ema")

    def fit(
        self,
        images: Any,
        labels: np.ndarray,
        lesion_plan: LesionPlan | None = None,
        checkpoint_dir: Any = None,
        resume: bool = False,
        callback: Any = None,
    ) -> BaseGenerator:
        """Train for ``cfg.train_steps`` steps.

        Parameters
        ----------
        images : array-like of shape (n, S, S), float in [0, 1]
            Real organ crops, windowed (``images[idx]`` must work, as for the image backends).
        labels : ndarray of shape (n,), int
            Class of each crop; the discriminator's real examples.
        lesion_plan : LesionPlan
            Healthy source rows of ``images`` with their lesion masks and classes
            (:func:`gen.lesions.pairs.training_plan`); each step draws ``batch_size`` of them.
        checkpoint_dir, resume, callback
            As :meth:`gen.base.BaseGenerator.fit`.
        """
        plan = self._check_plan(lesion_plan, images, labels)
        source_rows, masks, classes = plan.source_rows, plan.lesion_masks, plan.classes
        batch_size = self.cfg.batch_size

        def draw(generator: torch.Generator) -> dict[str, torch.Tensor]:
            pick = torch.randint(len(source_rows), (batch_size,), generator=generator).numpy()
            return {
                "sources": to_model_range(images[source_rows[pick]]),
                "masks": torch.from_numpy(masks[pick].astype(np.float32)).unsqueeze(1),
                "fake_labels": torch.from_numpy(classes[pick].astype(np.int64)),
            }

        return fit_generator(
            self, images, labels, checkpoint_dir=checkpoint_dir, resume=resume, callback=callback, step_inputs=draw
        )

    def _check_plan(self, plan: LesionPlan | None, images: Any, labels: np.ndarray) -> LesionPlan:
        if plan is None or len(plan) == 0:
            raise ContractError("the lesion GAN trains on a lesion plan (healthy crops + lesion masks); none was given")
        shape = (len(plan), self.image_size, self.image_size)
        if tuple(np.shape(plan.lesion_masks)) != shape:
            raise ContractError(f"lesion plan masks have shape {np.shape(plan.lesion_masks)}, expected {shape}")
        rows = np.asarray(plan.source_rows)
        if rows.min() < 0 or rows.max() >= len(labels) or (np.asarray(labels)[rows] != 0).any():
            raise ContractError("lesion plan source rows must be healthy (class 0) rows of the training crops")
        if plan.classes.min() < 1 or plan.classes.max() >= self.n_classes:
            raise ContractError(f"lesion plan classes must lie in 1..{self.n_classes - 1}")
        return plan

    # ------------------------------------------------------------ training hooks (gen.training.fit_generator)
    def build_training(self) -> TrainingParts:
        """Inpainting generator, projection discriminator, an Adam for each, optionally an EMA of G."""
        gcfg = self.cfg.gan
        check_gan_size(self.image_size)
        netg = self._build_sampling_model()
        netd = ProjectionDiscriminator(self.image_size, gcfg.ndf, self.n_classes)
        return adversarial_parts(netg, netd, gcfg)

    def training_step(
        self,
        parts: TrainingParts,
        batch: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        accelerator: Accelerator,
        *,
        sources: torch.Tensor,
        masks: torch.Tensor,
        fake_labels: torch.Tensor,
    ) -> dict[str, float]:
        """One discriminator update (real crops vs composites), then one generator update.

        ``sources`` (b, 1, S, S) healthy crops in [-1, 1], ``masks`` (b, 1, S, S) lesion masks and
        ``fake_labels`` (b,) their injured classes come from the ``step_inputs`` hook.
        """
        netg, netd = parts.modules["generator"], parts.modules["discriminator"]
        opt_g, opt_d = parts.optimizers["opt_g"], parts.optimizers["opt_d"]
        device = batch.device
        b = len(sources)
        noise = torch.randn((b, 1, self.image_size, self.image_size), generator=generator).to(device)
        z = torch.randn(b, self.cfg.gan.z_dim, generator=generator).to(device)
        healthy = (torch.rand(b, generator=generator) < HEALTHY_SHARE).to(device)
        y_fake = torch.where(healthy, torch.zeros_like(fake_labels), fake_labels)

        masked = sources * (1.0 - masks)
        out = netg(masked, masks, noise, z, y_fake)
        fake = masked + masks * out
        d_loss = F.relu(1.0 - netd(batch, labels)).mean() + F.relu(1.0 + netd(fake.detach(), y_fake)).mean()
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(d_loss)
        opt_d.step()

        netd.requires_grad_(False)
        adversarial = -netd(fake, y_fake).mean()
        # A healthy refill must give the source back: L1 over the hole's pixels of those fakes.
        weight = masks * healthy[:, None, None, None].float()
        recon = ((out - sources).abs() * weight).sum() / weight.sum().clamp_min(1.0)
        g_loss = adversarial + self.cfg.lesion.gan_recon_weight * recon
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(g_loss)
        opt_g.step()
        netd.requires_grad_(True)
        return {
            "d_loss": float(d_loss.detach()),
            "g_loss": float(adversarial.detach()),
            "recon_l1": float(recon.detach()),
        }

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def inpaint(
        self,
        crops: np.ndarray,
        lesion_masks: np.ndarray,
        labels: np.ndarray,
        seed: int = 0,
        batch_size: int = 256,
        callback: Any = None,
    ) -> np.ndarray:
        """Draw lesions of class ``labels`` into ``crops`` where ``lesion_masks`` hold: one pass of G.

        Parameters
        ----------
        crops : ndarray of shape (n, S, S), float in [0, 1]
            Healthy crops, windowed as in training; S must be ``gen.image_size``.
        lesion_masks : ndarray of shape (n, S, S), bool
        labels : ndarray of shape (n,), int
        seed : int, default=0
            Noise maps and latents of all crops come from a CPU generator seeded by it.

        Returns
        -------
        ndarray of shape (n, S, S), float32 in [0, 1]; exactly ``crops`` outside ``lesion_masks``.
        """
        model = self._check_fitted()
        crops, masks, y = self._check_inpaint_inputs(crops, lesion_masks, labels)
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(int(seed))
        n, size = len(crops), self.image_size
        noise = torch.randn((n, 1, size, size), generator=g)
        z = torch.randn(n, self.cfg.gan.z_dim, generator=g)
        source = to_model_range(crops)
        mask = torch.from_numpy(masks.astype(np.float32)).unsqueeze(1)
        labels_t = torch.from_numpy(y)
        out = []
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            masked = (source[part] * (1.0 - mask[part])).to(device)
            fill = model(masked, mask[part].to(device), noise[part].to(device), z[part].to(device),
                         labels_t[part].to(device))
            out.append((masked + mask[part].to(device) * fill).cpu())
            if callback is not None:
                callback(min(start + batch_size, n))
        x = torch.cat(out) if out else source
        return np.where(masks, from_model_range(x), crops)
