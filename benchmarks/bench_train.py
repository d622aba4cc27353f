"""Training and inference speed of ``train`` against plain timm loops on the same machine.

Prints, in one run:

1. training slices/s of train's own path (memory-mapped store -> ``resize_hu`` ->
   ``BalancedEpochDataset`` -> DataLoader with windowing/augmentation -> accelerate ->
   ``train_one_epoch``) vs a bare timm forward/backward/AdamW loop on tensors already in
   memory, same model, batch and image size; at 64 and 128 px (ratio: aim > 0.9);
2. the same at 128 px with and without :func:`toolkit.runtime.tune_malloc` (each
   measurement runs in a fresh process, since malloc settings cannot be undone);
3. study-level inference: one CT series of 64 slices through 5 organs x K fold models
   (``load_fold_models`` + ``predict_probs``).

Usage::

    python benchmarks/bench_train.py [--model mobilenetv2_100] [--batch 32] [--folds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

STORE_SIZE = 256  # px of the toy store (the default config's data.size)


def _toy_store(directory: Path, n: int = 512, size: int = STORE_SIZE, seed: int = 0) -> Path:
    """A store of ``n`` noisy abdomen-like slices, half of them 'injured' (darker blob)."""
    from toolkit.sliceset import SliceSet

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
    images = np.full((n, size, size), -1000, np.int16)
    images[:, body] = 40
    labels = np.arange(n) % 2
    images[labels == 1, size // 2 - 8 : size // 2 + 8, size // 3 : size // 3 + 16] = 10
    images = (images + rng.normal(0, 10, images.shape)).astype(np.int16)
    table = pd.DataFrame(
        {
            "patient_id": np.arange(n) // 8,
            "series_id": np.arange(n) // 8,
            "instance": np.arange(n) % 8,
            "z": 0.0,
            "liver": labels,
            "liver_patient": labels,
            "split": "train",
            "fold": (np.arange(n) // 8) % 3,
            "source": "real",
        }
    )
    SliceSet(images, table, {"split_hash": "bench"}).save(directory, force=True)
    return directory


def measure_training(size: int, model_name: str, batch: int, samples: int, repeats: int) -> dict:
    """Slices/s of train's loop and of a bare timm loop (best of ``repeats`` each, interleaved)."""
    import timm
    import torch
    from accelerate import Accelerator

    from toolkit.config import load_config
    from toolkit.sliceset import SliceSet
    from train.balancer import Balancer
    from train.data import BalancedEpochDataset, RandSliceAugment, SliceCollate, create_loader, resize_hu
    from train.engine import train_one_epoch
    from train.model import create_classifier

    cfg = load_config(
        "default",
        {"train": {"model": model_name, "pretrained": False, "image_size": size, "batch_size": batch,
                   "trainable_blocks": -1, "epoch_size": samples}},
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = SliceSet.load(_toy_store(Path(tmp) / "store"))  # memory-mapped
        real = resize_hu(store.images, size)
        labels = store.labels("liver")
        balancer = Balancer(np.arange(len(real)), labels, epoch_size=samples, ratio=0.0, seed=0, fold=0)
        dataset = BalancedEpochDataset(real, None, balancer, seed=0)

        accelerator = Accelerator(mixed_precision="no")
        torch.manual_seed(0)
        model = create_classifier(cfg)
        pcfg = model.pretrained_cfg
        loader = create_loader(
            dataset, SliceCollate(cfg.data.windows, pcfg["mean"], pcfg["std"], RandSliceAugment()), batch
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10_000)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        loss_fn = torch.nn.BCEWithLogitsLoss()

        bare = timm.create_model(model_name, pretrained=False, num_classes=1, in_chans=1)
        bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4)
        x = torch.randn(batch, 1, size, size)
        y = (torch.rand(batch) > 0.5).float()
        steps = samples // batch

        def bare_epoch() -> float:
            bare.train()
            start = time.perf_counter()
            for _ in range(steps):
                loss = loss_fn(bare(x).squeeze(1), y)
                loss.backward()
                bare_opt.step()
                bare_opt.zero_grad(set_to_none=True)
            return steps * batch / (time.perf_counter() - start)

        def toolkit_epoch(epoch: int) -> float:
            loader.set_epoch(epoch)
            stats = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, accelerator)
            return stats["samples"] / stats["seconds"]

        toolkit_epoch(0)  # warm-up (allocator, oneDNN kernels)
        bare_epoch()
        ours, base = [], []
        for r in range(repeats):
            ours.append(toolkit_epoch(r + 1))
            base.append(bare_epoch())
    return {"size": size, "toolkit": max(ours), "bare": max(base), "ratio": max(ours) / max(base)}


