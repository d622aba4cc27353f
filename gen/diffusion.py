"""Class-conditional DDPM: diffusers ``UNet2DModel`` + ``DDPMScheduler``, trained with accelerate.

Training follows diffusers' ``examples/unconditional_image_generation/train_unconditional.py``:
noise ``x0`` to a random timestep with ``DDPMScheduler.add_noise``, predict the noise,
MSE loss, AdamW, gradient clipping, EMA of the weights (``EMAModel``). The class
label is replaced by the null label with probability ``label_dropout`` so one
network learns both conditional and unconditional noise (classifier-free guidance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from gen.base import BaseGenerator, from_model_range
from gen.models.unet import build_unet
from gen.registry import register_generator
from gen.sampling import create_sampler, denoise
from gen.training import TrainingParts
from toolkit.errors import ToolkitError


@dataclass
class DiffusionParts(TrainingParts):
    """The UNet's training parts plus the noise schedule its steps use."""

    noise_scheduler: DDPMScheduler | None = None


@register_generator("diffusion")
class DiffusionGenerator(BaseGenerator):
    """Class-conditional diffusion model with classifier-free guidance.

    Learned attributes: ``model_`` (the EMA UNet used for sampling), ``step_``
    (completed training steps), ``history_`` (per-step loss and images/s).
    """

    log_columns = ("loss",)

    def _build_sampling_model(self) -> torch.nn.Module:
        dcfg = self.cfg.diffusion
        return build_unet(self.image_size, self.n_classes, dcfg.unet_channels, dcfg.layers_per_block)

    def _architecture_keys(self) -> tuple[str, ...]:
        return (
            "image_size",
            "diffusion.unet_channels",
            "diffusion.layers_per_block",
            "diffusion.num_train_timesteps",
            "diffusion.beta_schedule",
            "diffusion.prediction_type",
        )

    def noise_scheduler(self) -> DDPMScheduler:
        """The training noise schedule; samplers are built from its config."""
        dcfg = self.cfg.diffusion
        if dcfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ToolkitError(
                f"unknown gen.diffusion.prediction_type '{dcfg.prediction_type}'; choose epsilon or v_prediction"
            )
        return DDPMScheduler(
            num_train_timesteps=dcfg.num_train_timesteps,
            beta_schedule=dcfg.beta_schedule,
            prediction_type=dcfg.prediction_type,
        )

    # ------------------------------------------------------------ training hooks (gen.training.fit_generator)
    def build_training(self) -> DiffusionParts:
        """The UNet, AdamW and an EMA of the UNet (which sampling uses)."""
        unet = self._build_sampling_model()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=self.cfg.diffusion.lr, weight_decay=1e-6)
        return DiffusionParts(
            modules={"model": unet},
            optimizers={"optimizer": optimizer},
            sample_from="model",
            ema=EMAModel(unet.parameters(), decay=self.cfg.diffusion.ema_decay),
            noise_scheduler=self.noise_scheduler(),
        )

    def training_step(
        self,
        parts: DiffusionParts,
        batch: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        accelerator: Accelerator,
    ) -> dict[str, float]:
        """Noise ``batch`` to random timesteps, predict the noise (or v), MSE, one AdamW step."""
        dcfg = self.cfg.diffusion
        unet, optimizer, scheduler = parts.modules["model"], parts.optimizers["optimizer"], parts.noise_scheduler
        device = batch.device
        noise = torch.randn(batch.shape, generator=generator).to(device)
        t = torch.randint(0, dcfg.num_train_timesteps, (len(batch),), generator=generator).to(device)
        # Classifier-free guidance: the null label (n_classes) in place of the class, now and then.
        drop = (torch.rand(len(batch), generator=generator) < dcfg.label_dropout).to(device)
        y = torch.where(drop, torch.full_like(labels, self.n_classes), labels)

        noisy = scheduler.add_noise(batch, noise, t)
        pred = unet(noisy, t, class_labels=y).sample
        # The UNet predicts the noise, or with v_prediction v = sqrt(a) * noise - sqrt(1 - a) * x0.
        target = noise if dcfg.prediction_type == "epsilon" else scheduler.get_velocity(batch, noise, t)
        loss = F.mse_loss(pred.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def sample(
        self,
        n_per_class: int | None = None,
        labels: np.ndarray | None = None,
        seed: int = 0,
        batch_size: int = 64,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        callback: Any = None,
    ) -> np.ndarray:
        """Draw slices.

        Parameters
        ----------
        n_per_class : int, optional
            Draw this many of each class, in class order. Exclusive with ``labels``.
        labels : ndarray of shape (n,), optional
            The class of each slice to draw.
        seed : int, default=0
            Same seed, same slices (for the same batch_size and sampler).
        sampler : {"dpm", "ddim", "ddpm"}, optional
            Default ``cfg.diffusion.sampler``; ``ddpm`` always takes ``num_train_timesteps`` steps.
        num_inference_steps : int, optional
            Default ``cfg.diffusion.sample_steps``.
        guidance_scale : float, optional
            Default ``cfg.diffusion.guidance_scale``.

        Returns
        -------
        ndarray of shape (n, S, S), dtype=float32, values in [0, 1] (windowed intensities)
        """
        model = self._check_fitted()
        y = self._resolve_labels(n_per_class, labels)
        dcfg = self.cfg.diffusion
        name = sampler or dcfg.sampler
        scheduler = create_sampler(name, self.noise_scheduler())
        steps = dcfg.num_train_timesteps if name == "ddpm" else (num_inference_steps or dcfg.sample_steps)
        x = denoise(
            model,
            scheduler,
            torch.from_numpy(y),
            null_label=self.n_classes,
            num_inference_steps=steps,
            guidance_scale=dcfg.guidance_scale if guidance_scale is None else guidance_scale,
            generator=torch.Generator().manual_seed(int(seed)),
            image_size=self.image_size,
            batch_size=batch_size,
            callback=callback,
        )
        return from_model_range(x)
