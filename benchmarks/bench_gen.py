"""Generator speed and the cost of fast sampling, measured on this machine in one run.

Prints:

- training images/s of the diffusion and GAN generators (``fit``), and of a plain diffusers
  training loop (UNet + DDPMScheduler + AdamW, nothing else) on the same data: the ratio is the
  overhead of the shared training loop (gen/training.py: accelerate, EMA, class balancing, bookkeeping);
- sampling images/s of DPM-Solver++ at its default steps vs diffusers' DDPM sampler at every
  training timestep (1000), with the ratio;
- the audit's Fréchet distance (same feature net, same real slices, same number of slices) and HU
  distance for both samplers, so the speed-up is shown not to cost fidelity.

Usage::

    python benchmarks/bench_gen.py                       # toy slices (tests/conftest.py)
    python benchmarks/bench_gen.py --store /tmp/ws/store  # a real or phantom store

Runs in about 5 minutes on an otherwise idle 2-core CPU with the defaults (set
OMP_WAIT_POLICY=PASSIVE when other processes share the cores: busy-waiting OpenMP threads
then slow torch down several-fold).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def load_data(store: str | None, organ: str, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train-split slices windowed to [0, 1] at ``image_size``, labels, patient ids."""
    from gen.data import load_training_data
    from toolkit.config import load_config
    from toolkit.sliceset import SliceSet

    if store is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_toy_slice_set

        slices = make_toy_slice_set(n_patients=40, slices_per_patient=8, size=64)
    else:
        slices = SliceSet.load(store)
    cfg = load_config("demo", {"gen": {"image_size": image_size}})
    data = load_training_data(slices, organ, cfg)
    return data.images.to_array(), data.labels, data.patient_ids