def measure_inference(model_name: str, image_size: int, folds: int, slices: int = 64) -> dict:
    """Seconds to score one series of ``slices`` HU slices with 5 organs x ``folds`` models."""
    import torch

    from toolkit import ORGANS
    from toolkit.config import load_config
    from train.inference import load_fold_models, predict_probs
    from train.model import create_classifier, save_classifier

    cfg = load_config(
        "default",
        {"train": {"model": model_name, "pretrained": False, "image_size": image_size, "trainable_blocks": -1}},
    )
    hu = np.random.default_rng(0).normal(40, 200, size=(slices, STORE_SIZE, STORE_SIZE)).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        for organ in ORGANS:
            for k in range(folds):
                save_classifier(create_classifier(cfg), Path(tmp) / organ / f"fold_{k}")
        start = time.perf_counter()
        models = {organ: load_fold_models(Path(tmp), organ) for organ in ORGANS}
        loaded = time.perf_counter()
        for organ in ORGANS:
            predict_probs(models[organ], hu, cfg.data.windows, image_size, device="cpu")
        done = time.perf_counter()
    n = len(ORGANS) * folds
    return {
        "models": n,
        "image_size": image_size,
        "load_s": loaded - start,
        "predict_s": done - loaded,
        "slices_per_s": n * slices / (done - loaded),
    }


def _child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc:
        from toolkit.runtime import tune_malloc

        if not tune_malloc():
            print("warning: tune_malloc() not supported here", file=sys.stderr)
    result = measure_training(args.size, args.model, args.batch, args.samples, args.repeats)
    result["malloc"] = bool(args.malloc)
    print(json.dumps(result))


def _spawn(args: argparse.Namespace, size: int, malloc: bool, samples: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--size", str(size), "--model", args.model,
           "--batch", str(args.batch), "--samples", str(samples), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    if malloc:
        cmd.append("--malloc")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=0, help="samples per timed epoch (0: by size)")
    parser.add_argument("--inference-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--malloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, batch {args.batch}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at start")
    if load > (os.cpu_count() or 1) / 2:
        print("warning: the machine is busy; absolute figures are noisy (ratios are measured interleaved)")
    print("\ntraining slices/s: train's loop (mmap store -> loader -> accelerate -> train_one_epoch) "
          "vs bare timm loop on in-memory tensors")
    print(f"{'px':>5} {'malloc':>8} {'toolkit':>9} {'bare':>9} {'ratio':>7}")
    rows = []
    for size, malloc in ((64, True), (128, False), (128, True)):
        samples = args.samples or (512 if size <= 64 else 256)
        r = _spawn(args, size, malloc, samples)
        rows.append(r)
        label = "tuned" if malloc else "default"
        print(f"{size:>5} {label:>8} {r['toolkit']:>9.1f} {r['bare']:>9.1f} {r['ratio']:>7.2f}", flush=True)
    default, tuned = rows[1], rows[2]
    print(f"tune_malloc at 128 px: toolkit loop {tuned['toolkit'] / default['toolkit']:.2f}x, "
          f"bare loop {tuned['bare'] / default['bare']:.2f}x")

    inf = measure_inference(args.model, args.inference_size, args.folds)
    print(f"\nstudy-level inference: 64-slice series ({STORE_SIZE} px) through {inf['models']} models "
          f"(5 organs x {args.folds} folds) at {inf['image_size']} px on CPU: "
          f"load {inf['load_s']:.1f} s, predict {inf['predict_s']:.1f} s ({inf['slices_per_s']:.0f} slice-model/s)")


if __name__ == "__main__":
    main()
