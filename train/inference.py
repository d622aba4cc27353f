"""Scoring slices with a trained run: fold models, slice probabilities, patient aggregation.

Used by ``train`` itself (patient-level files) and by ``toolkit predict`` / ``explain``.
Preprocessing matches training exactly: resize HU to the model's image size
(:func:`train.data.resize_hu`), window (:func:`train.data.window_tensor`),
normalise with the checkpoint's ``mean``/``std``. :func:`predict_probs` runs every model over
all slices in a few large batches, channels-last on CPU/CUDA and, when there are enough slices
to pay for it, with its batch norms folded into the convolutions (:func:`fold_batchnorm`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.layers import FrozenBatchNormAct2d
from torch import fx, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from toolkit.artifacts.run import RunFolder
from toolkit.errors import ToolkitError
from train.data import memory_format_for, resize_hu, window_tensor
from train.model import load_classifier

AGGREGATES: tuple[str, ...] = ("max", "topk")


def aggregate_patient(probs: np.ndarray, how: str = "max", top_k: int = 3) -> float:
    """One patient score from the scores of their slices.

    Parameters
    ----------
    probs : ndarray of shape (n_slices,) or (n_models, n_slices)
        Slice probabilities; a 2-D array is first averaged over models (the ensemble).
    how : {"max", "topk"}
        ``max``: the highest slice; ``topk``: the mean of the ``top_k`` highest slices.
    top_k : int
        Slices averaged by ``topk`` (all of them when fewer).

    Returns
    -------
    float
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 2:
        probs = probs.mean(axis=0)
    if probs.size == 0:
        raise ToolkitError("cannot aggregate a patient with no slices")
    if how == "max":
        return float(probs.max())
    if how == "topk":
        if top_k < 1:
            raise ToolkitError(f"train.top_k must be >= 1, got {top_k}")
        return float(np.sort(probs)[-top_k:].mean())
    raise ToolkitError(f"unknown train.aggregate '{how}'; choose one of {', '.join(AGGREGATES)}")


def patient_scores(
    slices: pd.DataFrame, how: str = "max", top_k: int = 3, by: tuple[str, ...] = ("patient_id",)
) -> pd.Series:
    """Patient scores from a table of slice scores: ``prob`` aggregated per group of ``by``.

    Parameters
    ----------
    slices : DataFrame
        One row per scored slice, with ``prob`` and the ``by`` columns.
    how, top_k
        As :func:`aggregate_patient`.
    by : tuple of str, default=("patient_id",)
        Grouping columns, e.g. ``("patient_id", "fold")`` for one score per patient and fold model.

    Returns
    -------
    Series
        Float scores indexed by ``by``, sorted.
    """
    return slices.groupby(list(by), sort=True)["prob"].agg(lambda p: aggregate_patient(p.to_numpy(), how, top_k))


def load_fold_models(run_dir: Path, organ: str) -> list[nn.Module]:
    """Every fold's best checkpoint of ``organ`` in a run, ordered by fold (CPU, eval mode)."""
    folder = RunFolder(run_dir)
    folds = folder.checkpoints(organ)
    if not folds:
        raise ToolkitError(
            f"no fold checkpoints for {organ} in {folder.organ_dir(organ)}: run `toolkit train --organ {organ}`"
        )
    return [load_classifier(f.path) for f in folds]


