"""Throughput of ``toolkit prepare`` against a plain single-process pydicom loop.

Writes a phantom (RSNA layout) to a temporary folder, then reads every slice of it
three ways and prints slices/s:

- ``plain loop``: ``pydicom.dcmread`` + rescale + area resize (torch), one file at a time,
  in this process; the baseline a user would write.
- ``prepare, 1 worker``: :func:`toolkit.data.prepare.prepare_store` without a pool (z ordering,
  labels, split, partial files and the store write included).
- ``prepare, pool``: the same with a process pool of ``--workers`` processes (0 = every core).

Run: ``python benchmarks/bench_prepare.py [--patients 40] [--slices 24] [--phantom-size 128] [--size 64]``
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def plain_loop(files: list[Path], size: int) -> np.ndarray:
    """The baseline: read, rescale and resize each file on its own."""
    import pydicom
    import torch
    import torch.nn.functional as F

    out = np.empty((len(files), size, size), dtype=np.int16)
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        t = torch.from_numpy(hu)[None, None]
        small = F.interpolate(t, size=(size, size), mode="area")[0, 0].numpy()
        out[i] = np.clip(np.rint(small), -1024, 3071).astype(np.int16)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--slices", type=int, default=24, help="slices per series of the phantom")
    parser.add_argument("--phantom-size", type=int, default=128, help="pixels per side of the DICOM files")
    parser.add_argument("--size", type=int, default=64, help="stored slice size")
    parser.add_argument("--workers", type=int, default=0, help="pool size (0 = every core)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    args = parser.parse_args()

    import torch  # noqa: F401  (imported up front so no timing includes it)

    from toolkit.config import Config, DataConfig, PhantomConfig
    from toolkit.data.phantom import write_phantom
    from toolkit.data.prepare import prepare_store

    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        phantom_cfg = dataclasses.replace(
            PhantomConfig(), patients=args.patients, slices=args.slices, size=args.phantom_size
        )
        summary = write_phantom(tmp / "data", phantom_cfg, seed=0)
        files = sorted((tmp / "data" / "train_images").glob("*/*/*.dcm"))
        n = len(files)
        workers = args.workers or os.cpu_count() or 1
        print(
            f"phantom: {summary['patients']} patients, {summary['series']} series, {n} slices of "
            f"{args.phantom_size}x{args.phantom_size} -> stored at {args.size}x{args.size}; "
            f"{os.cpu_count()} CPU cores"
        )

        def run_prepare(w: int) -> None:
            data = dataclasses.replace(
                DataConfig(), size=args.size, slices_per_series=0, workers=w, folds=3, test_fraction=0.2
            )
            out = tmp / f"store_{w}"
            prepare_store(tmp / "data", out, dataclasses.replace(Config(), data=data), force=True)

        def best(fn) -> float:  # noqa: ANN001
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        t_plain = best(lambda: plain_loop(files, args.size))
        t_one = best(lambda: run_prepare(1))
        t_pool = best(lambda: run_prepare(workers))
        print(f"{'method':<28}{'seconds':>10}{'slices/s':>12}")
        for name, t in (
            ("plain pydicom loop", t_plain),
            ("prepare, 1 worker", t_one),
            (f"prepare, pool of {workers}", t_pool),
        ):
            print(f"{name:<28}{t:>10.2f}{n / t:>12.1f}")
        print(f"speed-up over the plain loop: pool {t_plain / t_pool:.2f}x, 1 worker {t_plain / t_one:.2f}x")
        print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
