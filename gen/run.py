"""One organ's generator run: train (or resume), sample, audit, write ``synthetic/<organ>/``.

Output folder::

    synthetic/<organ>/
      images.npy, manifest.csv, meta.json   the synthetic set (toolkit.artifacts.synthetic.SyntheticSet)
      train_patients.csv                    patient ids the generator was trained on (train split only)
      config.yaml                           resolved config
      checkpoint/                           config.json + model.safetensors + training_state.pt (resume)
      loss.csv                              step, loss (or d_loss, g_loss), img_per_s
      audit.json                            fidelity + memorization audit (gen/audit.py)
      grid.png                              real training slices beside synthetic ones, per class

``manifest.csv`` is written last: a folder without it is an unfinished run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gen.audit import audit
from gen.base import TRAINING_STATE_NAME, gen_settings
from gen.data import check_organ, load_training_data, train_patients_hash
from gen.grid import save_grid
from gen.registry import create_generator, list_generators
from toolkit import ORGANS
from toolkit.artifacts.crops import load_crop_set, reads_crops
from toolkit.artifacts.synthetic import SyntheticSet
from toolkit.config import Config, check_image_sizes, save_config
from toolkit.errors import ContractError, ToolkitError
from toolkit.reporting import Reporter, as_reporter
from toolkit.sliceset import SliceSet
from toolkit.transforms import unwindow_hu
from toolkit.workspace import Workspace

# Settings that change the outputs but not the trained generator stay out of its id.
_NOT_IN_ID = ("n", "checkpoint_every", "near_copy_threshold", "audit_feature_epochs")


def generator_id(organ: str, cfg: Config, split_hash: str, patients_hash: str, input_id: str = "slices") -> str:
    """``<organ>-<model>-<hash8>``: same config, seed, window, input and training patients -> same id.

    Only the shared ``gen`` settings and the active backend's section (``gen.<model>``) count:
    a diffusion generator keeps its id when a GAN setting changes. ``input_id`` is what it learnt:
    ``"slices"`` or the crop id of the organ's crop set.
    """
    gen = {k: v for k, v in gen_settings(cfg.gen, cfg.gen.model).items() if k not in _NOT_IN_ID}
    gen.pop("mode", None)  # ids of image-mode generators stay what they were
    if cfg.gen.mode == "lesion":  # the lesion settings shape the set; a procedural fill has no backend
        gen["mode"] = "lesion"
        gen["lesion"] = dataclasses.asdict(cfg.gen.lesion)
        if cfg.gen.lesion.fill == "procedural":
            gen = {k: gen[k] for k in ("mode", "lesion", "image_size", "conditioning") if k in gen}
    key = {
        "organ": organ,
        "gen": gen,
        "seed": cfg.seed,
        "window": list(cfg.data.windows[0]) if cfg.data.windows else None,
        "split_hash": split_hash,
        "train_patients_hash": patients_hash,
    }
    if input_id != "slices":  # ids of generators learnt from slices stay what they were
        key["input_id"] = input_id
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    name = "procedural" if cfg.gen.mode == "lesion" and cfg.gen.lesion.fill == "procedural" else cfg.gen.model
    return f"{organ}-{name}-{digest[:8]}"


def _balanced_labels(n: int, n_classes: int) -> np.ndarray:
    """``n`` labels split evenly over classes (the first classes get the remainder), sorted."""
    return np.sort(np.arange(n) % n_classes).astype(np.int64)


def _prepare_output(out: Path, organ: str, resume: bool, force: bool) -> None:
    if (out / "manifest.csv").exists() and not force:
        raise ToolkitError(f"{out} already holds a synthetic {organ} set; pass --force to regenerate it")
    interrupted = (out / "checkpoint" / TRAINING_STATE_NAME).exists()
    if interrupted and not resume and not force:
        raise ToolkitError(
            f"{out / 'checkpoint'} holds an unfinished {organ} generator; "
            "pass --resume to continue it or --force to start over"
        )
    if force and not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def generate(
    ws: Workspace,
    cfg: Config,
    organ: str,
    n: int | None = None,
    resume: bool = False,
    force: bool = False,
    reporter: Reporter | None = None,
    train_patients: Collection[int] | None = None,
) -> Path:
    """Train ``organ``'s generator on the store's train split, sample, audit, write the synthetic set.

    Parameters
    ----------
    ws : Workspace
        Reads ``ws.store_dir``, writes ``ws.synthetic_dir(organ)``.
    cfg : Config
        ``cfg.gen`` drives the generator, ``cfg.data.windows[0]`` the windowing,
        ``cfg.seed`` everything random.
    organ : str
        One of :data:`toolkit.ORGANS`.
    n : int, optional
        Synthetic slices to write (default ``cfg.gen.n``), split evenly over the classes.
    resume : bool, default=False
        Continue an interrupted training from ``checkpoint/``.
    force : bool, default=False
        Overwrite an existing synthetic set (and, without ``resume``, its checkpoint).
    reporter : Reporter, optional
        Where progress and messages go (default: logging, no progress bars).
    train_patients : collection of int, optional
        Train on these train-split patients only (a study's real-data fraction): ``train_patients.csv``
        and the generator id record exactly the patients used. Default: the whole train split.

    Returns
    -------
    Path
        The output folder ``ws.synthetic_dir(organ)``.
    """
    from accelerate import PartialState

    reporter = as_reporter(reporter)
    check_organ(organ)
    if cfg.gen.model not in list_generators():
        raise ToolkitError(f"unknown gen.model '{cfg.gen.model}'; valid generators: {', '.join(list_generators())}")
    n = int(cfg.gen.n if n is None else n)
    if n < 1:
        raise ToolkitError(f"the number of synthetic slices must be >= 1, got {n}")
    if not (ws.store_dir / "manifest.csv").exists():
        raise ToolkitError(f"no slice store at {ws.store_dir}; run `toolkit prepare` first")
    store = SliceSet.load(ws.store_dir)
    # Kidney, liver and spleen learn their organ crops (gen.input crops); the others the stored slices.
    input_id, source = "slices", store
    if cfg.gen.mode == "lesion":
        return _generate_lesions(ws, cfg, organ, store, n, resume, force, reporter, train_patients)
    if reads_crops(cfg.gen.input, organ, cfg.crop.organs):
        crops = load_crop_set(ws.store_dir, organ)
        if cfg.gen.image_size > crops.size:
            raise ContractError(
                f"gen.image_size={cfg.gen.image_size} is above the {crops.size} px crops of {crops.path}: the "
                f"generator would learn upsampled crops; lower gen.image_size or re-run `toolkit crop --force "
                f"--size {cfg.gen.image_size}`"
            )
        input_id, source = crops.crop_id, crops.slices
    else:
        check_image_sizes(cfg, store.size[0], ws.store_dir, "gen")
    data = load_training_data(source, organ, cfg, patients=train_patients)

    out = ws.synthetic_dir(organ)
    state = PartialState()
    if state.is_main_process:
        _prepare_output(out, organ, resume, force)
    state.wait_for_everyone()

    split_hash = str(store.meta.get("split_hash", ""))
    patients_hash = train_patients_hash(data.patient_ids)
    gid = generator_id(organ, cfg, split_hash, patients_hash, input_id)
    if state.is_main_process:
        save_config(cfg, out / "config.yaml")
        pd.DataFrame({"patient_id": data.train_patients}).to_csv(out / "train_patients.csv", index=False)

    generator = create_generator(
        cfg.gen.model, cfg.gen, n_classes=len(data.class_names), class_names=data.class_names, seed=cfg.seed
    )
    counts = ", ".join(f"{k} {v}" for k, v in data.class_counts().items())
    reporter.info(
        f"{organ}: {cfg.gen.model} generator {gid} on {len(data.labels)} training "
        f"{'slices' if input_id == 'slices' else 'organ crops'} ({counts}) "
        f"of {len(data.train_patients)} train-split patients, "
        f"{cfg.gen.image_size}px, {cfg.gen.train_steps} steps"
    )
    with reporter.progress() as progress:
        task = progress.add_task(f"train {organ}", total=cfg.gen.train_steps)

        def on_step(step: int, logs: dict[str, float]) -> None:
            if step % 5 and step != cfg.gen.train_steps:
                return
            loss = f"loss {logs['loss']:.4f}" if "loss" in logs else f"d {logs['d_loss']:.3f} g {logs['g_loss']:.3f}"
            progress.update(task, completed=step, info=f"{loss} | {logs['img_per_s']:.0f} img/s")

        generator.fit(data.images, data.labels, checkpoint_dir=out / "checkpoint", resume=resume, callback=on_step)
        progress.update(task, completed=cfg.gen.train_steps)
        if not state.is_main_process:
            return out
        labels = _balanced_labels(n, len(data.class_names))
        sample_task = progress.add_task(f"sample {organ}", total=n)
        synth = generator.sample(
            labels=labels, seed=cfg.seed, callback=lambda k: progress.update(sample_task, completed=k)
        )
        audit_task = progress.add_task(f"audit {organ}", total=None)
        report = audit(
            data.images,
            data.labels,
            synth,
            labels,
            threshold=cfg.gen.near_copy_threshold,
            class_names=data.class_names,
            window=data.window,
            real_groups=data.patient_ids,
            epochs=cfg.gen.audit_feature_epochs,
            seed=cfg.seed,
        )
        progress.update(audit_task, total=1, completed=1)

    per_slice = report.pop("per_slice")
    report["generator_id"] = gid
    (out / "audit.json").write_text(json.dumps(_json_ready(report), indent=2))
    pd.DataFrame(generator.history_).to_csv(out / "loss.csv", index=False)
    save_grid(
        out / "grid.png",
        data.images,
        data.labels,
        synth,
        labels,
        data.class_names,
        title=f"{organ}: real training slices (left) vs synthetic {cfg.gen.model} (right), {gid}",
        seed=cfg.seed,
        near_copy=per_slice["near_copy"],
    )
    provenance = {
        "n_train_patients": int(len(data.train_patients)),
        "n_train_slices": int(len(data.labels)),
        "train_steps": int(generator.step_),
        "seed": int(cfg.seed),
        "audit": report["summary"],
        "input_id": input_id,  # what it learnt: "slices" or the crop id (train checks it)
    }
    if cfg.gen.model == "diffusion":
        dcfg = cfg.gen.diffusion
        provenance.update(sampler=dcfg.sampler, sample_steps=dcfg.sample_steps, guidance_scale=dcfg.guidance_scale)
    SyntheticSet.from_samples(
        unwindow_hu(synth, data.window),
        labels,
        per_slice["near_copy"],
        per_slice["nn_similarity"],
        organ=organ,
        generator_id=gid,
        backend=cfg.gen.model,
        window=data.window,
        windows=cfg.data.windows,
        class_names=data.class_names,
        split_hash=split_hash,
        train_patients_hash=patients_hash,
        provenance=provenance,
    ).save(out, force=True)
    return out


def _generate_lesions(
    ws: Workspace,
    cfg: Config,
    organ: str,
    store: SliceSet,
    n: int,
    resume: bool,
    force: bool,
    reporter: Reporter,
    train_patients: Collection[int] | None,
) -> Path:
    """``gen.mode=lesion``: draw injuries into the organ's healthy training crops (:mod:`gen.lesion_run`)."""
    from gen.lesion_run import generate_lesions, lesion_training_rows

    if not reads_crops(cfg.gen.input, organ, cfg.crop.organs):
        raise ContractError(
            f"gen.mode=lesion draws injuries into organ crops, which {organ} does not have with gen.input="
            f"{cfg.gen.input}; use --mode image for {organ}, or one of {', '.join(cfg.crop.organs)} with "
            "gen.input=crops"
        )
    crops = load_crop_set(ws.store_dir, organ)
    rows, _, _ = lesion_training_rows(crops, organ, cfg, train_patients)
    patients = crops.table["patient_id"].to_numpy()[rows]
    gid = generator_id(organ, cfg, str(store.meta.get("split_hash", "")), train_patients_hash(patients),
                       crops.crop_id)
    out = ws.synthetic_dir(organ)
    _prepare_output(out, organ, resume, force)
    return generate_lesions(ws, cfg, organ, crops, store, out, n, gid, resume=resume, reporter=reporter,
                            train_patients=train_patients)


def generate_all(
    ws: Workspace,
    cfg: Config,
    organs: tuple[str, ...] | list[str] = ORGANS,
    n: int | None = None,
    resume: bool = False,
    force: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, dict[str, Any]]:
    """Run :func:`generate` for each organ; finished organs are skipped unless ``force``.

    One organ's :class:`ToolkitError` (e.g. no positives) is recorded and the others continue.

    Returns
    -------
    dict
        ``{organ: {"status": "done" | "skipped" | "failed", "path" or "error": str, "audit": str}}``
    """
    results: dict[str, dict[str, Any]] = {}
    for organ in organs:
        out = ws.synthetic_dir(organ)
        if (out / "manifest.csv").exists() and not force:
            results[organ] = {"status": "skipped", "path": str(out), "audit": _headline(out)}
            continue
        interrupted = (out / "checkpoint" / TRAINING_STATE_NAME).exists()
        try:
            path = generate(
                ws, cfg, organ, n=n, resume=resume or (interrupted and not force), force=force, reporter=reporter
            )
        except ToolkitError as exc:
            results[organ] = {"status": "failed", "error": str(exc)}
            continue
        results[organ] = {"status": "done", "path": str(path), "audit": _headline(path)}
    return results


def _headline(out: Path) -> str:
    path = out / "audit.json"
    return json.loads(path.read_text()).get("summary", "") if path.exists() else ""


def _json_ready(value: Any) -> Any:
    """NaN -> None and numpy scalars -> Python, so audit.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value
