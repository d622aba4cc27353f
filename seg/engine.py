"""Train the organ localizer, predict label maps, measure Dice.

``train_segmenter`` is one loop that reads top to bottom: per epoch it re-seeds torch from
(seed, epoch), shuffles the slices by (seed, epoch), runs DiceCE + AdamW on a per-step cosine
schedule, and saves a resume state (``last/``: weights, optimizer, scheduler, counters) before
the next epoch, so a resumed training ends exactly where an uninterrupted one does. Accelerate
owns the device and precision; only the main process writes.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from seg.data import RandAffineIntensity, SegmentDataset, create_loader
from seg.model import OrganSegmenter
from seg.store import NUM_CLASSES, SEG_ORGANS
from toolkit.config import SegmentConfig
from train.engine import load_resume_state, save_resume_state

STATE_DIR = "last"
METRICS_FILE = "metrics.csv"


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def train_one_epoch(
    model: torch.nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: torch.nn.Module,
    accelerator: Accelerator,
    augment: RandAffineIntensity | None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass: (augment), forward, DiceCE, backward, AdamW step, scheduler step.

    Returns
    -------
    dict
        ``loss`` (mean over samples), ``steps``, ``samples``, ``seconds``.
    """
    model.train()
    total, samples, steps = 0.0, 0, 0
    start = time.perf_counter()
    for batch in loader:
        x, y = batch["x"], batch["y"]
        if augment is not None:
            x, y = augment(x, y)
        loss = loss_fn(model(x).float(), y)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total += float(loss.detach()) * len(x)
        samples += len(x)
        steps += 1
        if on_step is not None:
            on_step()
    return {"loss": total / max(samples, 1), "steps": steps, "samples": samples,
            "seconds": time.perf_counter() - start}


def train_segmenter(
    accelerator: Accelerator,
    sc: SegmentConfig,
    seed: int,
    dataset: SegmentDataset,
    out_dir: Path,
    fingerprint: dict[str, Any],
    progress: Any = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> OrganSegmenter:
    """Train on ``dataset`` for ``sc.epochs`` epochs; continue from ``out_dir/last`` when it exists.

    Writes ``out_dir/model.safetensors`` + ``config.json`` (with ``fingerprint``) and
    ``metrics.csv``, and removes ``last/`` when done.

    Parameters
    ----------
    on_epoch_end : callable, optional
        ``f(epoch, metrics)`` after an epoch's resume state is saved (raising there is a clean
        interruption).

    Returns
    -------
    OrganSegmenter
        The trained network (unwrapped, on the accelerator's device).
    """
    from monai.losses import DiceCELoss

    out_dir = Path(out_dir)
    state_dir = out_dir / STATE_DIR
    main = accelerator.is_main_process
    torch.manual_seed(seed_for(seed, 0))
    model = OrganSegmenter.from_config(sc)
    loader = create_loader(dataset, sc.batch_size, sc.num_workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    total_steps = sc.epochs * math.ceil(len(dataset) / sc.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1), eta_min=sc.lr * 0.01)
    # Dice over the whole batch (batch=True): a kidney covers ~1% of a slice and is absent from many;
    # per-slice Dice of an absent organ would be noise.
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    augment = RandAffineIntensity() if sc.augment else None

    trainer: dict[str, Any] = {"epoch": -1, "steps": 0, "history": [], "fingerprint": fingerprint}
    if state_dir.exists():
        trainer = load_resume_state(state_dir, accelerator.unwrap_model(model), optimizer, scheduler)

    steps_per_epoch = len(loader)
    task = None
    if progress is not None:
        task = progress.add_task(
            "segmenter", total=sc.epochs * steps_per_epoch, completed=(trainer["epoch"] + 1) * steps_per_epoch, info=""
        )
    for epoch in range(trainer["epoch"] + 1, sc.epochs):
        torch.manual_seed(seed_for(seed, 1, epoch))
        dataset.reorder(epoch)
        stats = train_one_epoch(
            model, loader, optimizer, scheduler, loss_fn, accelerator, augment,
            on_step=(lambda: progress.advance(task)) if task is not None else None,
        )
        row = {"epoch": epoch, "train_loss": stats["loss"], "lr": scheduler.get_last_lr()[0],
               "seconds": stats["seconds"], "slices_per_s": stats["samples"] / max(stats["seconds"], 1e-9)}
        trainer["history"].append(row)
        trainer["steps"] += stats["steps"]
        trainer["epoch"] = epoch
        if main:
            pd.DataFrame(trainer["history"]).to_csv(out_dir / METRICS_FILE, index=False)
            save_resume_state(state_dir, accelerator.unwrap_model(model), optimizer, scheduler, trainer)
        accelerator.wait_for_everyone()
        if task is not None:
            progress.update(task, completed=(epoch + 1) * steps_per_epoch,
                            info=f"loss {stats['loss']:.3f} | {row['slices_per_s']:.0f} slices/s")
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)

    net = accelerator.unwrap_model(model)
    if main:
        net.save_pretrained(out_dir, extra={"fingerprint": fingerprint, "epochs": sc.epochs, "steps": trainer["steps"]})
        shutil.rmtree(state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return net.eval()


@torch.inference_mode()
def predict_labels(
    model: OrganSegmenter,
    images: np.ndarray,
    rows: np.ndarray,
    out: np.ndarray,
    device: torch.device,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Label maps of store slices ``rows``, written into ``out[rows]`` at the store's size.

    Logits are upsampled (bilinear) from the network's size to the store's before the argmax,
    so organ borders are smooth at the stored resolution.

    Parameters
    ----------
    images : ndarray of shape (n_slices, S, S), dtype=int16
        The store's HU slices (a memory map is fine: only ``rows`` are read).
    rows : ndarray of shape (m,), dtype=int64
    out : ndarray of shape (n_slices, S, S), dtype=uint8
        Written at ``rows``.
    """
    model.eval()
    size = images.shape[-1]
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        x = torch.from_numpy(model.preprocess(np.asarray(images[idx]))).to(device)
        logits = model(x).float()
        if logits.shape[-1] != size:
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        # max(1).indices: the argmax (first maximum), several times faster than argmax(1) on a CPU.
        out[idx] = logits.max(1).indices.to(torch.uint8).cpu().numpy()
        if on_batch is not None:
            on_batch(len(idx))


def series_dice(pred: np.ndarray, truth: np.ndarray, series_id: np.ndarray) -> pd.DataFrame:
    """Per-series, per-organ Dice of label maps (MONAI ``DiceMetric`` over each series' slice stack).

    Parameters
    ----------
    pred, truth : ndarray of shape (n, S, S), dtype=uint8
        Predicted and real label maps of the same slices.
    series_id : ndarray of shape (n,)

    Returns
    -------
    DataFrame
        One row per series: ``series_id``, ``slices``, and one column per organ of
        :data:`SEG_ORGANS` (NaN where the organ is absent from the series' real mask).
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    series_id = np.asarray(series_id)
    rows = []
    for sid in pd.unique(series_id):
        at = series_id == sid
        # (1, n_classes, n_slices, S, S): the series as one volume.
        p = one_hot(torch.from_numpy(pred[at].astype(np.int64))[None, None], NUM_CLASSES, dim=1)
        t = one_hot(torch.from_numpy(truth[at].astype(np.int64))[None, None], NUM_CLASSES, dim=1)
        values = metric(p, t)[0].numpy()
        rows.append({"series_id": sid, "slices": int(at.sum()), **dict(zip(SEG_ORGANS, values.tolist(), strict=True))})
    return pd.DataFrame(rows, columns=["series_id", "slices", *SEG_ORGANS])
