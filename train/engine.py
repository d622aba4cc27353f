"""The training loop of one fold, timm ``train.py`` style, on accelerate.

``train_fold`` reads top to bottom: :func:`build_fold` wires model, AdamW, a per-step
cosine schedule and ``accelerator.prepare`` (resuming if a resume state exists); each
epoch :func:`run_epoch` trains (``train_one_epoch``), scores the validation fold
(``evaluate``) and logs, :func:`select_epoch` applies early stopping and picks the best
checkpoint, :func:`save_epoch` writes it; :func:`finish_fold` tests the best checkpoint
once and writes the summary. The fold folder (:class:`toolkit.artifacts.run.FoldFolder`) keeps:

    model.safetensors + config.json   best checkpoint (highest validation AUC)
    metrics.csv                       epoch, train_loss, val_loss, val_auc, val_patient_auc, lr, seconds, slices_per_s
    val_predictions.csv               validation slices scored by the best checkpoint
    test_predictions.csv              test slices scored by the best checkpoint, written last (= fold done)
    summary.json                      best epoch, optimizer steps, samples per source
    last/                             resume state after each epoch (removed when the fold is done)

Resuming reloads ``last/`` (weights, optimizer, scheduler, counters, history, RNG) and
continues with the next epoch; every epoch re-seeds torch from (seed, fold, epoch) and the
balancer and augmentation are seeded the same way, so a resumed fold ends exactly where an
uninterrupted one does. Test predictions are made once, after training, with the best
checkpoint; they never steer any decision. Only the main process writes; under
``accelerate launch`` predictions are gathered with ``gather_for_metrics``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

from toolkit.artifacts.run import FoldFolder
from toolkit.config import Config
from train.balancer import SYNTHETIC
from train.data import (
    BalancedEpochDataset,
    RandSliceAugment,
    SliceDataset,
    SliceTransform,
    create_loader,
    memory_format_for,
)
from train.frozen import FrozenFeatures
from train.inference import fold_batchnorm, patient_scores
from train.model import WEIGHTS_NAME, create_classifier, save_classifier


class TrainHooks:
    """Callbacks into the loop (no-ops here): tests and tools observe or interrupt training.

    ``on_epoch_end`` runs after the epoch's files are written (its resume state when one is due,
    ``train.checkpoint_every_s``), so raising there is a clean interruption.
    """

    def on_train_epoch(self, organ: str, fold: int, epoch: int, dataset: BalancedEpochDataset) -> None:
        """Before an epoch's training pass; ``dataset.plan`` is what it will train on."""

    def on_evaluate(self, organ: str, fold: int, split: str, index: np.ndarray, source: np.ndarray) -> None:
        """After scoring ``split`` ("val" or "test"): the store rows and sources actually evaluated."""

    def on_epoch_end(self, organ: str, fold: int, epoch: int, metrics: dict[str, float]) -> None:
        """After an epoch's metrics and resume state are written."""


