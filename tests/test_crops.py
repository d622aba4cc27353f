"""``toolkit crop`` and the stages that read organ crops, on a tiny annotated phantom store.

The store (tests/seg_store.py) has real masks on 3/4 of its training series and half of its test
series; a tiny localizer (``toolkit segment``, 32 px) labels the rest, and the crop sets are cut
from its label maps (training series keep their real masks, test series carry predictions).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from seg_store import make_annotated_store
from typer.testing import CliRunner

from seg.crops import crop_targets, cut_crops, make_crop_sets, organ_box, series_crops
from seg.run import segment_store
from seg.store import ORGANS_FILE, SEG_LABELS, read_organ_labels, read_organs, visibility
from toolkit.artifacts.crops import HARD_THRESHOLD, SIDES, CropSet, crops_dir, load_crop_set
from toolkit.artifacts.run import RunFolder
from toolkit.cli import app
from toolkit.config import Config, CropConfig, load_config
from toolkit.errors import ContractError, DataError
from toolkit.reporting import Reporter
from toolkit.sliceset import MANIFEST_FILE, SliceSet
from toolkit.workspace import Workspace
from train.engine import TrainHooks, injury_loss
from train.run import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CROP = 32


def tiny_config(**train: object) -> Config:
    """A tiny localizer (as tests/test_segment.py), 32 px crops and one epoch of a tiny MobileNetV2."""
    return load_config("default", {
        "data": {"windows": [[40, 400]]},
        "segment": {"image_size": 32, "channels": [16, 32, 64], "num_res_units": 0, "epochs": 20, "batch_size": 8,
                    "lr": 1e-2, "augment": False, "holdout_fraction": 0.3},
        "crop": {"size": CROP, "margin": 0.15},
        "train": {"model": "mobilenetv2_050", "pretrained": False, "image_size": CROP, "folds": 2, "epochs": 1,
                  "epoch_size": 32, "batch_size": 16, "trainable_blocks": -1, "num_workers": 0, **train},
    })


class Recorder(Reporter):
    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


class Plans(TrainHooks):
    """The targets each training epoch drew."""

    def __init__(self) -> None:
        self.labels: list[np.ndarray] = []

    def on_train_epoch(self, organ, fold, epoch, dataset):
        self.labels.append(np.asarray(dataset.plan.label))


@pytest.fixture(scope="module")
def cropped(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> Workspace:
    """data/ + a segmented store (14 patients, half injured in each organ, 8 slices of 64 px per series) + crop
    sets of every crop organ."""
    root = tmp_path_factory.mktemp("cropws")
    make_annotated_store(
        root, patients=14, slices=10, size=64, store_size=64, slices_per_series=8, annotated_share={"train": 0.75},
        prevalence={"kidney": 0.7, "liver": 0.5, "spleen": 0.5},  # injured patients in both folds
    )
    ws = Workspace(root)
    segment_store(ws.store_dir, tiny_config())
    make_crop_sets(ws.store_dir, tiny_config())
    return ws


@pytest.fixture
def workspace(cropped: Workspace, tmp_path: Path) -> Workspace:
    """A fresh copy of the cropped workspace (tests change it)."""
    shutil.copytree(cropped.root, tmp_path, dirs_exist_ok=True)
    return Workspace(tmp_path)


# ------------------------------------------------------------------ geometry
def test_organ_box_is_one_square_around_the_organ_ignoring_specks() -> None:
    mask = np.zeros((3, 40, 40), bool)
    mask[0, 10:20, 12:18] = True  # 10 x 6
    mask[1, 8:22, 10:20] = True  # the widest slice: rows 8-21, cols 10-19
    mask[2, 39, 0] = True  # a speck far away: not part of the organ
    top, left, side = organ_box(mask, margin=0.25)
    assert side == 21  # 14 rows x 1.5
    assert (top, left) == (round((8 + 22 - 21) / 2), round((10 + 20 - 21) / 2))
    assert organ_box(np.zeros((2, 8, 8), bool), 0.1) is None
    # Outside the slice reads as air; the cut is resized to the crop size.
    hu = np.full((1, 10, 10), 40, np.int16)
    crop = cut_crops(hu, (-5, -5, 10), 20)
    assert crop.shape == (1, 20, 20) and crop[0, 0, 0] == -1024 and crop[0, -1, -1] == 40


def test_crops_land_on_the_organ_with_one_box_per_series(cropped: Workspace) -> None:
    store = SliceSet.load(cropped.store_dir)
    labels = read_organ_labels(cropped.store_dir)
    organs = read_organs(cropped.store_dir, store.table)
    for organ in ("liver", "spleen", "kidney"):
        crops = load_crop_set(cropped.store_dir, organ)
        t = crops.table
        assert crops.images.shape == crops.masks.shape == (len(t), CROP, CROP)
        # One box per series (and side): a lesion keeps its place from slice to slice.
        boxes = t.groupby(["series_id", "side"])[["crop_top", "crop_left", "crop_side"]].nunique()
        assert (boxes == 1).all().all(), organ
        assert set(t["side"]) == ({"left", "right"} if organ == "kidney" else {""})
        # Exactly the slices where the organ is visible, each with its visibility.
        for side, seg_organ in SIDES[organ].items():
            rows = t.loc[t["side"] == side, "store_row"].to_numpy()
            assert set(rows) == set(np.flatnonzero(organs[f"vis_{seg_organ}"].to_numpy() > 0)), (organ, side)
            np.testing.assert_allclose(t.loc[t["side"] == side, "vis"], organs[f"vis_{seg_organ}"].to_numpy()[rows],
                                       atol=1e-4)
        # The crop is the store slice's box, resized; the mask beside it is the organ's label there.
        for i in np.random.default_rng(0).choice(len(t), 8, replace=False):
            row = t.iloc[i]
            box = (int(row["crop_top"]), int(row["crop_left"]), int(row["crop_side"]))
            np.testing.assert_array_equal(crops.images[i], cut_crops(store.images[[row["store_row"]]], box, CROP)[0])
            code = SEG_LABELS[SIDES[organ][row["side"]]]
            assert crops.masks[i].any() == (labels[row["store_row"]] == code).any()
        # The organ covers a good share of the crops where it is large (margin 0.15: at most 1/1.3^2 = 0.59),
        # on every crop of a real mask (the tiny localizer's predictions may scatter an organ over a series).
        share = np.asarray(crops.masks).mean(axis=(1, 2))
        large = t["vis"].to_numpy() >= 0.5
        assert 0.15 < share[large].mean() < 0.6, (organ, share[large].mean())
        real = large & (t["label_source"] == "rsna").to_numpy()
        assert real.sum() >= 8 and (share[real] > 0.1).all(), organ
        # Store columns for the stages: patient, split, fold and the field of the store slice.
        same = store.table.iloc[t["store_row"].to_numpy()]
        for column in ("patient_id", "series_id", "instance", "split", "fold", "field_top", "field_side"):
            np.testing.assert_array_equal(t[column].to_numpy(), same[column].to_numpy())


def test_soft_targets_are_grade_times_visibility_and_image_level_rows_win() -> None:
    target, hard = crop_targets(
        patient_grade=np.array([2, 2, 0, 1, 1, 0]), slice_label=np.array([2, 2, 0, 0, 1, 1]),
        image_level=np.array([0, 0, 0, 1, 1, 1], bool), vis=np.array([0.3, 0.8, 0.9, 1.0, 0.1, 0.5]),
    )
    np.testing.assert_allclose(target, [0.3, 0.8, 0.0, 0.0, 1.0, 1.0])
    # Hard labels (the balancer's classes): target >= 0.5, with the grade.
    assert HARD_THRESHOLD == 0.5
    np.testing.assert_array_equal(hard, [0, 2, 0, 0, 1, 1])


def test_targets_in_the_crop_sets(workspace: Workspace) -> None:
    """Where a series has no image-level rows: patient label x visibility; where it has, the slice label wins."""
    crops = load_crop_set(workspace.store_dir, "liver")
    t = crops.table
    assert not t["image_level"].any()  # the phantom lists only bowel and extravasation slices, like RSNA
    np.testing.assert_allclose(t["target"], (t["liver_patient"] > 0) * t["vis"], atol=1e-4)
    assert ((t["liver"] > 0) == (t["target"] >= HARD_THRESHOLD)).all()
    assert 0 < (t["liver"] > 0).sum() < (t["target"] > 0).sum()

    # Give one injured series image-level liver rows: only its listed slices are injured, whatever they show.
    store = SliceSet.load(workspace.store_dir)
    table = store.table
    injured = table.loc[table["liver_patient"] > 0, "series_id"].iloc[0]
    in_series = table["series_id"] == injured
    listed = in_series & (table["instance"] == table.loc[in_series, "instance"].iloc[3])
    table["liver_image_level"] = in_series.astype(int)
    table.loc[in_series, "liver"] = np.where(listed[in_series], table.loc[in_series, "liver_patient"], 0)
    table.to_csv(workspace.store_dir / MANIFEST_FILE, index=False)
    with pytest.raises(ContractError, match="other crop settings or from other label maps.*--force"):
        make_crop_sets(workspace.store_dir, tiny_config())
    make_crop_sets(workspace.store_dir, tiny_config(), organs=["liver"], force=True)
    t = load_crop_set(workspace.store_dir, "liver").table
    mine = t[t["series_id"] == injured]
    assert len(mine) and mine["image_level"].all()
    np.testing.assert_array_equal(mine["target"], (mine["slice_label"] > 0).astype(float))
    others = t[t["series_id"] != injured]
    np.testing.assert_allclose(others["target"], (others["liver_patient"] > 0) * others["vis"], atol=1e-4)


def test_rerun_keeps_up_to_date_sets_and_other_settings_need_force(workspace: Workspace) -> None:
    reporter = Recorder()
    before = crops_dir(workspace.store_dir, "spleen").stat().st_mtime_ns
    results = make_crop_sets(workspace.store_dir, tiny_config(), reporter=reporter)
    assert {r["status"] for r in results.values()} == {"kept"}
    assert crops_dir(workspace.store_dir, "spleen").stat().st_mtime_ns == before
    bigger = dataclasses.replace(tiny_config(), crop=CropConfig(size=24, margin=0.3))
    with pytest.raises(ContractError, match="pass --force"):
        make_crop_sets(workspace.store_dir, bigger, organs=["spleen"])
    result = make_crop_sets(workspace.store_dir, bigger, organs=["spleen"], force=True)["spleen"]
    spleen = CropSet.load(crops_dir(workspace.store_dir, "spleen"))
    assert result["status"] == "made" and spleen.images.shape[1:] == (24, 24) and spleen.margin == 0.3
    assert not crops_dir(workspace.store_dir, "spleen").with_name("spleen.tmp").exists()


def test_a_series_without_an_organ_gives_a_clear_message_and_keeps_the_others(workspace: Workspace) -> None:
    store = SliceSet.load(workspace.store_dir)
    table = store.table
    test_patient = table.loc[table["split"] == "test", "patient_id"].iloc[0]
    series = table.loc[table["patient_id"] == test_patient, "series_id"].unique()
    rows = np.flatnonzero(table["patient_id"] == test_patient)
    # The localizer found no spleen on this patient's series.
    labels = np.load(workspace.store_dir / "organ_labels.npy")
    labels[rows] = np.where(labels[rows] == SEG_LABELS["spleen"], 0, labels[rows])
    np.save(workspace.store_dir / "organ_labels.npy", labels)
    organs = read_organs(workspace.store_dir, table)
    _, vis = visibility(labels, table["series_id"].to_numpy())
    organs[[f"vis_{o}" for o in SEG_LABELS]] = np.round(vis, 4)
    organs.to_csv(workspace.store_dir / ORGANS_FILE, index=False)

    reporter = Recorder()
    make_crop_sets(workspace.store_dir, tiny_config(), force=True, reporter=reporter)
    said = [w for w in reporter.warnings if f"series {series[0]} (patient {test_patient})" in w]
    assert said and "no spleen" in said[0] and "its other organs are cropped" in said[0]
    assert any("test patient(s) have no spleen crop" in w for w in reporter.warnings)
    assert test_patient not in set(load_crop_set(workspace.store_dir, "spleen").table["patient_id"])
    assert test_patient in set(load_crop_set(workspace.store_dir, "liver").table["patient_id"])

    # Training still scores that patient: 0 for the spleen it has no crop of, like predict would.
    cfg = tiny_config()
    reporter = Recorder()
    run = RunFolder(train_run(workspace, cfg, name="crops", organs=["spleen"], reporter=reporter))
    scores = run.read_table("spleen", "test_patients").set_index("patient_id")
    assert scores.loc[test_patient, "prob"] == 0.0
    assert len(scores) == table.loc[table["split"] == "test", "patient_id"].nunique()
    assert any("have no spleen crop" in w and "score 0" in w for w in reporter.warnings)


def test_missing_crop_set_names_the_ways_out(tmp_path: Path, cropped: Workspace) -> None:
    ws = Workspace(tmp_path)
    shutil.copytree(cropped.store_dir, ws.store_dir, ignore=shutil.ignore_patterns("crops"))
    with pytest.raises(DataError, match=r"no liver crop set .* `toolkit crop`.*train.input=slices"):
        train_run(ws, tiny_config(), organs=["liver"])
    with pytest.raises(ContractError, match="image size 64 .* above the 32 px crops"):
        train_run(Workspace(cropped.root), tiny_config(image_size=64), organs=["liver"])


# ------------------------------------------------------------------ training on crops
@pytest.fixture(scope="module")
def crop_run(cropped: Workspace) -> tuple[RunFolder, Plans]:
    plans = Plans()
    # Spleen reads whole slices here (a per-organ train.input): crop and slice organs in one run.
    cfg = tiny_config(organs={"spleen": {"input": "slices"}})
    run = train_run(cropped, cfg, name="crops", organs=["liver", "kidney", "spleen"], hooks=plans)
    return RunFolder(run), plans


def test_train_on_crops_end_to_end(cropped: Workspace, crop_run: tuple[RunFolder, Plans]) -> None:
    run, plans = crop_run
    info = run.read_info()
    assert info.complete and info.input("liver")["input"] == "crops" and info.input("spleen") == {"input": "slices"}
    assert (info.settings["liver"].input, info.settings["spleen"].input) == ("crops", "slices")
    kidney = load_crop_set(cropped.store_dir, "kidney")
    assert info.input("kidney")["crop_id"] == kidney.crop_id and info.input("kidney")["size"] == CROP
    # Soft targets reach the loss: real samples carry targets strictly between 0 and 1.
    drawn = np.concatenate(plans.labels)
    assert ((drawn > 0) & (drawn < 1)).any() and set(np.unique(drawn)) >= {0.0, 1.0}
    # Kidney: every test crop of both sides scored; the patient score aggregates both kidneys.
    test_crops = kidney.table[kidney.table["split"] == "test"]
    slices = run.read_table("kidney", "test_slices")
    assert len(slices) == len(test_crops) and set(test_crops["side"]) == {"left", "right"}
    patients = run.read_table("kidney", "test_patients").set_index("patient_id")
    top = slices.groupby("patient_id")["prob"].max()
    np.testing.assert_allclose(patients.loc[top.index, "prob"], top, atol=1e-6)
    # Spleen read the stored slices.
    store = SliceSet.load(cropped.store_dir)
    assert len(run.read_table("spleen", "test_slices")) == (store.table["split"] == "test").sum()


def test_the_whole_slice_switch_still_works(cropped: Workspace, tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    shutil.copytree(cropped.store_dir, ws.store_dir)
    run = RunFolder(train_run(ws, tiny_config(input="slices"), name="slices", organs=["liver"]))
    assert run.read_info().input("liver") == {"input": "slices"}
    store = SliceSet.load(ws.store_dir)
    assert len(run.read_table("liver", "test_slices")) == (store.table["split"] == "test").sum()
    assert run.read_info().settings["liver"].input == "slices"


def test_injury_loss_takes_soft_targets() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0])
    targets = torch.tensor([0.5, 0.25, 1.0])
    p = torch.sigmoid(logits)
    by_hand = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    assert float(injury_loss(logits, targets)) == pytest.approx(float(by_hand), rel=1e-6)


# ------------------------------------------------------------------ predict and explain
def test_predict_runs_segment_crop_classify_on_one_series(cropped: Workspace, crop_run, tmp_path: Path) -> None:
    from eval.predict import predict_study, segment_series
    from toolkit.data.dicom import read_series
    from train.inference import load_fold_models, predict_probs

    store = SliceSet.load(cropped.store_dir)
    row = store.table[store.table["split"] == "test"].iloc[0]
    study = cropped.data_dir / "train_images" / str(int(row["patient_id"])) / str(int(row["series_id"]))
    result = predict_study(cropped, tiny_config(), study, "crops")
    assert set(result["organs"]) == {"liver", "kidney", "spleen"}
    assert {k for k, v in result["seconds"].items() if v > 0} == {"read", "segment", "crop", "classify"}
    kidney = result["organs"]["kidney"]
    assert kidney["input"] == "crops" and kidney["scored"] > 0 and 0.0 <= kidney["prob"] <= 1.0
    assert {s["side"] for s in kidney["top_slices"]} <= {"left", "right"}
    assert result["organs"]["spleen"]["input"] == "slices" and result["organs"]["spleen"]["scored"] == 8

    # The same steps by hand: the store's reading, the localizer, the crop code, the fold models.
    hu, _ = read_series(study, size=64, slices=8, crop_body=True)
    found = segment_series(cropped.store_dir / "segmenter", hu)
    vis = {k[4:]: v for k, v in found.items() if k.startswith("vis_")}
    crops = series_crops(hu, found["labels"], vis, "kidney", tiny_config().crop)
    images = np.concatenate([c.images for c in crops])
    probs = predict_probs(load_fold_models(crop_run[0].path, "kidney"), images, [[40, 400]], CROP).mean(axis=0)
    assert kidney["scored"] == len(images) and kidney["prob"] == pytest.approx(float(probs.max()), abs=1e-6)

    # The CLI prints the probabilities and the time of each step.
    res = CliRunner().invoke(app, ["predict", str(study), "--workdir", str(cropped.root), "--run", "crops"])
    assert res.exit_code == 0, res.output
    assert "segment" in res.output and "classify" in res.output and "crops" in res.output
    assert f"{kidney['prob']:.3f}" in res.output


def test_explain_measures_attention_inside_the_crop_organ_mask(cropped: Workspace, crop_run, tmp_path) -> None:
    from eval.explain import explain_runs

    ws = Workspace(tmp_path)
    shutil.copytree(cropped.root, ws.root, dirs_exist_ok=True)
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, explain_slices=4))
    result = explain_runs(ws, cfg, ["crops"], "liver")
    data = json.loads((ws.reports_dir / "explain-crops-liver" / "explain.json").read_text())
    crops = load_crop_set(ws.store_dir, "liver")
    assert result["has_truth"] and len(data["slices"]) == 4
    for rec in data["slices"]:
        row = crops.table[(crops.table["series_id"] == rec["series_id"]) & (crops.table["instance"] == rec["instance"])]
        assert (row["split"] == "test").all()
        share = float(np.asarray(crops.masks[row.index[0]]).mean())
        # The organ is the crop's mask: its area share is the mask's (resized to the model's size, here the same).
        assert rec["organ"]["area_share"] == pytest.approx(share, abs=1e-6)
        assert 0.0 <= rec["organ"]["mass_share"] <= 1.0
    assert data["summary"]["organ_n"] == 4 and data["summary"]["organ_mass_share"] is not None
    slices_run = pd.DataFrame(data["slices"])
    assert (slices_run["label"] >= 0).all()


# ------------------------------------------------------------------ generators on crops
def test_generator_learns_the_crop_set_and_train_checks_what_it_learnt(workspace: Workspace) -> None:
    from gen.run import generate
    from toolkit.artifacts.synthetic import SyntheticSet

    gen = {"model": "gan", "image_size": 16, "train_steps": 2, "batch_size": 8, "checkpoint_every": 2, "n": 48,
           "audit_feature_epochs": 1, "gan": {"ngf": 8, "ndf": 8, "z_dim": 8}}
    cfg = load_config("default", {**tiny_config().to_dict(), "gen": gen})
    liver = load_crop_set(workspace.store_dir, "liver")
    syn = SyntheticSet.load(generate(workspace, cfg, "liver"))
    assert syn.provenance["input_id"] == liver.crop_id and syn.image_size == 16
    # It learnt the training patients' crops, classes from their hard labels.
    train = liver.table[liver.table["split"] == "train"]
    assert syn.provenance["n_train_slices"] == len(train)
    # A crop classifier trains with it; one reading slices refuses it in one line.
    run = train_run(workspace, load_config("default", {**cfg.to_dict(), "train": {
        **cfg.to_dict()["train"], "synthetic_ratio": 0.25, "synthetic_resize": True}}), organs=["liver"])
    assert RunFolder(run).read_info().generators["liver"]["generator_id"] == syn.generator_id
    slices = load_config("default", {**cfg.to_dict(), "train": {
        **cfg.to_dict()["train"], "synthetic_ratio": 0.25, "synthetic_resize": True, "input": "slices"}})
    with pytest.raises(ContractError, match=f"learnt from {liver.crop_id} but .* reads slices"):
        train_run(workspace, slices, name="slices", organs=["liver"])
    with pytest.raises(ContractError, match="gen.image_size=48 is above the 32 px crops"):
        generate(workspace, load_config("default", {**cfg.to_dict(), "gen": {**gen, "image_size": 48}}), "liver",
                 force=True)