def default_device() -> torch.device:
    """CUDA, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Batch norms fold_batchnorm folds: torch's (timm's BatchNormAct2d is one) and the frozen ones
# that train.model.set_trainable_blocks leaves in a partly trained backbone.
_BATCH_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d, FrozenBatchNormAct2d)


class _NormLeafTracer(fx.Tracer):
    """An fx tracer that keeps every batch norm (with its activation, for timm's) as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BATCH_NORMS) or super().is_leaf_module(m, module_qualified_name)


def fold_batchnorm(model: nn.Module, frozen_only: bool = False) -> nn.Module:
    """A twin of ``model`` with each batch norm that directly follows a convolution folded into it.

    A batch norm that uses its running statistics is a per-channel affine map, so ``bn(conv(x))``
    is one convolution with scaled weights and a bias: the twin skips a pass over every activation
    (MobileNetV2 on a CPU, channels-last: 64 px with the last 3 blocks trainable ~3x per inference
    batch, 224 px ~1.3x). The graph (torch.fx) decides which norm follows which convolution; timm's
    ``BatchNormAct2d`` / ``FrozenBatchNormAct2d`` keep their activation. Folded convolutions are new
    modules; every other layer is shared with ``model``, whose weights stay as they are. A model
    fx cannot trace is returned itself.

    Parameters
    ----------
    model : nn.Module
    frozen_only : bool, default=False
        Fold only frozen norms (``set_trainable_blocks``) after frozen convolutions: the twin then
        *trains* ``model`` (its trainable layers are ``model``'s own) with fewer passes per step.
        Otherwise every norm is folded and the twin is for inference only (eval mode).

    Returns
    -------
    nn.Module
        Outputs equal ``model``'s up to float rounding; in training mode with ``frozen_only``, else
        in eval mode (``model`` is switched to that mode too).
    """
    # fx records ``self.training`` branches (dropout, drop path) as traced: trace in the mode the twin runs in.
    model.train(frozen_only)
    try:
        # GraphModule gets fresh parent modules and shares the leaf layers with ``model``.
        graph = fx.GraphModule(model, _NormLeafTracer().trace(model))
    except Exception:  # noqa: BLE001 - fx refuses data-dependent control flow; such a model is used unfolded
        return model
    modules = dict(graph.named_modules())
    folded_from: list[tuple[nn.Conv2d, nn.Conv2d, nn.Module]] = []
    for node in graph.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        conv_node = node.args[0] if node.args else None
        if not isinstance(bn, _BATCH_NORMS) or bn.running_var is None or bn.running_mean is None:
            continue
        if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module" and len(conv_node.users) == 1):
            continue
        conv = modules[conv_node.target]
        if type(conv) is not nn.Conv2d or conv.out_channels != bn.running_mean.numel():
            continue
        if frozen_only and (isinstance(bn, nn.BatchNorm2d) or any(q.requires_grad for q in conv.parameters())):
            continue
        folded = copy.copy(conv)  # same hyper-parameters; new weight and bias
        folded._parameters = {name: nn.Parameter(value, requires_grad=False)
                              for name, value in zip(("weight", "bias"), _folded(conv, bn), strict=True)}
        folded_from.append((folded, conv, bn))
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        for target, module in ((conv_node.target, folded), (node.target, nn.Sequential(*rest))):
            parent, _, name = target.rpartition(".")
            setattr(graph.get_submodule(parent), name, module)  # an empty Sequential is the identity
    graph.recompile()
    graph.pretrained_cfg = getattr(model, "pretrained_cfg", {})
    graph.folded_from = folded_from  # for refold_batchnorm
    return graph.train(frozen_only)


@torch.no_grad()
def _folded(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the one convolution that computes ``bn(conv(x))`` with ``bn``'s running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if getattr(bn, "weight", None) is not None:  # affine (the frozen norms always are)
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return conv.weight * scale.view(-1, 1, 1, 1), shift if conv.bias is None else conv.bias * scale + shift


@torch.no_grad()
def refold_batchnorm(twin: nn.Module) -> nn.Module:
    """Bring a :func:`fold_batchnorm` twin up to date with its model's current weights and statistics
    (after training steps), without tracing it again; returns ``twin``."""
    for folded, conv, bn in getattr(twin, "folded_from", ()):
        weight, bias = _folded(conv, bn)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return twin


_BATCH_PIXELS = 64 * 224 * 224  # slices per inference batch: 64 at 224 px, 784 at 64 px
# Folding a model's batch norms costs about what scoring ten 224 px slices saves (CPU): fold only
# when each model scores at least this many pixels (32 slices at 224 px, 392 at 64 px).
_FOLD_PIXELS = 32 * 224 * 224


def predict_probs(
    models: Sequence[nn.Module],
    hu: np.ndarray,
    windows: Sequence[Sequence[float]],
    image_size: int,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Injury probability of every slice under every model.

    The slices are resized, moved to the device and windowed once; each model (its batch norms
    folded, :func:`fold_batchnorm`, when it scores enough pixels to pay for that) then scores all
    of them in batches, and the probabilities come back to the host once.

    Parameters
    ----------
    models : sequence of nn.Module
        Classifiers from :func:`load_fold_models` (their ``pretrained_cfg`` holds mean/std).
        They are moved to ``device``, set to eval mode and, on CPU/CUDA, to channels-last (the
        layout of their weights; their values are left as they are).
    hu : ndarray of shape (n, H, W)
        Slices in Hounsfield units, any size.
    windows : sequence of (level, width)
        The run's ``data.windows`` (one channel each).
    image_size : int
        The run's ``train.image_size``.
    device : str or torch.device, optional
        Default: CUDA, else MPS, else CPU.
    batch_size : int, optional
        Slices per forward pass; default: as many as 64 slices of 224 px hold pixels.

    Returns
    -------
    ndarray of shape (n_models, n), dtype=float32
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ToolkitError(f"predict_probs expects HU slices of shape (n, H, W), got {hu.shape}")
    device = torch.device(device) if device is not None else default_device()
    for model in models:
        in_chans = model.pretrained_cfg["input_size"][0]
        if in_chans != len(windows):
            raise ToolkitError(f"model expects {in_chans} channel(s) but {len(windows)} window(s) were given")
    if len(hu) == 0 or not models:
        return np.zeros((len(models), len(hu)), dtype=np.float32)
    batch_size = batch_size or max(1, _BATCH_PIXELS // (image_size * image_size))
    memory_format = memory_format_for(device)
    fold = len(hu) * image_size**2 >= _FOLD_PIXELS
    with torch.no_grad():  # not inference mode: the caller's models stay trainable (explain's Grad-CAM)
        scorers = []
        for model in models:
            model.eval().to(device=device, memory_format=memory_format)
            scorers.append(fold_batchnorm(model) if fold else model)
    with torch.inference_mode():
        x = window_tensor(torch.from_numpy(resize_hu(hu, image_size)).to(device), windows)
        normalised: dict[tuple, torch.Tensor] = {}  # fold models share their mean/std: normalise once
        out = torch.empty((len(models), len(hu)), dtype=torch.float32, device=device)
        for m, scorer in enumerate(scorers):
            stats = (tuple(scorer.pretrained_cfg["mean"]), tuple(scorer.pretrained_cfg["std"]))
            if stats not in normalised:
                mean, std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in stats)
                normalised[stats] = ((x - mean) / std).contiguous(memory_format=memory_format)
            inputs = normalised[stats]
            for start in range(0, len(hu), batch_size):
                logits = scorer(inputs[start : start + batch_size]).float()[:, 0]
                out[m, start : start + batch_size] = torch.sigmoid(logits)
        return out.cpu().numpy()
