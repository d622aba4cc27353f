"""Speed of ``toolkit train`` and ``toolkit predict`` against plain timm on the same machine.

Prints, in one run (each measurement in a fresh process started as the CLI starts:
:func:`toolkit.runtime.passive_openmp` before torch loads, then :func:`toolkit.runtime.tune_malloc`):

1. **training step**: slices/s of train's own path (memory-mapped store -> ``resize_hu`` ->
   ``BalancedEpochDataset`` -> DataLoader of whole batches -> accelerate -> ``train_one_epoch``
   with windowing/augmentation on the device, the model as ``build_fold`` makes it) vs a bare timm
   forward/backward/AdamW loop on one of those batches, same model, batch and image size, at 64
   and 128 px (ratio: goal >= 0.95 at 64 px);
2. **fold overhead**: one organ's folds of ``train_run`` at the demo's settings (64 px, epoch_size
   768, batch 32, 4 epochs, 3 folds, last 3 blocks trainable) on a demo-sized toy store (240 patients
   x 12 slices at 128 px, half of them test: the demo's liver crop set holds 12.3 crops per patient),
   with a table of where the time goes and a fold's wall time against its training steps alone
   (goal <= 1.3);
3. **predict, per study**: ``predict_study`` (what ``toolkit predict`` runs: read the DICOM series,
   load every fold model, score, aggregate) on a 64-slice phantom study, for 5 organs x 5 folds at
   224 px and for the demo's settings (64 px, kidney and bowel 128 px, 3 folds, 16 slices per series).

Usage::

    python benchmarks/bench_train.py [--model mobilenetv2_100] [--batch 32] [--skip train,fold,predict]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STORE_SIZE = 256  # px of the toy store of the training-step measurement (the default config's data.size)


def _start_like_the_cli() -> dict[str, Any]:
    """The CLI's runtime settings, applied before torch is imported (this process is a fresh child)."""
    from toolkit.runtime import passive_openmp, tune_malloc

    passive = passive_openmp()
    return {"omp_passive": passive or os.environ.get("OMP_WAIT_POLICY") == "PASSIVE", "malloc": tune_malloc()}


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


# Crops per patient of the demo's liver crop set (2,954 crops of 240 patients; the store holds 16 slices each).
DEMO_LIVER_CROPS_PER_PATIENT = 12


