"""Diffusion inpainting of lesions with the existing class-conditional UNet: RePaint.

RePaint (Lugmayr et al., CVPR 2022) inpaints with an *unconditional-on-the-mask* diffusion model:
at every reverse step the known region is replaced by the original image noised to that step
(``q(x_t | x_0)``), the unknown region is the model's own sample, and every ``jump_length`` steps
the sample is pushed back up the chain (re-noised) and denoised again, ``resample`` times, so the
model can harmonise its fill with the known pixels it was handed.

Why RePaint and not a UNet conditioned on the masked crop and the mask: it reuses the
class-conditional model ``toolkit gen`` already trains (image mode and lesion mode share one
checkpoint, and a trained image-mode generator can inpaint as it is), needs no retraining for a
new mask distribution (shape priors can change without touching the model), and the class label
(injured, or a grade) conditions the fill through the same embedding and classifier-free guidance
as whole-slice sampling. The price is sampling time: about ``steps x resample`` UNet evaluations
per crop instead of ``steps``.

The loop is written out in :func:`repaint` with diffusers' ``RePaintScheduler`` (built with the
training ``DDPMScheduler``'s betas); a v-prediction UNet's output is turned into the noise
estimate the scheduler expects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, RePaintScheduler

from gen.base import BaseGenerator, from_model_range, to_model_range
from gen.diffusion import DiffusionGenerator
from gen.lesions.backend import LesionBackend
from gen.registry import register_generator


def _guided(
    unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, null_label: int, scale: float
) -> torch.Tensor:
    """The UNet's output with classifier-free guidance ``uncond + scale * (cond - uncond)``."""
    if scale == 1.0:
        return unet(x, t, class_labels=labels).sample
    null = torch.full_like(labels, null_label)
    cond, uncond = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def repaint(
    unet: torch.nn.Module,
    train_scheduler: DDPMScheduler,
    sources: torch.Tensor,
    lesion_masks: torch.Tensor,
    class_labels: torch.Tensor,
    null_label: int,
    num_inference_steps: int,
    jump_length: int,
    resample: int,
    guidance_scale: float,
    generator: torch.Generator,
    batch_size: int = 64,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Fill ``lesion_masks`` of ``sources`` by RePaint's resampled reverse diffusion.

    Parameters
    ----------
    unet : UNet2DModel
        The class-conditional denoiser (label ``null_label`` = no class).
    train_scheduler : DDPMScheduler
        The training noise schedule (betas, prediction type).
    sources : Tensor of shape (n, 1, S, S), float in [-1, 1]
        The healthy crops.
    lesion_masks : Tensor of shape (n, 1, S, S), float, 1 where to draw
    class_labels : LongTensor of shape (n,)
    null_label : int
    num_inference_steps : int
        Reverse steps (spread over the training timesteps).
    jump_length : int
        Steps between jumps back up the chain ("j" in RePaint).
    resample : int
        Times each stretch is denoised ("r" in RePaint; 1 = no resampling).
    guidance_scale : float
    generator : torch.Generator
        CPU generator; the initial noise of all crops is drawn first.
    batch_size : int, default=64
    callback : callable, optional
        Called with the number of crops finished after each batch.

    Returns
    -------
    Tensor of shape (n, 1, S, S), float32 on CPU in [-1, 1]; the sources outside the masks
    (the final composite), the model's fill inside.
    """
    device = next(unet.parameters()).device
    c = train_scheduler.config
    scheduler = RePaintScheduler(
        num_train_timesteps=c.num_train_timesteps,
        beta_start=c.beta_start,
        beta_end=c.beta_end,
        beta_schedule=c.beta_schedule,
        trained_betas=None if c.trained_betas is None else np.asarray(c.trained_betas, dtype=np.float32),
        clip_sample=c.clip_sample,
        eta=1.0,  # DDPM's stochastic reverse step, as in the paper
    )
    alphas_cumprod = scheduler.alphas_cumprod
    v_prediction = train_scheduler.config.prediction_type == "v_prediction"
    n = len(sources)
    noise = torch.randn(sources.shape, generator=generator, dtype=torch.float32)
    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        original = sources[start:stop].to(device)
        keep = 1.0 - lesion_masks[start:stop].to(device)  # the scheduler's mask: 1 = known
        labels = class_labels[start:stop].to(device)
        scheduler.set_timesteps(num_inference_steps, jump_length=jump_length, jump_n_sample=resample)
        x = noise[start:stop].to(device)
        t_last = scheduler.timesteps[0] + 1
        for t in scheduler.timesteps:
            if t < t_last:
                pred = _guided(unet, x, t, labels, null_label, guidance_scale)
                if v_prediction:
                    # eps = sqrt(a) * v + sqrt(1 - a) * x_t (RePaintScheduler expects the noise).
                    a = alphas_cumprod[t].to(device)
                    pred = a.sqrt() * pred + (1 - a).sqrt() * x
                x = scheduler.step(pred, t, x, original, keep, generator=generator).prev_sample
            else:
                x = scheduler.undo_step(x, t_last, generator=generator)
            t_last = t
        x = keep * original + (1.0 - keep) * x.clamp(-1.0, 1.0)
        out.append(x.float().cpu())
        if callback is not None:
            callback(stop)
    return torch.cat(out) if out else sources.float().cpu()


@register_generator("diffusion", mode="lesion")
class DiffusionInpainter(LesionBackend, DiffusionGenerator):
    """The class-conditional diffusion model, trained on organ crops as in image mode, inpainting lesions.

    ``fit`` is the image-mode training (the lesion plan is not needed: the masks only enter at
    sampling); ``inpaint`` runs :func:`repaint` with ``gen.lesion.repaint_*`` settings.
    """

    def fit(
        self,
        images: Any,
        labels: np.ndarray,
        lesion_plan: Any = None,
        checkpoint_dir: Any = None,
        resume: bool = False,
        callback: Any = None,
    ) -> BaseGenerator:
        """Image-mode training on the organ crops; ``lesion_plan`` is accepted for a common signature and unused."""
        return super().fit(images, labels, checkpoint_dir=checkpoint_dir, resume=resume, callback=callback)

    @torch.no_grad()
    def inpaint(
        self,
        crops: np.ndarray,
        lesion_masks: np.ndarray,
        labels: np.ndarray,
        seed: int = 0,
        batch_size: int = 64,
        num_inference_steps: int | None = None,
        jump_length: int | None = None,
        resample: int | None = None,
        guidance_scale: float | None = None,
        callback: Any = None,
    ) -> np.ndarray:
        """Draw lesions of class ``labels`` into ``crops`` where ``lesion_masks`` hold.

        Parameters
        ----------
        crops : ndarray of shape (n, S, S), float in [0, 1]
            Healthy crops, windowed as in training; S must be ``gen.image_size``.
        lesion_masks : ndarray of shape (n, S, S), bool
        labels : ndarray of shape (n,), int
            Class of the fill (1 injured, or 1 low / 2 high).
        seed : int, default=0
            Same seed, batch size and settings: same crops.
        num_inference_steps, jump_length, resample : int, optional
            Default ``gen.lesion.repaint_steps``, ``repaint_jump_length``, ``repaint_resample``.
        guidance_scale : float, optional
            Default ``gen.diffusion.guidance_scale``.

        Returns
        -------
        ndarray of shape (n, S, S), float32 in [0, 1]; exactly ``crops`` outside ``lesion_masks``.
        """
        model = self._check_fitted()
        crops, masks, y = self._check_inpaint_inputs(crops, lesion_masks, labels)
        lcfg, dcfg = self.cfg.lesion, self.cfg.diffusion
        x = repaint(
            model,
            self.noise_scheduler(),
            to_model_range(crops),
            torch.from_numpy(masks.astype(np.float32)).unsqueeze(1),
            torch.from_numpy(y),
            null_label=self.n_classes,
            num_inference_steps=num_inference_steps or lcfg.repaint_steps,
            jump_length=jump_length or lcfg.repaint_jump_length,
            resample=resample or lcfg.repaint_resample,
            guidance_scale=dcfg.guidance_scale if guidance_scale is None else guidance_scale,
            generator=torch.Generator().manual_seed(int(seed)),
            batch_size=batch_size,
            callback=callback,
        )
        # Composited again in the caller's units, so the kept pixels are bit-identical.
        return np.where(masks, from_model_range(x), crops)
