"""The training loop of one fold, timm ``train.py`` style, on accelerate.

``train_fold`` wires the pieces for one (organ, fold): model, AdamW, a per-step cosine
schedule, ``accelerator.prepare``, then ``train_one_epoch`` / ``evaluate`` each epoch with
early stopping on validation AUC. It keeps, in ``fold_dir``:

    model.safetensors + config.json   best checkpoint (highest validation AUC)
    metrics.csv                       epoch, train_loss, val_loss, val_auc, lr, seconds, slices_per_s
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from rich.progress import Progress, TaskID
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

from toolkit.config import Config
from train.balancer import SYNTHETIC
from train.data import (
    BalancedEpochDataset,
    RandSliceAugment,
    SliceCollate,
    SliceDataset,
    create_loader,
)
from train.inference import patient_scores
from train.model import WEIGHTS_NAME, create_classifier, save_classifier

METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "val_patient_auc", "lr", "seconds", "slices_per_s"]
STATE_DIR = "last"
DONE_FILE = "test_predictions.csv"


class TrainHooks:
    """Callbacks into the loop (no-ops here): tests and tools observe or interrupt training.

    ``on_epoch_end`` runs after the epoch's resume state is saved, so raising there is a
    clean interruption.
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
    """

    organ: str
    fold: int
    train_set: BalancedEpochDataset
    val_set: SliceDataset
    test_set: SliceDataset
    table: pd.DataFrame


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, organ, fold, epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def binary_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC, NaN when ``labels`` hold a single class."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: nn.Module,
    accelerator: Accelerator,
    progress: Progress | None = None,
    task: TaskID | None = None,
) -> dict[str, float]:
    """One pass over ``loader``: forward, BCE-with-logits, backward, AdamW step, scheduler step.

    Returns
    -------
    dict
        ``loss`` (mean over samples on this process), ``steps``, ``samples``,
        ``synthetic`` (samples drawn from the synthetic pool), ``seconds``.
    """
    model.train()
    total_loss, samples, synthetic, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    for batch in loader:
        logits = model(batch["x"]).squeeze(1)
        loss = loss_fn(logits.float(), batch["y"])
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        n = len(batch["y"])
        total_loss += float(loss.detach()) * n
        samples += n
        synthetic += int((batch["source"] == SYNTHETIC).sum())
        steps += 1
        if progress is not None and task is not None:
            progress.update(task, advance=1)
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(samples, 1),
        "steps": steps,
        "samples": samples,
        "synthetic": synthetic,
        "seconds": seconds,
    }


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, Any]:
    """Score every slice of ``loader`` (gathered over processes).

    Returns
    -------
    dict
        ``loss`` and ``auc`` (float), ``prob``/``label`` (ndarray (n,), float32),
        ``index``/``source`` (ndarray (n,), int64).
    """
    model.eval()
    logits, labels, index, source = [], [], [], []
    for batch in loader:
        out = model(batch["x"]).squeeze(1).float()
        gathered = accelerator.gather_for_metrics((out, batch["y"], batch["index"], batch["source"]))
        for acc, value in zip((logits, labels, index, source), gathered, strict=True):
            acc.append(value.cpu())
    logit = torch.cat(logits)
    label = torch.cat(labels)
    loss = float(nn.functional.binary_cross_entropy_with_logits(logit, label)) if len(label) else float("nan")
    prob = torch.sigmoid(logit).numpy().astype(np.float32)
    label = label.numpy()
    return {
        "loss": loss,
        "auc": binary_auc(label, prob),
        "prob": prob,
        "label": label,
        "index": torch.cat(index).numpy(),
        "source": torch.cat(source).numpy(),
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


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    pd.DataFrame(history, columns=METRIC_COLUMNS).to_csv(path, index=False)


def _save_state(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, trainer: dict) -> None:
    """Resume state after an epoch; written to a temp folder then renamed so it is never half-written."""
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


def _load_state(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict:
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    trainer = json.loads((directory / "trainer.json").read_text())
    scheduler.load_state_dict(trainer.pop("scheduler"))
    torch.set_rng_state(load_file(str(directory / "rng.safetensors"))["torch"])
    return trainer


def train_fold(
    accelerator: Accelerator,
    cfg: Config,
    data: FoldData,
    fold_dir: Path,
    organ_index: int = 0,
    progress: Progress | None = None,
    hooks: TrainHooks | None = None,
) -> dict[str, Any]:
    """Train, early-stop and test one fold; resumes from ``fold_dir/last`` when it exists.

    Returns
    -------
    dict
        The fold's ``summary.json`` content.
    """
    hooks = hooks or TrainHooks()
    tc = cfg.train
    fold_dir = Path(fold_dir)
    state_dir = fold_dir / STATE_DIR
    main = accelerator.is_main_process
    if main:
        fold_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed_for(cfg.seed, organ_index, data.fold))
    model = create_classifier(cfg)
    pcfg = model.pretrained_cfg
    augment = RandSliceAugment() if tc.augment else None
    train_collate = SliceCollate(cfg.data.windows, pcfg["mean"], pcfg["std"], augment)
    eval_collate = SliceCollate(cfg.data.windows, pcfg["mean"], pcfg["std"], None)
    train_loader = create_loader(data.train_set, train_collate, tc.batch_size, tc.num_workers)
    val_loader = create_loader(data.val_set, eval_collate, tc.batch_size * 2, tc.num_workers)
    test_loader = create_loader(data.test_set, eval_collate, tc.batch_size * 2, tc.num_workers)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    # Per-step cosine over the whole fold, counted before prepare (accelerate scales it per process).
    total_steps = tc.epochs * math.ceil(len(data.train_set) / tc.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1), eta_min=tc.lr * 0.01)
    loss_fn = nn.BCEWithLogitsLoss()
    model, optimizer, train_loader, val_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader, scheduler
    )

    trainer: dict[str, Any] = {
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
    if state_dir.exists():
        trainer = _load_state(state_dir, accelerator.unwrap_model(model), optimizer, scheduler)

    steps_per_epoch = len(train_loader)
    task = None
    if progress is not None:
        task = progress.add_task(
            f"{data.organ} fold {data.fold}",
            total=tc.epochs * steps_per_epoch,
            completed=(trainer["epoch"] + 1) * steps_per_epoch,
            info="",
            visible=main,
        )

    for epoch in range(trainer["epoch"] + 1, tc.epochs):
        if trainer["stopped_early"]:
            break
        start = time.perf_counter()
        torch.manual_seed(seed_for(cfg.seed, organ_index, data.fold, epoch))
        # accelerate's loader calls dataset.set_epoch(<its own pass count>) when iterated: set both,
        # or a resumed fold would replay epoch 0's plan.
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        data.train_set.set_epoch(epoch)
        hooks.on_train_epoch(data.organ, data.fold, epoch, data.train_set)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, accelerator, progress, task)
        val = evaluate(model, val_loader, accelerator)
        hooks.on_evaluate(data.organ, data.fold, "val", val["index"], val["source"])
        val["patient_auc"] = patient_auc(data.table, val, data.organ, tc.aggregate, tc.top_k)
        # Validation AUC steers early stopping; without both classes in the fold, validation loss does.
        watched = val["patient_auc"] if tc.select_on == "patient" else val["auc"]
        score = watched if not math.isnan(watched) else -val["loss"]
        improved = score > trainer["best_score"]
        seconds = time.perf_counter() - start
        samples = stats["samples"] * accelerator.num_processes
        row = {
            "epoch": epoch,
            "train_loss": stats["loss"],
            "val_loss": val["loss"],
            "val_auc": val["auc"],
            "val_patient_auc": val["patient_auc"],
            "lr": lr,
            "seconds": seconds,
            "slices_per_s": samples / max(stats["seconds"], 1e-9),
        }
        trainer["history"].append(row)
        trainer["steps"] += stats["steps"]
        trainer["samples"] += samples
        trainer["synthetic_samples"] += stats["synthetic"] * accelerator.num_processes
        if improved:
            trainer.update(best_score=score, best_epoch=epoch, best_val_auc=val["auc"], bad_epochs=0)
        else:
            trainer["bad_epochs"] += 1
            trainer["stopped_early"] = trainer["bad_epochs"] >= tc.patience
        trainer["epoch"] = epoch
        if main:
            if improved:
                save_classifier(
                    accelerator.unwrap_model(model),
                    fold_dir,
                    extra={
                        "windows": cfg.data.windows,
                        "organ": data.organ,
                        "fold": data.fold,
                        "epoch": epoch,
                        "val_auc": val["auc"],
                    },
                )
                _prediction_frame(data.table, val, data.fold).to_csv(fold_dir / "val_predictions.csv", index=False)
            _write_metrics(fold_dir / "metrics.csv", trainer["history"])
            _save_state(state_dir, accelerator.unwrap_model(model), optimizer, scheduler, trainer)
        accelerator.wait_for_everyone()
        if progress is not None and task is not None:
            progress.update(
                task,
                completed=(epoch + 1) * steps_per_epoch,
                info=f"loss {stats['loss']:.3f} | val AUC {val['auc']:.3f} | {row['slices_per_s']:.0f} slices/s",
            )
        hooks.on_epoch_end(data.organ, data.fold, epoch, row)

    if progress is not None and task is not None:
        progress.update(task, completed=tc.epochs * steps_per_epoch)  # full also when stopped early

    # Test once, with the best checkpoint.
    best = load_file(str(fold_dir / WEIGHTS_NAME))
    accelerator.unwrap_model(model).load_state_dict(best)
    test = evaluate(model, test_loader, accelerator)
    hooks.on_evaluate(data.organ, data.fold, "test", test["index"], test["source"])
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
    if main:
        (fold_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        frame = _prediction_frame(data.table, test, data.fold)
        frame.to_csv(fold_dir / (DONE_FILE + ".tmp"), index=False)
        (fold_dir / (DONE_FILE + ".tmp")).replace(fold_dir / DONE_FILE)
        shutil.rmtree(state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return summary