def _demo_store(directory: Path, patients: int = 240, slices: int = DEMO_LIVER_CROPS_PER_PATIENT, size: int = 128,
                seed: int = 0) -> Path:
    """A store shaped like the demo's liver data (240 patients x 12 slices at 128 px, half test, 3 folds).

    A quarter of the patients carry a dark lesion in the 'organ' on 4 of their slices; every
    organ column holds the same labels, so any organ can be trained on it.
    """
    from toolkit import ORGANS
    from toolkit.sliceset import SliceSet

    rng = np.random.default_rng(seed)
    n = patients * slices
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
    organ = ((xx - 0.38) / 0.15) ** 2 + ((yy - 0.5) / 0.13) ** 2 < 1
    lesion = organ & (((xx - 0.38) / 0.06) ** 2 + ((yy - 0.5) / 0.04) ** 2 < 1)
    patient = np.arange(n) // slices
    level = np.arange(n) % slices
    injured = patient % 4 == 0
    on_slice = injured & (level >= slices // 2 - 2) & (level < slices // 2 + 2)
    images = np.full((n, size, size), -1000, np.int16)
    images[:, body] = 40
    images[:, organ] = 60
    images[np.ix_(on_slice, lesion.any(1), lesion.any(0))] = 10
    images = (images + rng.normal(0, 10, images.shape)).astype(np.int16)
    test = patient >= patients // 2
    table = pd.DataFrame({
        "patient_id": patient, "series_id": patient, "instance": level, "z": -level * 5.0,
        "split": np.where(test, "test", "train"), "fold": np.where(test, -1, patient % 3), "source": "real",
    })
    for o in ORGANS:
        table[o] = on_slice.astype(np.int64)
        table[f"{o}_patient"] = injured.astype(np.int64)
    SliceSet(images, table, {"split_hash": "bench"}).save(directory, force=True)
    return directory


# ------------------------------------------------------------------ 1. training step
def measure_training(size: int, model_name: str, batch: int, samples: int, repeats: int) -> dict:
    """Slices/s of train's loop and of a bare timm loop (best of ``repeats`` each, interleaved)."""
    import timm
    import torch
    from accelerate import Accelerator

    from toolkit.artifacts.run import FoldFolder
    from toolkit.config import load_config
    from toolkit.sliceset import SliceSet
    from train.balancer import REAL, Balancer
    from train.data import BalancedEpochDataset, SliceDataset, resize_hu
    from train.engine import FoldData, build_fold, train_one_epoch

    cfg = load_config(
        "default",
        {"train": {"model": model_name, "pretrained": False, "image_size": size, "batch_size": batch,
                   "trainable_blocks": -1, "epoch_size": samples, "epochs": 1000, "num_workers": 0}},
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = SliceSet.load(_toy_store(Path(tmp) / "store"))  # memory-mapped
        real = resize_hu(store.images, size)
        labels = store.labels("liver")
        balancer = Balancer(np.arange(len(real)), labels, epoch_size=samples, ratio=0.0, seed=0, fold=0)
        rows = np.arange(64)
        small = SliceDataset(real, None, np.full(64, REAL, np.int8), rows, labels[rows].astype(np.float32))
        data = FoldData("liver", 0, BalancedEpochDataset(real, None, balancer, seed=0), small, small, store.table)
        accelerator = Accelerator(mixed_precision="no")
        parts = build_fold(accelerator, cfg, data, FoldFolder(Path(tmp) / "fold_0", 0), 0)

        bare = timm.create_model(model_name, pretrained=False, num_classes=1, in_chans=len(cfg.data.windows))
        bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4)
        first = next(iter(parts.train_loader))
        x = parts.train_transform(first).contiguous()  # one of the toolkit's batches, NCHW as timm makes it
        y = first["y"]
        loss_fn = torch.nn.BCEWithLogitsLoss()
        steps = len(parts.train_loader)

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
            parts.train_loader.set_epoch(epoch)
            data.train_set.set_epoch(epoch)
            stats = train_one_epoch(parts.model, parts.train_loader, parts.optimizer, parts.scheduler,
                                    parts.loss_fn, accelerator, parts.train_transform)
            return stats["samples"] / stats["seconds"]

        toolkit_epoch(0)  # warm-up (allocator, oneDNN kernels)
        bare_epoch()
        ours, base = [], []
        for r in range(repeats):
            ours.append(toolkit_epoch(r + 1))
            base.append(bare_epoch())
    return {"size": size, "toolkit": max(ours), "bare": max(base), "ratio": max(ours) / max(base)}


# ------------------------------------------------------------------ 2. fold overhead
def measure_fold(organ: str = "liver", folds: int = 3, epochs: int = 0) -> dict:
    """Train one organ of ``train_run`` at the demo's settings and time its parts.

    The loop's functions are wrapped here (this process only) to time them: training epochs,
    validation and test scoring, checkpoints, fold set-up; inside them the batch fetch
    (``SliceDataset.__getitems__``) and the device-side ``SliceTransform``. Early stopping is
    off (patience = epochs) so that every fold runs all the demo's epochs (``epochs`` 0) or ``epochs``.
    """
    import train.data as data_mod
    import train.engine as engine
    import train.run as run
    from toolkit.config import load_config
    from toolkit.workspace import Workspace

    seconds: dict[str, float] = defaultdict(float)
    phase = ["other"]

    def timed(owner: Any, name: str, key: str | None = None, sets_phase: str | None = None) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            label = key or f"{phase[0]}:{name}"
            previous = phase[0]
            if sets_phase:
                phase[0] = sets_phase
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
                phase[0] = previous

        setattr(owner, name, wrapper)

    timed(engine, "train_one_epoch", "train", sets_phase="train")
    timed(engine, "finish_fold", "finish", sets_phase="test")
    timed(engine, "evaluate", None, sets_phase=None)
    timed(engine, "save_epoch", "save")
    timed(engine, "build_fold", "build")
    timed(engine, "train_fold", "fold")
    timed(data_mod.SliceDataset, "__getitems__")
    timed(data_mod.SliceTransform, "__call__")
    run.train_fold = engine.train_fold
    timed(run, "resize_hu", "resize")
    timed(run, "write_organ_outputs", "outputs")
    timed(run, "plot_learning_curve", "outputs")

    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        _demo_store(ws.store_dir)
        # The demo's ImageNet start (every fold the same frozen front) on the toy store's whole slices.
        epochs = epochs or load_config("demo").train.epochs
        cfg = load_config("demo", {"data": {"size": 128}, "train": {"input": "slices", "folds": folds,
                                                                    "epochs": epochs, "patience": epochs}})
        start = time.perf_counter()
        run.train_run(ws, cfg, organs=[organ])
        total = time.perf_counter() - start
        tc = cfg.train.for_organ(organ)
    return {"organ": organ, "image_size": tc.image_size, "epochs": epochs, "folds": folds, "total": total,
            "seconds": dict(seconds), "settings": {k: getattr(tc, k) for k in
                                                   ("epoch_size", "batch_size", "trainable_blocks")}}


def fold_table(r: dict) -> tuple[list[tuple[str, float]], float]:
    """Rows (stage, seconds) of the fold profile and the overhead ratio (fold wall / training steps)."""
    s = defaultdict(float, r["seconds"])
    train_fetch, train_transform = s["train:__getitems__"], s["train:__call__"]
    val = s["other:evaluate"]  # evaluate called from run_epoch (validation); finish_fold's is "test:evaluate"
    test = s["test:evaluate"]
    val_prep = s["other:__getitems__"] + s["other:__call__"]
    test_prep = s["test:__getitems__"] + s["test:__call__"]
    accounted = s["train"] + val + s["finish"] + s["save"] + s["build"]
    rows = [
        ("training steps (train_one_epoch)", s["train"]),
        ("  batch fetch: index the in-memory int16 slices", train_fetch),
        ("  window + augment + normalise (device)", train_transform),
        ("  model forward, backward, AdamW, schedule", s["train"] - train_fetch - train_transform),
        ("validation inference (every epoch)", val),
        ("  of which batch fetch + window + normalise", val_prep),
        ("test inference (best checkpoint, once)", test),
        ("  of which batch fetch + window + normalise", test_prep),
        ("checkpoint reload + summary/prediction files", s["finish"] - test),
        ("checkpoints, predictions, resume state per epoch", s["save"]),
        ("model build + accelerate prepare", s["build"]),
        ("other (patient AUC, hooks, logging, Python)", s["fold"] - accounted),
        ("folds, wall", s["fold"]),
        ("outside folds: resize store + organ tables/plot", s["resize"] + s["outputs"]),
    ]
    return rows, s["fold"] / max(s["train"], 1e-9)


# ------------------------------------------------------------------ 3. predict per study
def measure_predict(case: str, model_name: str) -> dict:
    """Seconds of ``predict_study`` on one 64-slice phantom study, with a run of 5 organs."""
    import torch

    from eval.predict import predict_study
    from toolkit import ORGANS
    from toolkit.artifacts.run import RunFolder, RunInfo
    from toolkit.config import PhantomConfig, load_config, organ_config, save_config
    from toolkit.data.phantom import write_phantom
    from toolkit.workspace import Workspace
    from train.model import create_classifier, save_classifier

    if case == "demo":
        cfg = load_config("demo", {"train": {"pretrained": False, "model": model_name}})
    else:
        cfg = load_config("default", {"data": {"slices_per_series": 0},
                                      "train": {"pretrained": False, "model": model_name, "image_size": 224,
                                                "folds": 5, "trainable_blocks": -1}})
    folds = cfg.train.folds or cfg.data.folds
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        phantom = Path(tmp) / "phantom"
        write_phantom(phantom, PhantomConfig(patients=1, slices=64, size=STORE_SIZE, second_series_fraction=0.0))
        study = next(phantom.glob("train_images/*/*"))
        folder = RunFolder(ws.run_dir("bench"))
        organ_cfgs = {o: organ_config(cfg, o) for o in ORGANS}
        torch.manual_seed(0)
        for organ in ORGANS:
            for k in range(folds):
                save_classifier(create_classifier(organ_cfgs[organ]), folder.fold(organ, k).path)
        info = RunInfo.from_config("bench", cfg, split_hash="bench", folds=folds, organs=list(ORGANS),
                                   organ_train={o: c.train for o, c in organ_cfgs.items()})
        info.complete = True
        save_config(cfg, folder.config_path)
        folder.write_info(info)
        times = []
        for _ in range(2):  # the first also warms oneDNN's kernels up, as a CLI's first study would not
            result = predict_study(ws, cfg, study, "bench", device="cpu")
            times.append(result["elapsed_s"])
    sizes = sorted({c.train.image_size for c in organ_cfgs.values()})
    return {"case": case, "folds": folds, "image_sizes": sizes, "n_slices": result["n_slices"],
            "first_s": times[0], "second_s": times[1]}


# ------------------------------------------------------------------ processes
def _child(args: argparse.Namespace) -> None:
    runtime = _start_like_the_cli()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "train":
        result = measure_training(args.size, args.model, args.batch, args.samples, args.repeats)
    elif args.child == "fold":
        result = measure_fold(args.organ, args.folds, args.epochs)
    else:
        result = measure_predict(args.case, args.model)
    result["runtime"] = runtime
    print(json.dumps(result))


def _spawn(args: argparse.Namespace, what: str, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--model", args.model, "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--threads", str(args.threads), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{what} measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load() -> float:
    from toolkit.runtime import busy_cores

    return busy_cores()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=0, help="samples per timed training epoch (0: by size)")
    parser.add_argument("--organ", default="liver", help="organ of the fold profile (demo settings for it)")
    parser.add_argument("--folds", type=int, default=3, help="folds of the fold profile")
    parser.add_argument("--epochs", type=int, default=0, help="epochs per fold of the fold profile (0: the demo's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: train, fold, predict")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--case", default="demo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    cores = os.cpu_count() or 1
    load = _load()
    print(f"model {args.model}, batch {args.batch}, {cores} CPUs, {load:.1f} busy at start")
    if load > cores / 2:
        print("warning: the machine is busy; absolute figures are noisy (each ratio is measured within one process)")

    if "train" not in skip:
        print("\n1. training slices/s: train's loop (mmap store -> batches -> device transform -> accelerate -> "
              "train_one_epoch) vs a bare timm loop on one of its batches")
        print(f"{'px':>5} {'toolkit':>9} {'bare':>9} {'ratio':>7}  (goal >= 0.95 at 64 px)")
        for size in (64, 128):
            samples = args.samples or (512 if size <= 64 else 256)
            r = _spawn(args, "train", "--size", str(size), "--samples", str(samples))
            print(f"{size:>5} {r['toolkit']:>9.1f} {r['bare']:>9.1f} {r['ratio']:>7.2f}", flush=True)
        policy = "passive" if r["runtime"]["omp_passive"] else "default (spin, then sleep)"
        print(f"OpenMP wait policy chosen at start: {policy}; tune_malloc: {r['runtime']['malloc']}")

    if "fold" not in skip:
        r = _spawn(args, "fold", "--organ", args.organ, "--folds", str(args.folds), "--epochs", str(args.epochs))
        st = r["settings"]
        print(f"\n2. where a fold's time goes: {r['organ']} at the demo's settings ({r['image_size']} px, epoch_size "
              f"{st['epoch_size']}, batch {st['batch_size']}, {r['epochs']} epochs, trainable_blocks "
              f"{st['trainable_blocks']}, {r['folds']} folds; 120 train + 120 test patients x "
              f"{DEMO_LIVER_CROPS_PER_PATIENT} slices, as the demo's liver crops)")
        rows, ratio = fold_table(r)
        fold_wall = dict(rows)["folds, wall"]
        print(f"{'stage':<52}{'seconds':>9}{'share':>8}")
        for name, sec in rows:
            print(f"{name:<52}{sec:>9.1f}{100 * sec / fold_wall:>7.0f}%")
        print(f"fold wall time / training steps: {ratio:.2f} (goal <= 1.3); train_run in all {r['total']:.1f} s")

    if "predict" not in skip:
        print("\n3. toolkit predict, one 64-slice study (read DICOM, load every fold model, score, aggregate)")
        for case in ("default-224", "demo"):
            r = _spawn(args, "predict", "--case", case)
            sizes = "/".join(str(s) for s in r["image_sizes"])
            print(f"  {case:<12} 5 organs x {r['folds']} folds at {sizes} px, {r['n_slices']} slices scored: "
                  f"{r['second_s']:.1f} s per study (first study {r['first_s']:.1f} s)", flush=True)
        print("  goal: 15 s or less per study with the demo's settings")
    print(f"\nbusy cores at the end: {_load():.1f}")


if __name__ == "__main__":
    main()
