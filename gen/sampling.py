"""Class-conditional denoising with classifier-free guidance, written out in one loop.

diffusers' ``DDPMPipeline`` takes no class label, so the loop lives here. The
schedulers are diffusers' own, built from the training ``DDPMScheduler``'s config:

- ``dpm``: ``DPMSolverMultistepScheduler`` (DPM-Solver++, 20 steps is usually enough)
- ``ddim``: ``DDIMScheduler`` (deterministic, eta = 0)
- ``ddpm``: ``DDPMScheduler`` at every training timestep (the slow reference)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from toolkit.errors import ToolkitError

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "dpm": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
}


def create_sampler(name: str, train_scheduler: DDPMScheduler) -> SchedulerMixin:
    """A sampling scheduler sharing the noise schedule the model was trained with.

    DPM-Solver++ gets dynamic thresholding at 1.0: its x0 predictions are clipped to the data
    range [-1, 1] as DDPM and DDIM do with ``clip_sample``. Without it, an x0 estimate at the
    noisiest timestep (where x0 = (x - sigma * eps) / alpha divides by a tiny alpha) can
    saturate the whole slice.
    """
    if name not in SAMPLERS:
        raise ToolkitError(f"unknown sampler '{name}' (gen.sampler); valid samplers: {', '.join(SAMPLERS)}")
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(train_scheduler.config, thresholding=True, sample_max_value=1.0)
    return SAMPLERS[name].from_config(train_scheduler.config)


@torch.no_grad()
def denoise(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    class_labels: torch.Tensor,
    null_label: int,
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator,
    image_size: int,
    batch_size: int = 64,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Draw images for ``class_labels`` by reverse diffusion.

    Parameters
    ----------
    unet : UNet2DModel
        Noise predictor taking ``class_labels``; label ``null_label`` means "no class".
    scheduler : SchedulerMixin
        From :func:`create_sampler`; its timesteps are reset for every batch.
    class_labels : LongTensor of shape (n,)
    null_label : int
        The unconditional label used for classifier-free guidance.
    num_inference_steps : int
        Denoising steps (ignored count for DDPM: pass ``num_train_timesteps``).
    guidance_scale : float
        ``pred = uncond + s * (cond - uncond)`` on the UNet's output (noise or v, whichever the
        scheduler's ``prediction_type`` says; the guidance is linear in either); 1.0 skips the
        unconditional pass.
    generator : torch.Generator
        CPU generator; initial noise for all n images is drawn first, so the result
        does not depend on the device.
    image_size : int
    batch_size : int, default=64
    callback : callable, optional
        Called with the number of images finished after each batch.

    Returns
    -------
    Tensor of shape (n, 1, image_size, image_size), float32 on CPU, values in [-1, 1]
    """
    device = next(unet.parameters()).device
    n = len(class_labels)
    noise = torch.randn((n, 1, image_size, image_size), generator=generator, dtype=torch.float32)
    out = []
    for start in range(0, n, batch_size):
        labels = class_labels[start : start + batch_size].to(device)
        scheduler.set_timesteps(num_inference_steps)
        x = noise[start : start + batch_size].to(device) * scheduler.init_noise_sigma
        null = torch.full_like(labels, null_label)
        for t in scheduler.timesteps:
            if guidance_scale == 1.0:
                model_in = scheduler.scale_model_input(x, t)
                pred = unet(model_in, t, class_labels=labels).sample
            else:
                model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
                cond, uncond = unet(model_in, t, class_labels=torch.cat([labels, null])).sample.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(pred, t, x, generator=generator).prev_sample
        out.append(x.clamp(-1.0, 1.0).float().cpu())
        if callback is not None:
            callback(min(start + batch_size, n))
    return torch.cat(out) if out else noise