def plain_diffusers_loop(x: np.ndarray, y: np.ndarray, cfg, steps: int) -> float:
    """Images/s of the bare diffusers recipe: random batch, add_noise, UNet, MSE, AdamW."""
    from diffusers import DDPMScheduler

    from gen.models.unet import build_unet

    dcfg = cfg.diffusion
    torch.manual_seed(0)
    unet = build_unet(cfg.image_size, 2, dcfg.unet_channels, dcfg.layers_per_block)
    sched = DDPMScheduler(num_train_timesteps=dcfg.num_train_timesteps, beta_schedule=dcfg.beta_schedule)
    opt = torch.optim.AdamW(unet.parameters(), lr=dcfg.lr)
    data = torch.from_numpy(x).unsqueeze(1) * 2 - 1
    labels = torch.from_numpy(y)
    start = None
    for step in range(steps + 2):
        if step == 2:  # the first steps pay one-off allocation costs
            start = time.perf_counter()
        idx = torch.randint(len(data), (cfg.batch_size,))
        x0, noise = data[idx], torch.randn(cfg.batch_size, 1, cfg.image_size, cfg.image_size)
        t = torch.randint(0, dcfg.num_train_timesteps, (cfg.batch_size,))
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, class_labels=labels[idx]).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def fit_rate(gen, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(images/s after the first two steps, seconds) of ``gen.fit``."""
    marks: dict[int, float] = {}
    t0 = time.perf_counter()
    gen.fit(x, y, callback=lambda step, logs: marks.__setitem__(step, time.perf_counter()))
    total = time.perf_counter() - t0
    steps = gen.cfg.train_steps
    return (steps - 2) * gen.cfg.batch_size / (marks[steps] - marks[2]), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="slice store folder (default: toy slices)")
    parser.add_argument("--organ", default="liver")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--diffusion-steps", type=int, default=300)
    parser.add_argument("--gan-steps", type=int, default=300)
    parser.add_argument("--plain-steps", type=int, default=30)
    parser.add_argument("--n", type=int, default=16, help="slices per sampler (split over 2 classes)")
    parser.add_argument(
        "--guidance", type=float, default=1.0, help="guidance scale for both samplers (1.0 = one UNet pass/step)"
    )
    args = parser.parse_args()

    from gen.audit import audit, train_feature_net
    from gen.registry import create_generator
    from toolkit.config import load_config

    x, y, groups = load_data(args.store, args.organ, args.image_size)
    print(
        f"data: {len(x)} training slices of {args.organ} at {args.image_size}px ({int(y.sum())} injured); "
        f"torch threads {torch.get_num_threads()}"
    )
    cfg = load_config("demo", {"gen": {"image_size": args.image_size}}).gen

    plain = plain_diffusers_loop(x, y, cfg, args.plain_steps)
    diff = create_generator("diffusion", cfg, seed=0, train_steps=args.diffusion_steps)
    diff_rate, diff_s = fit_rate(diff, x, y)
    gan = create_generator("gan", cfg, seed=0, train_steps=args.gan_steps)
    gan_rate, gan_s = fit_rate(gan, x, y)
    print(f"\ntraining (batch {cfg.batch_size}, {args.image_size}px)")
    print(
        f"  diffusion fit      {diff_rate:8.1f} img/s  ({args.diffusion_steps} steps in {diff_s:.0f} s; "
        f"UNet {list(cfg.diffusion.unet_channels)} x{cfg.diffusion.layers_per_block})"
    )
    print(f"  plain diffusers    {plain:8.1f} img/s  (same UNet, bare loop)  fit/plain = {diff_rate / plain:.2f}")
    print(
        f"  GAN fit            {gan_rate:8.1f} img/s  ({args.gan_steps} steps in {gan_s:.0f} s; "
        f"ngf {cfg.gan.ngf}, ndf {cfg.gan.ndf})  GAN/diffusion = {gan_rate / diff_rate:.1f}x"
    )

    n_per_class = max(1, args.n // 2)
    labels = np.repeat([0, 1], n_per_class)
    results = {}
    for name, kwargs in (("dpm", {"sampler": "dpm"}), ("ddpm", {"sampler": "ddpm"})):
        t0 = time.perf_counter()
        imgs = diff.sample(labels=labels, seed=0, guidance_scale=args.guidance, **kwargs)
        results[name] = (imgs, time.perf_counter() - t0)
    t0 = time.perf_counter()
    gan_x = gan.sample(labels=labels, seed=0)
    gan_t = time.perf_counter() - t0

    net = train_feature_net(x, y, epochs=3, seed=0)
    print(f"\nsampling {len(labels)} slices (guidance scale {args.guidance} for both samplers)")
    fds = {}
    for name, (imgs, secs) in results.items():
        rep = audit(x, y, imgs, labels, feature_net=net, real_groups=groups, seed=0)
        fds[name] = rep["frechet_distance"]["synthetic_vs_real"]
        steps = cfg.diffusion.sample_steps if name == "dpm" else cfg.diffusion.num_train_timesteps
        sampler = "DPM-Solver++" if name == "dpm" else "diffusers DDPM"
        print(
            f"  {sampler:15s} {steps:5d} steps {len(imgs) / secs:8.2f} img/s  FD {fds[name]:7.2f} "
            f"(real vs real {rep['frechet_distance']['real_vs_real_reference']:.2f})  "
            f"HU W1 {rep['hu_histogram']['wasserstein_hu']:.1f} HU"
        )
    speedup = results["ddpm"][1] / results["dpm"][1]
    print(f"  DPM-Solver / DDPM speed-up {speedup:.1f}x; FD ratio dpm/ddpm {fds['dpm'] / fds['ddpm']:.2f}")
    rep = audit(x, y, gan_x, labels, feature_net=net, real_groups=groups, seed=0)
    print(
        f"  GAN             {1:5d} step  {len(gan_x) / gan_t:8.1f} img/s  "
        f"FD {rep['frechet_distance']['synthetic_vs_real']:7.2f}"
    )


if __name__ == "__main__":
    main()
