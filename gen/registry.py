"""Generator registry and factory (timm ``register_model`` / ``create_model`` style).

Each backend module decorates its class with ``@register_generator("name")``;
:func:`create_generator` looks the name up and builds an unfitted generator.

A backend is registered per *mode*: ``image`` (the default) draws whole slices with
``sample``; ``lesion`` draws injuries into real healthy crops with ``inpaint`` (``gen/lesions/``).
The same name (``gan``, ``diffusion``) and config section serve both modes, so
``create_generator(cfg.gen.model, cfg.gen, mode=mode)`` picks the class.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from gen.base import BaseGenerator
    from toolkit.config import GenConfig

MODES = ("image", "lesion")

_GENERATORS: dict[tuple[str, str], type[BaseGenerator]] = {}

T = TypeVar("T")


def register_generator(name: str, mode: str = "image") -> Callable[[T], T]:
    """Class decorator adding a generator backend under ``name`` for ``mode`` (image or lesion)."""
    if mode not in MODES:
        raise ValueError(f"unknown generator mode '{mode}'; valid modes: {', '.join(MODES)}")

    def decorator(cls: T) -> T:
        key = (mode, name)
        if key in _GENERATORS and _GENERATORS[key] is not cls:
            raise ValueError(f"{mode} generator '{name}' is already registered by {_GENERATORS[key].__name__}")
        _GENERATORS[key] = cls  # type: ignore[assignment]
        cls.generator_name = name  # type: ignore[attr-defined]
        cls.mode = mode  # type: ignore[attr-defined]
        return cls

    return decorator


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ToolkitError(f"unknown generator mode '{mode}'; valid modes: {', '.join(MODES)}")


def _import_builtin() -> None:
    # Importing the backend modules runs their @register_generator decorators.
    import gen.diffusion  # noqa: F401
    import gen.gan  # noqa: F401
    import gen.lesions.gan_inpaint  # noqa: F401
    import gen.lesions.inpaint  # noqa: F401


def list_generators(mode: str = "image") -> list[str]:
    """Names accepted by :func:`create_generator` for ``mode``, sorted."""
    _check_mode(mode)
    _import_builtin()
    return sorted(name for m, name in _GENERATORS if m == mode)


def is_generator(name: str, mode: str = "image") -> bool:
    """Whether ``name`` is a registered generator backend of ``mode``."""
    _import_builtin()
    return (mode, name) in _GENERATORS


def create_generator(
    name: str,
    cfg: GenConfig,
    n_classes: int = 2,
    class_names: list[str] | None = None,
    seed: int = 0,
    mode: str = "image",
    **overrides: Any,
) -> BaseGenerator:
    """Build an unfitted generator.

    Parameters
    ----------
    name : {"diffusion", "gan"}
        Registered backend name.
    cfg : GenConfig
        Hyperparameters; ``overrides`` (non-None values) replace its shared fields or those of
        the backend's section, e.g. ``image_size=32`` or, for the GAN, ``z_dim=16`` (``cfg.gan.z_dim``).
    n_classes : int, default=2
        Number of conditioning classes (2 binary, 3 healthy/low/high).
    class_names : list of str, optional
        One name per class, used in figures and the audit.
    seed : int, default=0
        Seed of the weight initialisation and of every training step.
    mode : {"image", "lesion"}, default="image"
        Whole slices (``sample``) or lesions drawn into real crops (``inpaint``, ``gen/lesions/``).
    """
    import dataclasses

    _check_mode(mode)
    _import_builtin()
    if (mode, name) not in _GENERATORS:
        kind = "generator" if mode == "image" else f"{mode} generator"
        raise ToolkitError(f"unknown {kind} '{name}'; valid generators: {', '.join(list_generators(mode))}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        section = getattr(cfg, name, None)
        own = {f.name for f in dataclasses.fields(section)} if dataclasses.is_dataclass(section) else set()
        shared = {f.name for f in dataclasses.fields(cfg) if not dataclasses.is_dataclass(getattr(cfg, f.name))}
        unknown = sorted(set(overrides) - shared - own)
        if unknown:
            valid = ", ".join(sorted(shared | own))
            raise ToolkitError(f"unknown generator option(s) {', '.join(unknown)}; valid: {valid}")
        changes = {k: v for k, v in overrides.items() if k in shared}
        if set(overrides) - shared:
            changes[name] = dataclasses.replace(section, **{k: v for k, v in overrides.items() if k not in shared})
        cfg = dataclasses.replace(cfg, **changes)
    return _GENERATORS[(mode, name)](cfg, n_classes=n_classes, class_names=class_names, seed=seed)


def load_generator(directory: str | Path) -> BaseGenerator:
    """Rebuild whichever generator ``save_pretrained`` wrote to ``directory`` (reads ``config.json``)."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise ToolkitError(f"no generator at {directory} (missing config.json); run `toolkit gen` first")
    config = json.loads(config_file.read_text())
    # Written before modes existed (or by an image backend): image.
    name, mode = config.get("generator"), config.get("mode", "image")
    _import_builtin()
    if (mode, name) not in _GENERATORS:
        valid = ", ".join(f"{n} ({m})" for m, n in sorted(_GENERATORS))
        raise ToolkitError(f"{config_file} names {mode} generator '{name}'; valid generators: {valid}")
    return _GENERATORS[(mode, name)].from_pretrained(directory)
