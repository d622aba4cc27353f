"""Throughput of ``toolkit prepare`` against a plain single-process pydicom loop.

Writes a phantom (RSNA layout) to a temporary folder, then reads every slice of it
three ways and prints slices/s:

- ``plain loop``: ``pydicom.dcmread`` + rescale + area resize (torch), one file at a time,
  in this process; the baseline a user would write.
- ``prepare, 1 worker``: :func:`toolkit.data.prepare.prepare_store` without a pool (z ordering,
  labels, split, partial files and the store write included).
- ``prepare, pool``: the same with a process pool of ``--workers`` processes (0 = every core).

Then the pool's speed-up over one worker (goal on two idle cores: >= 1.8) and what bounds it:
prepare's stages timed in both runs (scanning the input and assembling/writing the store run in
the main process; only reading series runs in the pool) and the speed-up Amdahl's law allows
with that serial share (``pool CPU``: seconds the pool's processes spent, all cores together).

Run: ``python benchmarks/bench_prepare.py [--patients 40] [--slices 24] [--phantom-size 128] [--size 64]``
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

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


def _time_stages(prepare_module: Any) -> dict[str, dict[str, float]]:
    """Wrap prepare's three stages with wall-clock timers (this process only); filled per label set by the caller."""
    stages: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    current = ["?"]
    for name in ("_read_inputs", "_run_tasks", "_assemble"):
        original = getattr(prepare_module, name)

        def wrapper(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            start = time.perf_counter()
            cpu = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
            try:
                return _original(*args, **kwargs)
            finally:
                stages[current[0]][_name] += time.perf_counter() - start
                for who, before, suffix in zip((resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN), cpu,
                                               (":self_cpu", ":children_cpu"), strict=True):
                    after = resource.getrusage(who)
                    stages[current[0]][_name + suffix] += (
                        after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                    )

        setattr(prepare_module, name, wrapper)
    stages["_current"] = current  # type: ignore[assignment]
    return stages


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

    import toolkit.data.prepare as prepare_module
    from toolkit.config import Config, DataConfig, PhantomConfig
    from toolkit.data.phantom import write_phantom

    stages = _time_stages(prepare_module)

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
            stages["_current"][0] = f"repeat{len(stages)}:{w}"  # one record per run; the best run is kept below
            prepare_module.prepare_store(tmp / "data", out, dataclasses.replace(Config(), data=data), force=True)

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

        def best_stages(w: int) -> dict[str, float]:
            runs = [v for k, v in stages.items() if k != "_current" and k.endswith(f":{w}")]
            return min(runs, key=lambda v: v["_read_inputs"] + v["_run_tasks"] + v["_assemble"])

        one, pool = best_stages(1), best_stages(workers)
        print(f"\npool of {workers} vs 1 worker: {t_one / t_pool:.2f}x (goal on two idle cores: >= 1.8)")
        print(f"{'stage (best run)':<40}{'1 worker':>10}{f'pool of {workers}':>12}")
        rows = [("scan input folders + CSVs (main process)", "_read_inputs"),
                ("read + resample series (pool)", "_run_tasks"),
                ("assemble, split, write store (main)", "_assemble")]
        for label, key in rows:
            print(f"{label:<40}{one[key]:>10.2f}{pool[key]:>12.2f}")
        cpu_one = one["_run_tasks:self_cpu"]
        cpu_pool = pool["_run_tasks:children_cpu"] + pool["_run_tasks:self_cpu"]
        print(f"{'  CPU seconds of that stage (all cores)':<40}{cpu_one:>10.2f}{cpu_pool:>12.2f}")
        serial = one["_read_inputs"] + one["_assemble"]
        total = serial + one["_run_tasks"]
        bound = total / (serial + one["_run_tasks"] / workers)
        print(f"serial share with 1 worker: {serial / total:.0%}; Amdahl's bound for {workers} processes: "
              f"{bound:.2f}x; series stage alone: {one['_run_tasks'] / max(pool['_run_tasks'], 1e-9):.2f}x")
        print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
