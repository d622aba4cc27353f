"""The one training loop every generator backend plugs into.

It follows diffusers' ``examples/unconditional_image_generation/train_unconditional.py``:
an ``Accelerator``, one ``accelerator.prepare``, then a loop of optimisation steps with
EMA updates, logs and periodic checkpoints, written out once in :func:`fit_generator`.

A backend (a :class:`gen.base.BaseGenerator` subclass) supplies what differs::

    build_training()                  -> TrainingParts: its networks, optimizers and EMA, untrained
    training_step(parts, batch, labels, generator, accelerator)
                                      -> {"loss": ...}: one optimisation step on one batch
    log_columns                       the keys training_step returns, e.g. ("d_loss", "g_loss")
    sampling_model(parts, accelerator) -> the network ``sample`` uses (EMA weights where kept)

The loop owns the rest: accelerate set-up, seeding, resume, the class-balanced batch and
the per-step randomness, EMA updates, history, timing and checkpoint cadence. A backend
that needs more than the batch in a step (the lesion GAN: healthy crops and lesion masks to
inpaint) passes ``step_inputs``, drawn right after the batch from the same step generator.

Reproducibility: everything random in step ``k`` (the batch, then the backend's noise,
timesteps, latents, label dropout) comes from one ``torch.Generator`` seeded by
``(seed, k, process)``, so a run resumed from a checkpoint at step ``k`` continues exactly
as the uninterrupted run would (on CPU), without saving RNG states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from gen.base import History, StepCallback, StepTimer, draw_balanced_batch, step_generator, to_model_range

if TYPE_CHECKING:
    from gen.base import BaseGenerator


@dataclass
class TrainingParts:
    """What a backend trains, by the names its checkpoint stores them under.

    Attributes
    ----------
    modules : dict of str to nn.Module
        The trained networks (``accelerator.prepare`` replaces them with their prepared versions).
    optimizers : dict of str to Optimizer
    sample_from : str
        Key of ``modules`` that ``sample`` runs (and that ``ema`` follows).
    ema : EMAModel, optional
        Exponential moving average of ``modules[sample_from]``'s weights, used for sampling.
    """

    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    sample_from: str
    ema: EMAModel | None = None


def fit_generator(
    backend: BaseGenerator,
    images: Any,
    labels: np.ndarray,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callback: StepCallback | None = None,
    step_inputs: Callable[[torch.Generator], dict[str, torch.Tensor]] | None = None,
) -> BaseGenerator:
    """Train ``backend`` for ``cfg.train_steps`` steps (continuing from ``checkpoint_dir`` when ``resume``).

    Parameters
    ----------
    backend : BaseGenerator
        An unfitted generator; its ``cfg`` (shared ``gen`` settings) and its hooks drive the loop.
    images : ndarray of shape (n, S, S), float in [0, 1], or any array-like whose
        ``images[idx]`` returns that (e.g. :class:`gen.data.WindowedSlices`)
    labels : ndarray of shape (n,), int classes 0..n_classes-1
    checkpoint_dir : path, optional
        Where ``config.json``, ``model.safetensors`` (the sampling weights) and ``training_state.pt``
        go every ``cfg.checkpoint_every`` steps and at the end (main process only).
    resume : bool, default=False
        Continue from the checkpoint in ``checkpoint_dir`` if there is one.
    callback : callable, optional
        ``callback(step, {"step", *backend.log_columns, "img_per_s"})`` after each step.
    step_inputs : callable, optional
        ``step_inputs(generator) -> {name: tensor}``: more inputs of a step, drawn from the step's
        generator after the batch; passed to ``training_step`` as keyword arguments (on the device).

    Returns
    -------
    BaseGenerator
        ``backend``, fitted: ``model_``, ``step_`` and ``history_`` set.
    """
    cfg = backend.cfg
    labels, class_index = backend._check_fit_inputs(images, labels)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    # Initial weights depend on the seed alone, not on whatever ran before in this process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(backend.seed)
        parts = backend.build_training()
    history = History(["step", *backend.log_columns, "img_per_s"])

    start = 0
    state = backend._load_training_state(Path(checkpoint_dir)) if (resume and checkpoint_dir) else None
    if state is not None:
        for name, module in parts.modules.items():
            module.load_state_dict(state[name])
        for name, optimizer in parts.optimizers.items():
            optimizer.load_state_dict(state[name])
        if parts.ema is not None:
            parts.ema.load_state_dict(state["ema"])
        start = int(state["step"])
        history.load(state["history"], start)

    prepared = accelerator.prepare(*parts.modules.values(), *parts.optimizers.values())
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    n_modules = len(parts.modules)
    parts.modules = dict(zip(parts.modules, prepared[:n_modules], strict=True))
    parts.optimizers = dict(zip(parts.optimizers, prepared[n_modules:], strict=True))
    if parts.ema is not None:
        parts.ema.to(accelerator.device)
    for module in parts.modules.values():
        module.train()

    timer = StepTimer()
    for step in range(start, cfg.train_steps):
        g = step_generator(backend.seed, step, accelerator.process_index)
        idx, y = draw_balanced_batch(class_index, cfg.batch_size, backend.n_classes, g)
        batch = to_model_range(images[idx]).to(accelerator.device)
        extra = {k: v.to(accelerator.device) for k, v in step_inputs(g).items()} if step_inputs else {}
        # The backend draws its own noise from ``g`` after the batch, so the order of draws is fixed.
        labels_t = torch.from_numpy(y).to(accelerator.device)
        step_logs = backend.training_step(parts, batch, labels_t, g, accelerator, **extra)
        if parts.ema is not None:
            parts.ema.step(parts.modules[parts.sample_from].parameters())

        done = step + 1
        logs = {"step": done, **step_logs, "img_per_s": timer.lap(len(batch))}
        history.append(logs)
        backend.step_ = done
        if callback is not None:
            callback(done, logs)
        at_checkpoint = cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0
        if checkpoint_dir is not None and at_checkpoint and done < cfg.train_steps:
            _checkpoint(backend, accelerator, parts, history, Path(checkpoint_dir))

    backend.step_ = max(start, cfg.train_steps)
    backend.history_ = history.to_records()
    backend.model_ = backend.sampling_model(parts, accelerator)
    if checkpoint_dir is not None:
        _checkpoint(backend, accelerator, parts, history, Path(checkpoint_dir), model=backend.model_)
    return backend


def _checkpoint(
    backend: BaseGenerator,
    accelerator: Accelerator,
    parts: TrainingParts,
    history: History,
    directory: Path,
    model: torch.nn.Module | None = None,
) -> None:
    """Sampling weights (``save_pretrained``) + a tensors-only training state, written by the main process."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    backend.model_ = model if model is not None else backend.sampling_model(parts, accelerator)
    state: dict[str, Any] = {"step": torch.tensor(backend.step_), "history": history.to_tensor()}
    for name, module in parts.modules.items():
        state[name] = {k: v.detach().cpu() for k, v in accelerator.unwrap_model(module).state_dict().items()}
    for name, optimizer in parts.optimizers.items():
        state[name] = optimizer.state_dict()
    if parts.ema is not None:
        state["ema"] = parts.ema.state_dict()
    backend._save_checkpoint(directory, state)