@dataclass
class FoldData:
    """Everything one fold trains and evaluates on.

    ``table`` is the real store's manifest; val/test dataset ``index`` values are its rows.
    ``features`` keeps the frozen front's features of validation and test batches (one per organ,
    shared by its folds); ``None`` scores every pass in full.
    """

    organ: str
    fold: int
    train_set: BalancedEpochDataset
    val_set: SliceDataset
    test_set: SliceDataset
    table: pd.DataFrame
    features: FrozenFeatures | None = None


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, organ, fold, epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def injury_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits against targets in [0, 1]: hard labels, or the soft targets of
    organ crops (patient label x organ visibility). Mean over the batch.

    logits, targets : tensors of shape (B,), float32
    """
    return nn.functional.binary_cross_entropy_with_logits(logits, targets)


def binary_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC, NaN when ``labels`` hold a single class."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


def batch_loss(loss_fn: nn.Module, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The training loss of one batch: ``loss_fn`` (BCE with logits) of the logits against ``batch["y"]``."""
    return loss_fn(logits.float(), batch["y"])


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    accelerator: Accelerator,
    transform: SliceTransform,
    progress: Any | None = None,
    task: Any | None = None,
) -> dict[str, float]:
    """One pass over ``loader``: ``transform`` on the device, forward, ``loss_fn`` (:func:`injury_loss`), backward,
    AdamW step, scheduler step.

    Running sums stay on the device and are read once at the end (no host sync per step).

    Returns
    -------
    dict
        ``loss`` (mean over samples on this process), ``steps``, ``samples``,
        ``synthetic`` (samples drawn from the synthetic pool), ``seconds``.
    """
    model.train()
    total_loss = torch.zeros((), device=accelerator.device)
    synthetic = torch.zeros((), dtype=torch.int64, device=accelerator.device)
    samples, steps = 0, 0
    start = time.perf_counter()
    for batch in loader:
        logits = model(transform(batch)).squeeze(1)
        loss = batch_loss(loss_fn, logits, batch)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        n = len(batch["y"])
        total_loss += loss.detach() * n
        synthetic += (batch["source"] == SYNTHETIC).sum()
        samples += n
        steps += 1
        if progress is not None and task is not None:
            progress.update(task, advance=1)
    total_loss, synthetic = float(total_loss), int(synthetic)
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(samples, 1),
        "steps": steps,
        "samples": samples,
        "synthetic": synthetic,
        "seconds": seconds,
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    transform: SliceTransform,
    features: FrozenFeatures | None = None,
    split: str = "val",
) -> dict[str, Any]:
    """Score every slice of ``loader`` (gathered over processes; copied to the host once, at the end).

    Scores with :func:`train.inference.fold_batchnorm`'s twin of the model (batch norms folded
    into the convolutions) in full precision, a fraction of the unfolded model's time. With
    ``features`` (one process, full precision), the frozen front runs once per ``split`` batch and
    later passes only run the trainable layers (:mod:`train.frozen`).

    Returns
    -------
    dict
        ``loss`` and ``auc`` (float), ``prob``/``label`` (ndarray (n,), float32),
        ``index``/``source`` (ndarray (n,), int64).
    """
    model.eval()
    full_precision = accelerator.mixed_precision == "no"
    score = None
    if features is not None and full_precision and accelerator.num_processes == 1:
        score = features.scorer(accelerator.unwrap_model(model), split, transform)
    if score is None:
        scorer = fold_batchnorm(accelerator.unwrap_model(model)) if full_precision else model

        def score(batch: dict[str, Any]) -> torch.Tensor:
            return scorer(transform(batch))

    logits, labels, index, source = [], [], [], []
    for batch in loader:
        out = score(batch).squeeze(1).float()
        gathered = accelerator.gather_for_metrics((out, batch["y"], batch["index"], batch["source"]))
        for acc, value in zip((logits, labels, index, source), gathered, strict=True):
            acc.append(value)
    logit, label, index, source = (torch.cat(acc).cpu() for acc in (logits, labels, index, source))
    loss = float(injury_loss(logit, label)) if len(label) else float("nan")
    prob = torch.sigmoid(logit).numpy().astype(np.float32)
    label = label.numpy()
    return {
        "loss": loss,
        "auc": binary_auc(label, prob),
        "prob": prob,
        "label": label,
        "index": index.numpy(),
        "source": source.numpy(),
    }


def patient_auc(table: pd.DataFrame, result: dict[str, Any], organ: str, how: str, top_k: int) -> float:
    """Patient-level AUC of scored slices: each patient's slice scores aggregated (``how``, ``top_k``)
    against the patient's grade in ``table`` (``<organ>_patient`` > 0); NaN with one class."""
    rows = table.iloc[result["index"]]
    scores = patient_scores(pd.DataFrame({"patient_id": rows["patient_id"].to_numpy(), "prob": result["prob"]}),
                            how, top_k)
    truth = rows.groupby("patient_id")[f"{organ}_patient"].max() > 0
    return binary_auc(truth.loc[scores.index].to_numpy(), scores.to_numpy())


def _prediction_frame(table: pd.DataFrame, result: dict[str, Any], fold: int) -> pd.DataFrame:
    rows = table.iloc[result["index"]]
    return pd.DataFrame(
        {
            "row": result["index"],
            "patient_id": rows["patient_id"].to_numpy(),
            "series_id": rows["series_id"].to_numpy(),
            "instance": rows["instance"].to_numpy(),
            "fold": fold,
            "label": result["label"].astype(np.int64),
            "prob": result["prob"],
        }
    )


