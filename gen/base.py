"""What every generator backend shares: the interface, checkpoints and per-step randomness.

Interface (sklearn-like: ``__init__`` only stores, ``fit`` learns, learned attributes end in ``_``)::

    gen = create_generator("diffusion", cfg.gen, n_classes=2)
    gen.fit(images, labels, checkpoint_dir=..., resume=False)   # images (n, S, S) float in [0, 1]
    x = gen.sample(n_per_class=100, seed=0)                      # (200, S, S) float in [0, 1]
    gen.save_pretrained(folder)                                  # config.json + model.safetensors
    gen = DiffusionGenerator.from_pretrained(folder)

``fit`` is :func:`gen.training.fit_generator`, the one training loop; a backend supplies
``build_training``, ``training_step``, ``log_columns`` and (optionally) ``sampling_model``.

Reproducibility: every training step draws its batch, noise and labels from a
``torch.Generator`` seeded by ``(seed, step, process)``, so a run resumed from a
checkpoint at step k continues exactly as the uninterrupted run would (on CPU),
without saving RNG states.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from toolkit.config import GenConfig
from toolkit.errors import ContractError, ToolkitError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gen.training import TrainingParts

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_STATE_NAME = "training_state.pt"

StepCallback = Callable[[int, dict[str, float]], None]
"""``callback(step, logs)`` after each optimisation step; ``step`` counts completed steps."""


def gen_settings(cfg: GenConfig, backend: str) -> dict[str, Any]:
    """``cfg`` as a dict of the shared settings and ``backend``'s own section only.

    The other backends' sections are left out: they do not shape this backend's model, so they
    belong neither in its ``config.json`` nor in its generator id.
    """
    sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in sections or k == backend}


def gen_config_from_dict(values: dict[str, Any], source: str | Path) -> GenConfig:
    """Rebuild a :class:`GenConfig` from :func:`gen_settings` output (sections left out keep defaults)."""
    default = GenConfig()
    try:
        changes = {
            k: dataclasses.replace(getattr(default, k), **v) if isinstance(v, dict) else v for k, v in values.items()
        }
        return dataclasses.replace(default, **changes)
    except TypeError:
        raise ContractError(
            f"{source} holds gen settings of an earlier toolkit version (before gen.diffusion / gen.gan); "
            "re-run `toolkit gen --organ <organ> --force` to train it again"
        ) from None


def _setting(values: dict[str, Any], dotted: str) -> Any:
    """``values["diffusion"]["lr"]`` for ``"diffusion.lr"`` (None when absent)."""
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def default_class_names(n_classes: int) -> list[str]:
    """``["healthy", "injured"]`` for 2 classes, ``["healthy", "low", "high"]`` for 3."""
    if n_classes == 2:
        return ["healthy", "injured"]
    if n_classes == 3:
        return ["healthy", "low", "high"]
    return [f"class{i}" for i in range(n_classes)]


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` for one training step, independent of every other step."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(rank)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def draw_balanced_batch(
    class_index: list[np.ndarray], batch_size: int, n_classes: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and labels of one batch with every class drawn equally often.

    Injured slices are a minority; balancing makes the generator learn them as
    well as healthy ones instead of mostly reproducing the healthy class.

    Returns
    -------
    idx : ndarray of shape (batch_size,), dtype=int64
        Rows of the training images, sorted (memory maps read faster in order).
    labels : ndarray of shape (batch_size,), dtype=int64
    """
    y = torch.randint(n_classes, (batch_size,), generator=generator).numpy()
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64).numpy()
    counts = np.array([len(c) for c in class_index])
    pos = np.minimum((u * counts[y]).astype(np.int64), counts[y] - 1)
    idx = np.array([class_index[c][p] for c, p in zip(y, pos, strict=True)], dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    return idx[order], y[order].astype(np.int64)


def to_model_range(batch: np.ndarray) -> torch.Tensor:
    """(k, S, S) float in [0, 1] -> (k, 1, S, S) float32 tensor in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).unsqueeze(1) * 2.0 - 1.0


def from_model_range(x: torch.Tensor) -> np.ndarray:
    """(k, 1, S, S) tensor in [-1, 1] -> (k, S, S) float32 array in [0, 1]."""
    return ((x.detach().float().cpu().squeeze(1) + 1.0) / 2.0).clamp(0.0, 1.0).numpy()


class BaseGenerator:
    """Common machinery; backends implement the training hooks, ``sample`` and ``_build_sampling_model``.

    Parameters
    ----------
    cfg : GenConfig
        Shared hyperparameters (``image_size``, steps, ...) and the backend's section
        (``cfg.diffusion``, ``cfg.gan``).
    n_classes : int, default=2
        Conditioning classes; label ``c`` in ``0..n_classes-1`` (0 = healthy).
    class_names : list of str, optional
        Names of the classes (default: healthy/injured or healthy/low/high).
    seed : int, default=0
        Seed of initial weights and of every training step.
    """

    generator_name: str = ""
    log_columns: tuple[str, ...] = ()
    """Names of the floats :meth:`training_step` returns (``loss.csv`` columns besides step and img_per_s)."""

    def __init__(self, cfg: GenConfig, n_classes: int = 2, class_names: list[str] | None = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.n_classes = n_classes
        self.class_names = class_names
        self.seed = seed

    def fit(
        self,
        images: Any,
        labels: np.ndarray,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        callback: StepCallback | None = None,
    ) -> BaseGenerator:
        """Train for ``cfg.train_steps`` steps (continuing from ``checkpoint_dir`` when ``resume``).

        Parameters
        ----------
        images : ndarray of shape (n, S, S), float in [0, 1], or any array-like whose
            ``images[idx]`` returns that (e.g. :class:`gen.data.WindowedSlices`)
        labels : ndarray of shape (n,), int classes 0..n_classes-1
        checkpoint_dir : path, optional
            Where ``config.json``, ``model.safetensors`` (sampling weights) and ``training_state.pt``
            go every ``cfg.checkpoint_every`` steps and at the end (main process only).
        resume : bool, default=False
            Continue from the checkpoint in ``checkpoint_dir`` if there is one.
        callback : callable, optional
            ``callback(step, {"step", *log_columns, "img_per_s"})`` after each step.
        """
        # Imported here: gen.training builds on this module.
        from gen.training import fit_generator

        return fit_generator(self, images, labels, checkpoint_dir=checkpoint_dir, resume=resume, callback=callback)

    # ------------------------------------------------------------ to implement
    def build_training(self) -> TrainingParts:
        """Fresh networks, their optimizers and EMA (the loop seeds the global RNG around this)."""
        raise NotImplementedError

    def training_step(
        self,
        parts: TrainingParts,
        batch: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        accelerator: Accelerator,
    ) -> dict[str, float]:
        """One optimisation step; returns ``{name: value for name in log_columns}``.

        Parameters
        ----------
        parts : TrainingParts
            From :meth:`build_training`, prepared by ``accelerator``.
        batch : Tensor of shape (b, 1, S, S), float32 in [-1, 1], on ``accelerator.device``
        labels : LongTensor of shape (b,), on ``accelerator.device``
        generator : torch.Generator
            CPU generator of this step; every random draw of the step must come from it.
        accelerator : Accelerator
            For ``backward``, gradient clipping and the device.
        """
        raise NotImplementedError

    def sampling_model(self, parts: TrainingParts, accelerator: Accelerator) -> torch.nn.Module:
        """The network ``sample`` runs, in eval mode: a copy of ``parts.modules[parts.sample_from]``
        holding the EMA weights where an EMA is kept."""
        return self._copy_for_sampling(parts, accelerator).eval()

    def sample(
        self,
        n_per_class: int | None = None,
        labels: np.ndarray | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> np.ndarray:
        raise NotImplementedError

    def _build_sampling_model(self) -> torch.nn.Module:
        """A freshly initialised model of the architecture ``sample`` runs (weights loaded after)."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared helpers
    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)

    def _copy_for_sampling(self, parts: TrainingParts, accelerator: Accelerator) -> torch.nn.Module:
        model = self._build_sampling_model().to(accelerator.device)
        model.load_state_dict(accelerator.unwrap_model(parts.modules[parts.sample_from]).state_dict())
        if parts.ema is not None:
            parts.ema.copy_to(model.parameters())
        return model

    @property
    def classes_(self) -> list[str]:
        return list(self.class_names or default_class_names(self.n_classes))

    def _check_fitted(self) -> torch.nn.Module:
        model = getattr(self, "model_", None)
        if model is None:
            raise ToolkitError(f"{type(self).__name__} is not fitted; call fit() or from_pretrained() first")
        return model

    def _check_fit_inputs(self, images: Any, labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Validate shapes and classes; return labels and the row indices of each class."""
        labels = np.asarray(labels).astype(np.int64)
        shape = tuple(images.shape)
        if len(shape) != 3 or shape[1:] != (self.image_size, self.image_size):
            raise ToolkitError(
                f"training images must have shape (n, {self.image_size}, {self.image_size}) "
                f"(gen.image_size), got {shape}"
            )
        if labels.shape != (shape[0],):
            raise ToolkitError(f"got {shape[0]} training images but labels of shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ToolkitError(f"labels must lie in 0..{self.n_classes - 1}, got {sorted(set(labels.tolist()))}")
        class_index = [np.flatnonzero(labels == c) for c in range(self.n_classes)]
        empty = [self.classes_[c] for c, idx in enumerate(class_index) if len(idx) == 0]
        if empty:
            raise ToolkitError(f"no training images of class(es) {', '.join(empty)}; every class needs examples")
        return labels, class_index

    def _resolve_labels(self, n_per_class: int | None, labels: np.ndarray | None) -> np.ndarray:
        if (n_per_class is None) == (labels is None):
            raise ToolkitError("sample() takes exactly one of n_per_class or labels")
        if labels is None:
            return np.repeat(np.arange(self.n_classes, dtype=np.int64), int(n_per_class))
        labels = np.asarray(labels).astype(np.int64)
        if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= self.n_classes)):
            raise ToolkitError(f"sample labels must be a 1-D array of classes 0..{self.n_classes - 1}")
        return labels

    def config_dict(self) -> dict[str, Any]:
        """What ``config.json`` holds: enough to rebuild the model."""
        return {
            "generator": self.generator_name,
            "n_classes": self.n_classes,
            "class_names": self.classes_,
            "seed": self.seed,
            "step": int(getattr(self, "step_", 0)),
            "gen": {**gen_settings(self.cfg, self.generator_name), "model": self.generator_name},
        }

    # ------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (the weights ``sample`` uses)."""
        model = self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> BaseGenerator:
        """Rebuild a fitted generator from ``save_pretrained`` output (no pickles)."""
        directory = Path(directory)
        config_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_file.exists() or not weights.exists():
            raise ToolkitError(f"no generator at {directory} (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = json.loads(config_file.read_text())
        if config.get("generator") != cls.generator_name:
            raise ToolkitError(
                f"{config_file} holds a '{config.get('generator')}' generator, not '{cls.generator_name}'"
            )
        gen_cfg = gen_config_from_dict(config["gen"], config_file)
        self = cls(gen_cfg, n_classes=config["n_classes"], class_names=config["class_names"], seed=config["seed"])
        model = self._build_sampling_model()
        model.load_state_dict(load_file(str(weights)))
        model.eval()
        self.model_ = model
        self.step_ = int(config.get("step", 0))
        return self

    def _save_checkpoint(self, directory: Path, training_state: dict[str, Any]) -> None:
        """Sampling weights + config, then a tensors-only training state (loadable with weights_only=True)."""
        self.save_pretrained(directory)
        tmp = directory / (TRAINING_STATE_NAME + ".tmp")
        torch.save(training_state, tmp)
        tmp.replace(directory / TRAINING_STATE_NAME)

    def _load_training_state(self, directory: Path) -> dict[str, Any] | None:
        path = Path(directory) / TRAINING_STATE_NAME
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads((Path(directory) / CONFIG_NAME).read_text())
        mine = self.config_dict()
        # Anything shaping the weights must match; train_steps may grow, other settings may change.
        for key in ("generator", "n_classes"):
            if saved.get(key) != mine.get(key):
                raise ContractError(
                    f"checkpoint at {directory} has {key}={saved.get(key)!r} "
                    f"but this run has {mine.get(key)!r}; "
                    "pass --force to start over"
                )
        saved_gen = dataclasses.asdict(gen_config_from_dict(saved["gen"], Path(directory) / CONFIG_NAME))
        for key in self._architecture_keys():
            if _setting(saved_gen, key) != _setting(mine["gen"], key):
                raise ContractError(
                    f"checkpoint at {directory} has gen.{key}={_setting(saved_gen, key)!r} but this run has "
                    f"{_setting(mine['gen'], key)!r}; pass --force to start over"
                )
        return state

    def _architecture_keys(self) -> tuple[str, ...]:
        """Settings (dotted, below ``gen``) that a checkpoint must share with a run resuming it."""
        return ("image_size",)


class History:
    """Per-step training logs kept as a float tensor so checkpoints stay tensors-only."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        self.rows: list[list[float]] = []

    def append(self, values: dict[str, float]) -> None:
        self.rows.append([float(values[c]) for c in self.columns])

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.float64).reshape(-1, len(self.columns))

    def load(self, tensor: torch.Tensor, upto_step: int) -> None:
        self.rows = [r for r in tensor.tolist() if r[0] <= upto_step]

    def to_records(self) -> list[dict[str, float]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


class StepTimer:
    """Images per second of the last step (wall clock)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, n_images: int) -> float:
        now = time.perf_counter()
        rate = n_images / max(now - self.t, 1e-9)
        self.t = now
        return rate
