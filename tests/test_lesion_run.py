"""``toolkit gen --mode lesion`` and the classifier's use of lesion sets, on the tiny cropped phantom of test_crops.

The procedural fill draws injuries into healthy training crops; these tests check where the lesion pixels
are, that the rest of each crop is its source, determinism, the size contract at train, and that a fold
never trains on a lesion drawn into one of its validation patients. The model fills (the inpainting GAN,
RePaint with the diffusion UNet) are run the same way, and an interrupted diffusion run is resumed.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import test_crops
from test_crops import CROP, tiny_config

from toolkit.artifacts.crops import load_crop_set
from toolkit.artifacts.synthetic import SyntheticSet
from toolkit.config import load_config
from toolkit.errors import ContractError, ToolkitError
from toolkit.reporting import Reporter, SilentProgress
from toolkit.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
cropped, workspace = test_crops.cropped, test_crops.workspace  # the tiny cropped phantom (module-scoped)


def lesion_config(**train: object):
    gen = {"mode": "lesion", "image_size": CROP, "n": 24, "audit_feature_epochs": 1}
    return load_config("default", {**tiny_config(**train).to_dict(), "gen": gen})


def test_procedural_lesions_stay_in_the_organ_and_keep_the_source(workspace: Workspace) -> None:
    from gen.run import generate

    cfg = lesion_config()
    out = generate(workspace, cfg, "liver")
    syn = SyntheticSet.load(out)
    crops = load_crop_set(workspace.store_dir, "liver")
    assert syn.mode == "lesion" and syn.image_size == CROP and syn.provenance["input_id"] == crops.crop_id
    assert (syn.classes == 1).all() and 0 < len(syn) <= 24
    sources = syn.source_rows
    # Sources are healthy training crops of their recorded patient; never a test patient.
    table = crops.table.iloc[sources]
    assert (table["split"] == "train").all() and (crops.hard_labels[sources] == 0).all()
    np.testing.assert_array_equal(table["patient_id"].to_numpy(), syn.source_patients)
    masks = np.asarray(syn.lesion_masks)
    organ = np.asarray(crops.masks)[sources] > 0
    assert masks.reshape(len(syn), -1).any(axis=1).all()
    assert not (masks & ~organ).any(), "a lesion pixel lies outside the organ mask"
    images, src = syn.slices.images, np.asarray(crops.images)[sources]
    np.testing.assert_array_equal(images[~masks], src[~masks])  # tolerance 0 outside the lesion
    assert (images[masks] != src[masks]).mean() > 0.5  # the lesion changed the crop
    audit = json.loads((out / "audit.json").read_text())
    assert audit["quality_filter"]["n"] == 24 and audit["quality_filter"]["kept"] == len(syn)
    assert audit["realism"]["auc"] is None or 0.0 <= audit["realism"]["auc"] <= 1.0
    assert (out / "grid.png").stat().st_size > 0
    # Same seed, same set; the generator id names the procedural fill and changes with a lesion setting.
    again = SyntheticSet.load(generate(workspace, cfg, "liver", force=True))
    np.testing.assert_array_equal(again.slices.images, syn.slices.images)
    np.testing.assert_array_equal(again.lesion_masks, syn.lesion_masks)
    assert again.generator_id == syn.generator_id and "-procedural-" in syn.generator_id
    other = load_config("default", {**cfg.to_dict(), "gen": {**cfg.to_dict()["gen"], "lesion": {"edge_mm": 2.0}}})
    from gen.run import generator_id

    assert generator_id("liver", other, "s", "p", "c") != generator_id("liver", cfg, "s", "p", "c")


def test_lesion_mode_is_refused_for_an_organ_without_crops(workspace: Workspace) -> None:
    from gen.run import generate

    with pytest.raises(ContractError, match="gen.mode=lesion draws injuries into organ crops"):
        generate(workspace, lesion_config(), "bowel")


class SyntheticDraws(test_crops.TrainHooks):
    """The synthetic images each (fold, epoch) trained on, and the epoch plans."""

    def __init__(self) -> None:
        self.images: dict[int, list[np.ndarray]] = {}
        self.plans: list[tuple[np.ndarray, np.ndarray]] = []

    def on_train_epoch(self, organ, fold, epoch, dataset):
        syn = dataset.plan.source == 1
        self.plans.append((np.asarray(dataset.plan.source), np.asarray(dataset.plan.label)))
        self.images.setdefault(fold, []).append(dataset.synthetic.numpy()[dataset.plan.index[syn]])


def test_train_with_a_lesion_set_never_trains_on_a_validation_patients_anatomy(workspace: Workspace) -> None:
    from gen.run import generate
    from train.run import merged_folds, train_run

    syn = SyntheticSet.load(generate(workspace, lesion_config(), "liver"))
    crops = load_crop_set(workspace.store_dir, "liver")
    # Each synthetic image (lesion crop or its healthy twin) -> the patient whose anatomy it is.
    owner = {syn.slices.images[i].tobytes(): p for i, p in enumerate(syn.source_patients)}
    pairs = zip(syn.source_rows, syn.source_patients, strict=True)
    owner.update({np.asarray(crops.images[r]).tobytes(): p for r, p in pairs})
    hooks = SyntheticDraws()
    cfg = lesion_config(synthetic_ratio=0.5, synthetic_pairs=True, batch_size=8)
    train_run(workspace, cfg, organs=["liver"], hooks=hooks)
    fold_of = merged_folds(crops.table, 2)
    for fold, epochs in hooks.images.items():
        validated = set(crops.table["patient_id"][fold_of == fold])
        drawn = {owner[img.tobytes()] for images in epochs for img in images}
        assert drawn and not drawn & validated, f"fold {fold} trained on a lesion drawn into a validation patient"
    # Explain: the share of Grad-CAM mass inside the inserted lesion masks, beside their area share.
    from eval.explain import explain_runs

    small = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, explain_slices=4))
    summary = explain_runs(workspace, small, ["synthetic-0.5"], "liver")["summary"]["synthetic-0.5"]
    assert summary["lesion_n"] == 4 and 0.0 <= summary["lesion_mass_share"] <= 1.0
    assert 0.0 < summary["lesion_area_share"] < 1.0 and summary["lesion_generator_id"] == syn.generator_id
    # Pairs: every synthetic injured sample sits beside a synthetic healthy one, in the same batch of 8.
    source, label = hooks.plans[0]
    units = source.reshape(-1, 2)
    assert ((units[:, 0] == 1) == (units[:, 1] == 1)).all()
    assert (np.sort(label.reshape(-1, 2)[units[:, 0] == 1], axis=1) == [0.0, 1.0]).all()


def test_r0_is_the_same_with_pairs_on_and_a_size_mismatch_is_refused(workspace: Workspace) -> None:
    from gen.run import generate
    from train.run import train_run

    off = train_run(workspace, lesion_config(), name="off", organs=["liver"])
    on = train_run(workspace, lesion_config(synthetic_pairs=True), name="on", organs=["liver"])
    for table in ("oof.csv", "test_folds.csv"):
        assert (off / "liver" / table).read_bytes() == (on / "liver" / table).read_bytes()
    small = load_config("default", {**lesion_config().to_dict(), "gen": {"mode": "lesion", "image_size": 16,
                                                                         "n": 16}})
    generate(workspace, small, "liver")
    with pytest.raises(ContractError, match=r"made at 16 px .* trains at 32 px"):
        train_run(workspace, lesion_config(synthetic_ratio=0.5), name="mismatch", organs=["liver"])


def test_a_study_arm_of_mode_lesion_makes_its_generator_in_lesion_mode() -> None:
    from study.plan import Arm
    from study.run import generator_config

    cfg = generator_config(lesion_config(), Arm(0.5, 0.5, "lesion", "gan"))
    assert (cfg.gen.mode, cfg.gen.model) == ("lesion", "gan")


def test_a_model_fill_trains_the_lesion_gan_and_keeps_the_source(workspace: Workspace) -> None:
    from gen.run import generate

    gen = {"mode": "lesion", "model": "gan", "image_size": CROP, "n": 8, "train_steps": 2, "batch_size": 8,
           "checkpoint_every": 2, "audit_feature_epochs": 1, "gan": {"ngf": 8, "ndf": 8, "z_dim": 8},
           "lesion": {"fill": "model", "gan_masks_per_source": 1}}
    cfg = load_config("default", {**tiny_config().to_dict(), "gen": gen})
    out = generate(workspace, cfg, "liver")
    syn = SyntheticSet.load(out)
    crops = load_crop_set(workspace.store_dir, "liver")
    masks, src = np.asarray(syn.lesion_masks), np.asarray(crops.images)[syn.source_rows]
    np.testing.assert_array_equal(syn.slices.images[~masks], src[~masks])
    assert syn.backend == "gan" and "-gan-" in syn.generator_id and (out / "loss.csv").exists()
    again = SyntheticSet.load(generate(workspace, cfg, "liver", force=True))
    np.testing.assert_array_equal(again.slices.images, syn.slices.images)


def diffusion_lesion_config():
    """A tiny class-conditional UNet trained 4 steps (a checkpoint every 2) and a short RePaint."""
    section = {"mode": "lesion", "model": "diffusion", "image_size": CROP, "n": 6, "train_steps": 4,
               "batch_size": 8, "checkpoint_every": 2, "audit_feature_epochs": 1,
               "diffusion": {"unet_channels": [8, 16], "layers_per_block": 1, "num_train_timesteps": 50,
                             "lr": 5e-4},
               "lesion": {"fill": "model", "repaint_steps": 4, "repaint_jump_length": 2, "repaint_resample": 1}}
    return load_config("default", {**tiny_config().to_dict(), "gen": section})


def test_a_diffusion_model_fill_repaints_inside_the_organ_and_keeps_the_source(workspace: Workspace) -> None:
    from gen.run import generate

    cfg = diffusion_lesion_config()
    out = generate(workspace, cfg, "liver")
    syn = SyntheticSet.load(out)
    crops = load_crop_set(workspace.store_dir, "liver")
    assert syn.mode == "lesion" and syn.backend == "diffusion" and "-diffusion-" in syn.generator_id
    assert 0 < len(syn) <= 6 and (syn.classes == 1).all()
    masks, src = np.asarray(syn.lesion_masks), np.asarray(crops.images)[syn.source_rows]
    organ = np.asarray(crops.masks)[syn.source_rows] > 0
    np.testing.assert_array_equal(syn.slices.images[~masks], src[~masks])  # tolerance 0 outside the lesion
    assert masks.reshape(len(syn), -1).any(axis=1).all()
    assert not (masks & ~organ).any(), "a lesion pixel lies outside the organ mask"
    assert (syn.slices.images[masks] != src[masks]).any()  # RePaint drew something
    assert (out / "loss.csv").exists() and (out / "checkpoint" / "config.json").exists()
    # Same seed, same crops.
    again = SyntheticSet.load(generate(workspace, cfg, "liver", force=True))
    np.testing.assert_array_equal(again.slices.images, syn.slices.images)
    np.testing.assert_array_equal(again.lesion_masks, syn.lesion_masks)
    assert again.generator_id == syn.generator_id


class Interrupting(Reporter):
    """Records the steps the training progress bar shows; Ctrl-C when it reaches ``at_step`` (if given)."""

    def __init__(self, at_step: int | None = None) -> None:
        self.at_step = at_step
        self.steps: list[object] = []

    def progress(self, transient: bool = False) -> SilentProgress:
        reporter = self

        class Progress(SilentProgress):
            def update(self, task: int, **kwargs: object) -> None:
                reporter.steps.append(kwargs.get("completed"))
                if kwargs.get("completed") == reporter.at_step:
                    raise KeyboardInterrupt

        return Progress()


def test_an_interrupted_diffusion_lesion_run_resumes_to_the_uninterrupted_set(workspace: Workspace) -> None:
    import pandas as pd
    import torch

    from gen.base import TRAINING_STATE_NAME
    from gen.run import generate

    cfg = diffusion_lesion_config()
    full = SyntheticSet.load(generate(workspace, cfg, "liver"))
    out = workspace.synthetic_dir("liver")
    full_loss = pd.read_csv(out / "loss.csv")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during step 3, after the checkpoint of step 2
        generate(workspace, cfg, "liver", force=True, reporter=Interrupting(at_step=3))
    assert not (out / "manifest.csv").exists()
    assert int(torch.load(out / "checkpoint" / TRAINING_STATE_NAME, weights_only=True)["step"]) == 2
    with pytest.raises(ToolkitError, match="--resume"):
        generate(workspace, cfg, "liver")
    watch = Interrupting()
    resumed = SyntheticSet.load(generate(workspace, cfg, "liver", resume=True, reporter=watch))
    assert watch.steps == [3, 4], "the resumed run did not continue from the checkpoint of step 2"
    np.testing.assert_array_equal(resumed.slices.images, full.slices.images)
    np.testing.assert_array_equal(resumed.lesion_masks, full.lesion_masks)
    assert resumed.generator_id == full.generator_id
    loss = pd.read_csv(out / "loss.csv")
    assert loss["step"].tolist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(loss["loss"].to_numpy(), full_loss["loss"].to_numpy())