def save_resume_state(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, trainer: dict) -> None:
    """Resume state after an epoch (weights, optimizer, scheduler, torch RNG, ``trainer`` counters); written to a
    temp folder then renamed so it is never half-written. Classifier folds and the organ localizer both use it."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_NAME))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    trainer = {**trainer, "scheduler": scheduler.state_dict()}
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.replace(directory)


def load_resume_state(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict:
    """Restore what :func:`save_resume_state` wrote; returns the ``trainer`` counters."""
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    trainer = json.loads((directory / "trainer.json").read_text())
    scheduler.load_state_dict(trainer.pop("scheduler"))
    torch.set_rng_state(load_file(str(directory / "rng.safetensors"))["torch"])
    return trainer


# ------------------------------------------------------------------ one fold: build, epoch, select, persist
def new_trainer_state() -> dict[str, Any]:
    """The counters a fold keeps between epochs (saved with the resume state as ``trainer.json``)."""
    return {
        "epoch": -1,  # last completed epoch
        "best_score": -math.inf,
        "best_epoch": -1,
        "best_val_auc": float("nan"),
        "bad_epochs": 0,
        "steps": 0,
        "samples": 0,
        "synthetic_samples": 0,
        "history": [],
        "stopped_early": False,
    }


@dataclass
class FoldParts:
    """What :func:`build_fold` wires for one fold (model, loaders, optimizer, scheduler after
    ``accelerator.prepare``) and ``trainer``, the counters of :func:`new_trainer_state`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    trainer: dict[str, Any]
    train_transform: SliceTransform  # window + augment + normalise, on the device
    eval_transform: SliceTransform  # window + normalise
    train_model: nn.Module  # what train_one_epoch runs: model, or its twin with frozen batch norms folded
    # The best epoch so far, kept in memory (weights, validation predictions, checkpoint extras) and written with
    # the resume state (train.checkpoint_every_s) and when the fold ends; None once written or on a resumed fold.
    best: dict[str, Any] | None = None
    saved_at: float = field(default_factory=time.perf_counter)  # when the resume state was last written


def build_fold(accelerator: Accelerator, cfg: Config, data: FoldData, fold: FoldFolder, organ_index: int) -> FoldParts:
    """Model, loaders, AdamW, a per-step cosine schedule, prepared; resumed from ``fold.state_dir`` if present."""
    tc = cfg.train
    torch.manual_seed(seed_for(cfg.seed, organ_index, data.fold))
    memory_format = memory_format_for(accelerator.device)
    model = create_classifier(cfg).to(memory_format=memory_format)
    pcfg = model.pretrained_cfg
    augment = RandSliceAugment() if tc.augment else None
    train_transform = SliceTransform(cfg.data.windows, pcfg["mean"], pcfg["std"], augment, memory_format)
    eval_transform = SliceTransform(cfg.data.windows, pcfg["mean"], pcfg["std"], None, memory_format)
    train_loader = create_loader(data.train_set, tc.batch_size, tc.num_workers)
    val_loader = create_loader(data.val_set, tc.batch_size * 2, tc.num_workers)
    test_loader = create_loader(data.test_set, tc.batch_size * 2, tc.num_workers)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    # Per-step cosine over the whole fold, counted before prepare (accelerate scales it per process).
    total_steps = tc.epochs * math.ceil(len(data.train_set) / tc.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1), eta_min=tc.lr * 0.01)
    model, optimizer, train_loader, val_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader, scheduler
    )
    trainer = new_trainer_state()
    if fold.state_dir.exists():
        trainer = load_resume_state(fold.state_dir, accelerator.unwrap_model(model), optimizer, scheduler)
    # The frozen layers (train.trainable_blocks) never change: fold their batch norms into their
    # convolutions once. The twin shares every trainable layer, so training it trains ``model``
    # (64 px, last 3 blocks trainable: ~1.5x per step on a CPU). One process in full precision
    # only: accelerate's DDP wrapper and autocast belong to ``model``.
    single = accelerator.num_processes == 1 and accelerator.mixed_precision == "no"
    train_model = fold_batchnorm(accelerator.unwrap_model(model), frozen_only=True) if single else model
    return FoldParts(model, optimizer, scheduler, injury_loss, train_loader, val_loader, test_loader,
                     trainer, train_transform, eval_transform, train_model)


