"""``toolkit segment``: the organ localizer on a tiny annotated phantom store.

The store (tests/seg_store.py) has real masks on about half of the series of each split;
the segmenter trains at 32 px for a few epochs, which is enough to find the liver and the
spleen on series it never saw.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from seg_store import make_annotated_store, patients_of
from typer.testing import CliRunner

from seg.data import split_annotated
from seg.run import segment_store
from seg.store import (
    LABELS_FILE,
    MASK_SOURCE,
    PREDICTED,
    SEG_ORGANS,
    SEGMENTER_DIR,
    VIS_COLUMNS,
    has_mask,
    load_masks,
    read_organ_labels,
    read_organs,
)
from toolkit.config import Config, SegmentConfig
from toolkit.errors import ConfigError, ContractError, DataError, ToolkitError
from toolkit.reporting import Reporter
from toolkit.sliceset import MANIFEST_FILE, SliceSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(epochs: int = 20, seed: int = 0, **segment: object) -> Config:
    # 32 px, no augmentation, a high learning rate: 100 steps find liver, spleen and bowel on unseen series.
    values = dict(
        image_size=32, channels=[16, 32, 64], num_res_units=0, epochs=epochs, batch_size=8, lr=1e-2, augment=False,
        holdout_fraction=0.3,
    )
    sc = dataclasses.replace(SegmentConfig(), **{**values, **segment})
    return dataclasses.replace(Config(), segment=sc, seed=seed)


class Recorder(Reporter):
    """A reporter that keeps what it was told."""

    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/ + store/ (14 patients, 8 slices of 64 px per series; masks on 3/4 of the training series
    and half of the test series)."""
    root = tmp_path_factory.mktemp("segws")
    make_annotated_store(
        root, patients=14, slices=10, size=64, store_size=64, slices_per_series=8, annotated_share={"train": 0.75}
    )
    return root


def copy_store(workspace: Path, dest: Path) -> Path:
    shutil.copytree(workspace / "store", dest)
    return dest


@pytest.fixture(scope="module")
def segmented(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Recorder]:
    store_dir = copy_store(workspace, tmp_path_factory.mktemp("seg") / "store")
    reporter = Recorder()
    summary = segment_store(store_dir, tiny_cfg(), reporter=reporter)
    return store_dir, summary, reporter


def test_trains_on_training_patients_only_and_finds_organs_on_unseen_series(segmented: tuple) -> None:
    store_dir, summary, _ = segmented
    table = SliceSet.load(store_dir).table
    trained = set(summary["trained_on"]["patients"])
    assert trained and trained <= patients_of(table, "train")
    assert not trained & patients_of(table, "test")
    listed = pd.read_csv(store_dir / SEGMENTER_DIR / "train_series.csv")
    assert set(listed["patient_id"]) == trained and set(listed["split"]) == {"train"}
    # Every trained series has a mask; held-out and test series were measured, never trained on.
    assert set(listed["series_id"]) <= set(table.loc[has_mask(table), "series_id"])
    dice = pd.read_csv(store_dir / SEGMENTER_DIR / "dice.csv")
    assert not set(dice["patient_id"]) & trained
    assert set(dice["group"]) == {"holdout", "test"}
    for group in ("holdout", "test"):
        g = summary["dice"][group]
        assert g["series"] == (dice["group"] == group).sum() > 0
        # An untrained network scores about 0 (a blob in the middle of the body about 0.3 on the liver);
        # the small organs come later in training than this test runs.
        assert g["dice"]["liver"] > 0.6, g
        assert np.mean([g["dice"][o] for o in SEG_ORGANS]) > 0.25, g


