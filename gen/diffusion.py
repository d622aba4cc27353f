"""Class-conditional DDPM: diffusers ``UNet2DModel`` + ``DDPMScheduler``, trained with accelerate.

Training follows diffusers' ``examples/unconditional_image_generation/train_unconditional.py``:
noise ``x0`` to a random timestep with ``DDPMScheduler.add_noise``, predict the noise,
MSE loss, AdamW, gradient clipping, EMA of the weights (``EMAModel``). The class
label is replaced by the null label with probability ``label_dropout`` so one
network learns both conditional and unconditional noise (classifier-free guidance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from gen.base import (
    BaseGenerator,
    History,
    StepCallback,
    StepTimer,
    draw_balanced_batch,
    from_model_range,
    step_generator,
    to_model_range,
)
from gen.models.unet import build_unet
from gen.registry import register_generator
from gen.sampling import create_sampler, denoise
from toolkit.errors import ToolkitError


@register_generator("diffusion")
class DiffusionGenerator(BaseGenerator):
    """Class-conditional diffusion model with classifier-free guidance.

    Learned attributes: ``model_`` (the EMA UNet used for sampling), ``step_``
    (completed training steps), ``history_`` (per-step loss and images/s).
    """

    def _build_sampling_model(self) -> torch.nn.Module:
        return build_unet(self.image_size, self.n_classes, self.cfg.unet_channels, self.cfg.layers_per_block)

    def _architecture_keys(self) -> tuple[str, ...]:
        return (
            "image_size",
            "unet_channels",
            "layers_per_block",
            "num_train_timesteps",
            "beta_schedule",
            "prediction_type",
        )

    def noise_scheduler(self) -> DDPMScheduler:
        """The training noise schedule; samplers are built from its config."""
        if self.cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ToolkitError(
                f"unknown gen.prediction_type '{self.cfg.prediction_type}'; choose epsilon or v_prediction"
            )
        return DDPMScheduler(
            num_train_timesteps=self.cfg.num_train_timesteps,
            beta_schedule=self.cfg.beta_schedule,
            prediction_type=self.cfg.prediction_type,
        )

    def fit(
        self,
        images: Any,
        labels: np.ndarray,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        callback: StepCallback | None = None,
    ) -> DiffusionGenerator:
        """Train for ``cfg.train_steps`` steps (continuing from ``checkpoint_dir`` when ``resume``).

        Parameters
        ----------
        images : ndarray of shape (n, S, S), float in [0, 1], or any array-like whose
            ``images[idx]`` returns that (e.g. :class:`gen.data.WindowedSlices`)
        labels : ndarray of shape (n,), int classes 0..n_classes-1
        checkpoint_dir : path, optional
            Where ``config.json``, ``model.safetensors`` (EMA) and ``training_state.pt`` go
            every ``cfg.checkpoint_every`` steps and at the end (main process only).
        resume : bool, default=False
            Continue from the checkpoint in ``checkpoint_dir`` if there is one.
        callback : callable, optional
            ``callback(step, {"loss": ..., "img_per_s": ...})`` after each step.
        """
        cfg = self.cfg
        labels, class_index = self._check_fit_inputs(images, labels)
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            unet = self._build_sampling_model()
        train_scheduler = self.noise_scheduler()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-6)
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
        history = History(["step", "loss", "img_per_s"])
        start = 0
        state = self._load_training_state(Path(checkpoint_dir)) if (resume and checkpoint_dir) else None
        if state is not None:
            unet.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            ema.load_state_dict(state["ema"])
            start = int(state["step"])
            history.load(state["history"], start)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        ema.to(accelerator.device)
        unet.train()
        null_label = self.n_classes
        timer = StepTimer()
        for step in range(start, cfg.train_steps):
            g = step_generator(self.seed, step, accelerator.process_index)
            idx, y = draw_balanced_batch(class_index, cfg.batch_size, self.n_classes, g)
            x0 = to_model_range(images[idx])
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, cfg.num_train_timesteps, (len(x0),), generator=g)
            drop = torch.rand(len(x0), generator=g) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(torch.from_numpy(y), null_label), torch.from_numpy(y))
            x0, noise, t, y = (v.to(accelerator.device) for v in (x0, noise, t, y))

            noisy = train_scheduler.add_noise(x0, noise, t)
            pred = unet(noisy, t, class_labels=y).sample
            # The UNet predicts the noise, or with v_prediction v = sqrt(a) * noise - sqrt(1 - a) * x0.
            target = noise if cfg.prediction_type == "epsilon" else train_scheduler.get_velocity(x0, noise, t)
            loss = F.mse_loss(pred.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            ema.step(unet.parameters())

            done = step + 1
            logs = {"step": done, "loss": float(loss.detach()), "img_per_s": timer.lap(len(x0))}
            history.append(logs)
            self.step_ = done
            if callback is not None:
                callback(done, logs)
            at_checkpoint = cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0
            if checkpoint_dir is not None and at_checkpoint and done < cfg.train_steps:
                self._checkpoint(accelerator, unet, optimizer, ema, history, Path(checkpoint_dir))

        self.step_ = max(start, cfg.train_steps)
        self.history_ = history.to_records()
        self.model_ = self._ema_model(accelerator, unet, ema)
        if checkpoint_dir is not None:
            self._checkpoint(accelerator, unet, optimizer, ema, history, Path(checkpoint_dir))
        return self

    def _ema_model(self, accelerator: Accelerator, unet: torch.nn.Module, ema: EMAModel) -> torch.nn.Module:
        model = self._build_sampling_model().to(accelerator.device)
        model.load_state_dict(accelerator.unwrap_model(unet).state_dict())
        ema.copy_to(model.parameters())
        return model.eval()

    def _checkpoint(
        self,
        accelerator: Accelerator,
        unet: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMAModel,
        history: History,
        directory: Path,
    ) -> None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        self.model_ = self._ema_model(accelerator, unet, ema)
        state = {
            "step": torch.tensor(self.step_),
            "model": {k: v.detach().cpu() for k, v in accelerator.unwrap_model(unet).state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "history": history.to_tensor(),
        }
        self._save_checkpoint(directory, state)

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
            Default ``cfg.sampler``; ``ddpm`` always takes ``num_train_timesteps`` steps.
        num_inference_steps : int, optional
            Default ``cfg.sample_steps``.
        guidance_scale : float, optional
            Default ``cfg.guidance_scale``.

        Returns
        -------
        ndarray of shape (n, S, S), dtype=float32, values in [0, 1] (windowed intensities)
        """
        model = self._check_fitted()
        y = self._resolve_labels(n_per_class, labels)
        name = sampler or self.cfg.sampler
        scheduler = create_sampler(name, self.noise_scheduler())
        steps = self.cfg.num_train_timesteps if name == "ddpm" else (num_inference_steps or self.cfg.sample_steps)
        x = denoise(
            model,
            scheduler,
            torch.from_numpy(y),
            null_label=self.n_classes,
            num_inference_steps=steps,
            guidance_scale=self.cfg.guidance_scale if guidance_scale is None else guidance_scale,
            generator=torch.Generator().manual_seed(int(seed)),
            image_size=self.image_size,
            batch_size=batch_size,
            callback=callback,
        )
        return from_model_range(x)