def run_epoch(
    accelerator: Accelerator,
    cfg: Config,
    data: FoldData,
    parts: FoldParts,
    epoch: int,
    organ_index: int,
    hooks: TrainHooks,
    progress: Any | None = None,
    task: Any | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Train one epoch, score the validation fold, log the epoch into ``parts.trainer``.

    Returns
    -------
    row : dict
        The epoch's ``metrics.csv`` row (:data:`toolkit.artifacts.run.METRIC_COLUMNS`).
    val : dict
        :func:`evaluate` of the validation fold, plus ``patient_auc``.
    """
    tc = cfg.train
    start = time.perf_counter()
    torch.manual_seed(seed_for(cfg.seed, organ_index, data.fold, epoch))
    # accelerate's loader calls dataset.set_epoch(<its own pass count>) when iterated: set both,
    # or a resumed fold would replay epoch 0's plan.
    if hasattr(parts.train_loader, "set_epoch"):
        parts.train_loader.set_epoch(epoch)
    data.train_set.set_epoch(epoch)
    hooks.on_train_epoch(data.organ, data.fold, epoch, data.train_set)
    lr = parts.optimizer.param_groups[0]["lr"]
    stats = train_one_epoch(parts.train_model, parts.train_loader, parts.optimizer, parts.scheduler,
                            parts.loss_fn, accelerator, parts.train_transform, progress, task)
    val = evaluate(parts.model, parts.val_loader, accelerator, parts.eval_transform, data.features, "val")
    hooks.on_evaluate(data.organ, data.fold, "val", val["index"], val["source"])
    val["patient_auc"] = patient_auc(data.table, val, data.organ, tc.aggregate, tc.top_k)
    samples = stats["samples"] * accelerator.num_processes
    row = {
        "epoch": epoch,
        "train_loss": stats["loss"],
        "val_loss": val["loss"],
        "val_auc": val["auc"],
        "val_patient_auc": val["patient_auc"],
        "lr": lr,
        "seconds": time.perf_counter() - start,
        "slices_per_s": samples / max(stats["seconds"], 1e-9),
    }
    trainer = parts.trainer
    trainer["history"].append(row)
    trainer["steps"] += stats["steps"]
    trainer["samples"] += samples
    trainer["synthetic_samples"] += stats["synthetic"] * accelerator.num_processes
    return row, val


def select_epoch(trainer: dict[str, Any], row: dict[str, float], select_on: str, patience: int) -> bool:
    """Early stopping and the best checkpoint: is epoch ``row`` the best so far? Updates ``trainer``.

    The watched figure is the validation slice AUC (``select_on="slice"``) or patient AUC
    (``"patient"``); without both classes in the fold (NaN AUC) the validation loss is.
    ``patience`` epochs without improvement stop the fold.
    """
    watched = row["val_patient_auc"] if select_on == "patient" else row["val_auc"]
    score = watched if not math.isnan(watched) else -row["val_loss"]
    improved = score > trainer["best_score"]
    if improved:
        trainer.update(best_score=score, best_epoch=row["epoch"], best_val_auc=row["val_auc"], bad_epochs=0)
    else:
        trainer["bad_epochs"] += 1
        trainer["stopped_early"] = trainer["bad_epochs"] >= patience
    trainer["epoch"] = row["epoch"]
    return improved


def save_epoch(
    accelerator: Accelerator, cfg: Config, data: FoldData, fold: FoldFolder, parts: FoldParts,
    val: dict[str, Any], improved: bool,
) -> None:
    """After an epoch: keep the epoch in memory when it is the best; write metrics.csv (main process) and,
    at most every ``train.checkpoint_every_s`` seconds, the best checkpoint and the resume state.

    The last epoch writes no resume state: :func:`finish_fold` follows at once and writes the rest.
    """
    model = accelerator.unwrap_model(parts.model)
    trainer = parts.trainer
    if improved:
        parts.best = {
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "predictions": _prediction_frame(data.table, val, data.fold),
            "extra": {"windows": cfg.data.windows, "organ": data.organ, "fold": data.fold,
                      "epoch": trainer["epoch"], "val_auc": val["auc"]},
        }
    if not accelerator.is_main_process:
        return
    fold.write_metrics(trainer["history"])
    last = trainer["epoch"] + 1 >= cfg.train.epochs or trainer["stopped_early"]
    if last or time.perf_counter() - parts.saved_at < cfg.train.checkpoint_every_s:
        return
    if parts.best is not None:
        _write_best(model, fold, parts.best)
        parts.best = None
    save_resume_state(fold.state_dir, model, parts.optimizer, parts.scheduler, trainer)
    parts.saved_at = time.perf_counter()


def _write_best(model: nn.Module, fold: FoldFolder, best: dict[str, Any]) -> None:
    """The best epoch kept in memory, as the fold's checkpoint and validation predictions (main process)."""
    save_classifier(model, fold.path, extra=best["extra"], weights=best["weights"])
    fold.write_predictions("val", best["predictions"])


def finish_fold(
    accelerator: Accelerator, data: FoldData, fold: FoldFolder, parts: FoldParts, hooks: TrainHooks
) -> dict[str, Any]:
    """Score the test set once, with the best epoch's weights; write the best checkpoint, summary.json and
    the test predictions (last: they mark the fold done) and drop the resume state. Returns the summary."""
    model = accelerator.unwrap_model(parts.model)
    if parts.best is None:  # a resumed fold whose best epoch came before the interruption: written then
        model.load_state_dict(load_file(str(fold.path / WEIGHTS_NAME)))
    else:
        model.load_state_dict(parts.best["weights"])
        if accelerator.is_main_process:
            _write_best(model, fold, parts.best)
    test = evaluate(parts.model, parts.test_loader, accelerator, parts.eval_transform, data.features, "test")
    if data.features is not None:
        data.features.forget("val")  # the next fold validates other patients; the test set is shared
    hooks.on_evaluate(data.organ, data.fold, "test", test["index"], test["source"])
    trainer = parts.trainer
    summary = {
        "organ": data.organ,
        "fold": data.fold,
        "best_epoch": trainer["best_epoch"],
        "best_val_auc": trainer["best_val_auc"],
        "epochs_run": trainer["epoch"] + 1,
        "stopped_early": trainer["stopped_early"],
        "optimizer_steps": trainer["steps"],
        "train_samples": trainer["samples"],
        "synthetic_samples": trainer["synthetic_samples"],
        "train_real_slices": int(len(data.train_set.balancer.real_index)),
        "val_slices": int(len(data.val_set)),
        "test_slices": int(len(data.test_set)),
    }
    if accelerator.is_main_process:
        fold.write_summary(summary)
        fold.write_predictions("test", _prediction_frame(data.table, test, data.fold))
        shutil.rmtree(fold.state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return summary


def train_fold(
    accelerator: Accelerator,
    cfg: Config,
    data: FoldData,
    fold: FoldFolder,
    organ_index: int = 0,
    progress: Any | None = None,
    hooks: TrainHooks | None = None,
) -> dict[str, Any]:
    """Train, early-stop and test one fold; resumes from ``fold.state_dir`` when it exists.

    Parameters
    ----------
    fold : FoldFolder
        Where the fold's files go (``RunFolder.fold(organ, k)``).
    progress : progress object, optional
        ``reporter.progress()``'s object: one bar per fold, in optimizer steps.

    Returns
    -------
    dict
        The fold's ``summary.json`` content.
    """
    hooks = hooks or TrainHooks()
    tc = cfg.train
    if accelerator.is_main_process:
        fold.path.mkdir(parents=True, exist_ok=True)
    parts = build_fold(accelerator, cfg, data, fold, organ_index)
    steps_per_epoch = len(parts.train_loader)
    task = None
    if progress is not None:
        task = progress.add_task(f"{data.organ} fold {data.fold}", total=tc.epochs * steps_per_epoch,
                                 completed=(parts.trainer["epoch"] + 1) * steps_per_epoch, info="",
                                 visible=accelerator.is_main_process)

    for epoch in range(parts.trainer["epoch"] + 1, tc.epochs):
        if parts.trainer["stopped_early"]:
            break
        row, val = run_epoch(accelerator, cfg, data, parts, epoch, organ_index, hooks, progress, task)
        improved = select_epoch(parts.trainer, row, tc.select_on, tc.patience)
        save_epoch(accelerator, cfg, data, fold, parts, val, improved)
        accelerator.wait_for_everyone()
        if task is not None:
            progress.update(task, completed=(epoch + 1) * steps_per_epoch,
                            info=f"loss {row['train_loss']:.3f} | val AUC {row['val_auc']:.3f} | "
                                 f"{row['slices_per_s']:.0f} slices/s")
        hooks.on_epoch_end(data.organ, data.fold, epoch, row)

    if task is not None:
        progress.update(task, completed=tc.epochs * steps_per_epoch)  # full also when stopped early
    return finish_fold(accelerator, data, fold, parts, hooks)