def test_label_maps_and_visibility_are_aligned_with_the_store(segmented: tuple) -> None:
    store_dir, summary, _ = segmented
    store = SliceSet.load(store_dir)
    labels = read_organ_labels(store_dir)
    assert labels.dtype == np.uint8 and labels.shape == store.images.shape
    assert set(np.unique(labels)) <= set(range(len(SEG_ORGANS) + 1))
    organs = read_organs(store_dir, store.table)
    test = store.table["split"].to_numpy() == "test"
    masked = has_mask(store.table) & ~test
    # Real masks are kept where a training series has one; the other slices carry the prediction, and so do
    # annotated test series (scored as new data would be): their labels are not simply their masks.
    masks = load_masks(store_dir)
    np.testing.assert_array_equal(labels[masked], masks[masked])
    masked_test = has_mask(store.table) & test
    assert masked_test.any() and not np.array_equal(labels[masked_test], masks[masked_test])
    assert (organs.loc[masked, "label_source"] == "rsna").all()
    assert (organs.loc[~masked, "label_source"] == PREDICTED).all()
    assert (labels[~masked] > 0).mean() > 0.05  # predicted organs on the unannotated series
    vis = organs[list(VIS_COLUMNS)].to_numpy()
    assert vis.min() >= 0 and vis.max() <= 1
    # Max 1 per series for every organ found (largest area >= segment.min_area of the slice), else all 0.
    peak = organs.groupby("series_id")[list(VIS_COLUMNS)].max()
    largest = organs.groupby("series_id")[[f"area_{o}" for o in SEG_ORGANS]].max()
    found = largest.to_numpy() >= max(1.0, tiny_cfg().segment.min_area * store.size[0] ** 2)
    assert found.mean() > 0.8
    np.testing.assert_allclose(peak.to_numpy()[found], 1.0)
    np.testing.assert_allclose(peak.to_numpy()[~found], 0.0)
    missing = {str(s): [o for o, f in zip(SEG_ORGANS, row, strict=True) if not f] for s, row in zip(
        largest.index, found, strict=True)}
    assert summary["missing_organs"] == {s: m for s, m in missing.items() if m}
    # Visibility is area over the series' largest area.
    liver = organs["area_liver"] / organs.groupby("series_id")["area_liver"].transform("max").clip(lower=1)
    np.testing.assert_allclose(organs["vis_liver"], liver.round(4), atol=1e-4)


def test_rerun_reuses_and_a_changed_config_needs_force(segmented: tuple, tmp_path: Path) -> None:
    store_dir = shutil.copytree(segmented[0], tmp_path / "store")
    summary = segmented[1]
    weights = store_dir / SEGMENTER_DIR / "model.safetensors"
    before = {p: p.stat().st_mtime_ns for p in (store_dir / LABELS_FILE, weights)}
    reporter = Recorder()
    again = segment_store(store_dir, tiny_cfg(), reporter=reporter)
    assert again["dice"] == summary["dice"] and "already segmented" in reporter.infos[-1]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    with pytest.raises(ContractError, match="segment.epochs"):
        segment_store(store_dir, tiny_cfg(epochs=3))
    # Output settings only: the trained segmenter is reused, the outputs are rewritten.
    reporter = Recorder()
    predicted = segment_store(store_dir, tiny_cfg(keep_masks=False), reporter=reporter)
    assert any("reusing the trained segmenter" in m for m in reporter.infos)
    assert weights.stat().st_mtime_ns == before[weights]
    assert predicted["dice"] == summary["dice"]
    assert (read_organs(store_dir)["label_source"] == PREDICTED).all()


def test_deterministic_for_a_seed_and_resume_ends_where_a_full_run_does(workspace: Path, tmp_path: Path) -> None:
    runs = {name: copy_store(workspace, tmp_path / name) for name in ("a", "b", "resumed", "seed1")}
    for name in ("a", "b"):
        segment_store(runs[name], tiny_cfg(epochs=3))
    segment_store(runs["seed1"], tiny_cfg(epochs=3, seed=1))

    def stop_after_first(epoch: int, metrics: dict) -> None:
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        segment_store(runs["resumed"], tiny_cfg(epochs=3), on_epoch_end=stop_after_first)
    assert (runs["resumed"] / SEGMENTER_DIR / "last").is_dir()
    with pytest.raises(ToolkitError, match="--resume"):
        segment_store(runs["resumed"], tiny_cfg(epochs=3))
    reporter = Recorder()
    segment_store(runs["resumed"], tiny_cfg(epochs=3), resume=True, reporter=reporter)
    assert any("resuming" in m for m in reporter.infos)

    def weights(store_dir: Path) -> dict:
        return load_file(str(store_dir / SEGMENTER_DIR / "model.safetensors"))

    def labels(store_dir: Path) -> np.ndarray:
        return np.load(store_dir / LABELS_FILE)

    for other in ("b", "resumed"):
        for key, value in weights(runs["a"]).items():
            assert np.array_equal(value.numpy(), weights(runs[other])[key].numpy()), (other, key)
        np.testing.assert_array_equal(labels(runs["a"]), labels(runs[other]))
    assert not np.array_equal(labels(runs["a"]), labels(runs["seed1"]))
    # A resumed run records every epoch once.
    metrics = pd.read_csv(runs["resumed"] / SEGMENTER_DIR / "metrics.csv")
    assert metrics["epoch"].tolist() == [0, 1, 2]


