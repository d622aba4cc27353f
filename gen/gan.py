"""Conditional GAN: DCGAN-style generator, projection discriminator, hinge loss.

The fast alternative to diffusion: one forward pass per slice when sampling
and several times the training throughput on a CPU. Adam with betas (0.0, 0.9)
for both networks (as in SNGAN/BigGAN), spectral norm in the discriminator,
optionally an EMA of the generator weights for sampling. Batch-norm statistics
of the sampling generator are recomputed after training ("standing statistics"),
so a slice does not depend on the other slices of its batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
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
from gen.models.gan_nets import ConditionalGenerator, ProjectionDiscriminator, check_gan_size
from gen.registry import register_generator

STANDING_STATS_BATCHES = 16


@register_generator("gan")
class GANGenerator(BaseGenerator):
    """Class-conditional GAN (hinge loss, spectral-norm projection discriminator).

    Learned attributes: ``model_`` (the generator used for sampling, EMA weights when
    ``cfg.gan_ema``), ``step_``, ``history_`` (per-step d_loss, g_loss, images/s).
    """

    def _build_sampling_model(self) -> torch.nn.Module:
        return ConditionalGenerator(self.image_size, self.cfg.z_dim, self.cfg.ngf, self.n_classes)

    def _build_discriminator(self) -> torch.nn.Module:
        return ProjectionDiscriminator(self.image_size, self.cfg.ndf, self.n_classes)

    def _architecture_keys(self) -> tuple[str, ...]:
        return ("image_size", "z_dim", "ngf", "ndf", "gan_ema")

    def fit(
        self,
        images: Any,
        labels: np.ndarray,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        callback: StepCallback | None = None,
    ) -> GANGenerator:
        """Train for ``cfg.train_steps`` steps of one discriminator and one generator update.

        Parameters are those of :meth:`gen.diffusion.DiffusionGenerator.fit`; ``callback``
        receives ``{"d_loss", "g_loss", "img_per_s"}``.
        """
        cfg = self.cfg
        check_gan_size(self.image_size)
        labels, class_index = self._check_fit_inputs(images, labels)
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            netg = self._build_sampling_model()
            netd = self._build_discriminator()
        opt_g = torch.optim.Adam(netg.parameters(), lr=cfg.gan_lr, betas=(0.0, 0.9))
        opt_d = torch.optim.Adam(netd.parameters(), lr=cfg.gan_lr, betas=(0.0, 0.9))
        ema = EMAModel(netg.parameters(), decay=cfg.ema_decay) if cfg.gan_ema else None
        history = History(["step", "d_loss", "g_loss", "img_per_s"])
        start = 0
        state = self._load_training_state(Path(checkpoint_dir)) if (resume and checkpoint_dir) else None
        if state is not None:
            netg.load_state_dict(state["generator"])
            netd.load_state_dict(state["discriminator"])
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            start = int(state["step"])
            history.load(state["history"], start)
        netg, netd, opt_g, opt_d = accelerator.prepare(netg, netd, opt_g, opt_d)
        if ema is not None:
            ema.to(accelerator.device)
        netg.train()
        netd.train()
        timer = StepTimer()
        for step in range(start, cfg.train_steps):
            g = step_generator(self.seed, step, accelerator.process_index)
            idx, y_real = draw_balanced_batch(class_index, cfg.batch_size, self.n_classes, g)
            real = to_model_range(images[idx])
            z = torch.randn(len(real), cfg.z_dim, generator=g)
            y_fake = torch.randint(self.n_classes, (len(real),), generator=g)
            real, y_real, z, y_fake = (v.to(accelerator.device) for v in (real, torch.from_numpy(y_real), z, y_fake))

            fake = netg(z, y_fake)
            # Discriminator: hinge loss on real and (detached) fake slices.
            d_loss = F.relu(1.0 - netd(real, y_real)).mean() + F.relu(1.0 + netd(fake.detach(), y_fake)).mean()
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
            if ema is not None:
                ema.step(netg.parameters())

            done = step + 1
            logs = {
                "step": done,
                "d_loss": float(d_loss.detach()),
                "g_loss": float(g_loss.detach()),
                "img_per_s": timer.lap(len(real)),
            }
            history.append(logs)
            self.step_ = done
            if callback is not None:
                callback(done, logs)
            at_checkpoint = cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0
            if checkpoint_dir is not None and at_checkpoint and done < cfg.train_steps:
                self._checkpoint(accelerator, netg, netd, opt_g, opt_d, ema, history, Path(checkpoint_dir))

        self.step_ = max(start, cfg.train_steps)
        self.history_ = history.to_records()
        self.model_ = self._sampling_generator(accelerator, netg, ema)
        if checkpoint_dir is not None:
            self._checkpoint(accelerator, netg, netd, opt_g, opt_d, ema, history, Path(checkpoint_dir))
        return self

    @torch.no_grad()
    def _sampling_generator(
        self, accelerator: Accelerator, netg: torch.nn.Module, ema: EMAModel | None
    ) -> torch.nn.Module:
        model = self._build_sampling_model().to(accelerator.device)
        model.load_state_dict(accelerator.unwrap_model(netg).state_dict())
        if ema is not None:
            ema.copy_to(model.parameters())
        # Standing statistics: batch-norm running stats re-estimated for these (EMA) weights
        # as a plain average over fixed batches, then frozen for eval-mode sampling.
        g = torch.Generator().manual_seed(self.seed)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        model.train()
        for _ in range(STANDING_STATS_BATCHES):
            z = torch.randn(self.cfg.batch_size, self.cfg.z_dim, generator=g).to(accelerator.device)
            y = torch.randint(self.n_classes, (self.cfg.batch_size,), generator=g).to(accelerator.device)
            model(z, y)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.1
        return model.eval()

    def _checkpoint(
        self,
        accelerator: Accelerator,
        netg: torch.nn.Module,
        netd: torch.nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        ema: EMAModel | None,
        history: History,
        directory: Path,
    ) -> None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        self.model_ = self._sampling_generator(accelerator, netg, ema)
        state: dict[str, Any] = {
            "step": torch.tensor(self.step_),
            "generator": {k: v.detach().cpu() for k, v in accelerator.unwrap_model(netg).state_dict().items()},
            "discriminator": {k: v.detach().cpu() for k, v in accelerator.unwrap_model(netd).state_dict().items()},
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "history": history.to_tensor(),
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        self._save_checkpoint(directory, state)

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
        z = torch.randn(len(y), self.cfg.z_dim, generator=torch.Generator().manual_seed(int(seed)))
        out = []
        for start in range(0, len(y), batch_size):
            out.append(model(z[start : start + batch_size].to(device), y[start : start + batch_size].to(device)).cpu())
            if callback is not None:
                callback(min(start + batch_size, len(y)))
        x = torch.cat(out) if out else torch.zeros(0, 1, self.image_size, self.image_size)
        return from_model_range(x)