def test_a_series_with_no_organ_found_warns_and_stays_usable(workspace: Path, tmp_path: Path) -> None:
    store_dir = copy_store(workspace, tmp_path / "store")
    table = SliceSet.load(store_dir).table
    blank = int(table.loc[~has_mask(table), "series_id"].iloc[0])
    images = np.load(store_dir / "images.npy")
    images[table["series_id"].to_numpy() == blank] = -1000  # air: nothing to find
    np.save(store_dir / "images.npy", images)

    reporter = Recorder()
    summary = segment_store(store_dir, tiny_cfg(epochs=6), reporter=reporter)
    warned = [m for m in reporter.warnings if f"series {blank} " in m]
    assert len(warned) == 1 and "liver" in warned[0] and "spleen" in warned[0]
    assert "liver" in summary["missing_organs"][str(blank)]
    organs = read_organs(store_dir)
    rows = organs["series_id"] == blank
    assert (organs.loc[rows, list(VIS_COLUMNS)].to_numpy() == 0).all()
    # The other series keep their organs.
    assert (organs.loc[~rows].groupby("series_id")["vis_liver"].max() == 1).mean() > 0.8


def test_holdout_split_is_by_patient_and_never_includes_test_series(workspace: Path) -> None:
    table = SliceSet.load(workspace / "store").table
    groups = split_annotated(table, 0.3, seed=0)
    fit, held = set(table.iloc[groups.fit]["patient_id"]), set(table.iloc[groups.holdout]["patient_id"])
    assert fit and held and not fit & held
    assert set(table.iloc[groups.test]["split"]) == {"test"}
    assert set(table.iloc[groups.fit]["split"]) == {"train"}
    none_held = split_annotated(table, 0.0, seed=0)
    assert len(none_held.holdout) == 0 and len(none_held.fit) == len(groups.fit) + len(groups.holdout)


def test_bad_input_gives_one_line_errors(workspace: Path, tmp_path: Path) -> None:
    store_dir = copy_store(workspace, tmp_path / "store")
    with pytest.raises(ConfigError, match="segment.image_size"):
        segment_store(store_dir, tiny_cfg(image_size=30))
    manifest = pd.read_csv(store_dir / MANIFEST_FILE)
    manifest.loc[manifest["split"] == "train", MASK_SOURCE] = np.nan
    manifest.to_csv(store_dir / MANIFEST_FILE, index=False)
    with pytest.raises(DataError, match="no training-split series has a mask"):
        segment_store(store_dir, tiny_cfg())
    (store_dir / "masks.npy").unlink()
    with pytest.raises(DataError, match="masks.npy"):
        segment_store(store_dir, tiny_cfg())


def test_cli_prints_dice_with_counts(workspace: Path, tmp_path: Path) -> None:
    from toolkit.cli import app

    ws = tmp_path / "ws"
    copy_store(workspace, ws / "store")
    sets = ["segment.image_size=32", "segment.channels=[8,16,32]", "segment.num_res_units=0",
            "segment.batch_size=8", "segment.lr=0.003"]
    args = ["segment", "-w", str(ws), "--epochs", "2"] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test-split patients (" in result.output and "series" in result.output and "liver" in result.output
    summary = json.loads((ws / "store" / SEGMENTER_DIR / "summary.json").read_text())
    assert summary["fingerprint"]["segment"]["epochs"] == 2
    assert "--resume" in CliRunner().invoke(app, ["segment", "--help"]).output
