"""``toolkit explain`` and ``toolkit predict`` on tiny run folders trained by ``toolkit train`` (random init, 32 px)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from eval.explain import (
    explain_runs,
    injury_visible,
    last_conv,
    load_truth,
    localisation,
    resize_mask,
    select_slices,
)
from eval.predict import predict_study, run_settings
from eval.runs import load_run
from tests.conftest import make_toy_slice_set
from toolkit.cli import app
from toolkit.config import Config, EvalConfig, load_config
from toolkit.errors import DataError, ToolkitError
from toolkit.workspace import Workspace
from train.run import train_run

SIZE = 32  # store and model input size


def tiny_train_config(seed: int = 0, **liver: object) -> Config:
    """One epoch of a tiny MobileNetV2; ``liver`` overrides that organ's settings (``train.organs``)."""
    return load_config("default", {
        "seed": seed,
        # Deliberately not the store's size: the store the run was trained on is the authority.
        "data": {"size": 64, "slices_per_series": 5, "windows": [[40.0, 400.0]]},
        "train": {"model": "mobilenetv2_050", "pretrained": False, "image_size": SIZE, "folds": 2, "epochs": 1,
                  "epoch_size": 32, "batch_size": 16, "trainable_blocks": -1, "num_workers": 0, "input": "slices",
                  "organs": {"liver": liver} if liver else {}},
    })


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread) -> Path:
    """A workspace with two runs trained on the toy store: ``real-only`` (patient score = max slice) and
    ``topk`` (another seed; liver scores patients by the mean of the top 2 slices, a per-organ setting)."""
    ws = Workspace(tmp_path_factory.mktemp("explain_runs"))
    make_toy_slice_set(n_patients=12, slices_per_patient=4, size=SIZE).save(ws.store_dir)
    train_run(ws, tiny_train_config(), name="real-only", organs=["liver"])
    train_run(ws, tiny_train_config(seed=1, aggregate="topk", top_k=2), name="topk", organs=["liver"])
    return ws.root


@pytest.fixture
def workspace(trained: Path, tmp_path: Path) -> Workspace:
    """A fresh copy of the trained workspace (tests write reports and ground truth into it)."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return Workspace(tmp_path)


# Codes of our own, not the phantom's (liver 1): explain must take them from each file's legend.
TRUTH_CODES = {"spleen": 3, "liver": 9}


def _write_truth(ws: Workspace, store_table: pd.DataFrame, size: int = 2 * SIZE, legend: bool = True) -> None:
    """Truth masks at twice the store size: liver = left half, injury = a square in it, spleen = a right strip."""
    out = ws.data_dir / "phantom_truth"
    out.mkdir(parents=True)
    for series_id, rows in store_table.groupby("series_id"):
        n = len(rows)
        organs = np.zeros((n, size, size), np.uint8)
        organs[:, :, : size // 2] = TRUTH_CODES["liver"]
        organs[:, :, -4:] = TRUTH_CODES["spleen"]
        injury = np.zeros_like(organs)
        if rows["liver"].max() > 0:
            injury[:, 8:24, 8:24] = TRUTH_CODES["liver"]
        codes = {"code_names": np.array(list(TRUTH_CODES)), "codes": np.array(list(TRUTH_CODES.values()))}
        np.savez(
            out / f"{series_id}.npz",
            instance_number=rows["instance"].to_numpy(),
            organs=organs,
            injury=injury,
            **(codes if legend else {}),
        )


def test_localisation_and_mask_resampling_by_hand():
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0], cam[3, 3] = 3.0, 1.0
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    loc = localisation(cam, mask)
    assert loc == {"mass_share": 0.75, "area_share": 0.25, "hit": True}
    assert localisation(cam, np.zeros((4, 4), bool))["mass_share"] is None
    big = np.zeros((8, 8), np.uint8)
    big[:4, :4] = 1
    assert np.array_equal(resize_mask(big, 4), np.kron([[1, 0], [0, 0]], np.ones((2, 2), np.uint8)))
    model = timm.create_model("mobilenetv2_050", num_classes=1, in_chans=1).eval()
    assert last_conv(model) is model.conv_head
    # At 32 px conv_head's map is 1 x 1; Grad-CAM moves to the last layer with a map of at least 4 px.
    sides = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out, name=name: sides.__setitem__(name, out.shape[-1]))
    with torch.no_grad():
        model(torch.zeros(1, 1, 32, 32))
    chosen = next(name for name, m in model.named_modules() if m is last_conv(model, 32))
    names = list(sides)
    assert sides["conv_head"] == 1 and sides[chosen] >= 4
    assert all(sides[n] < 4 for n in names[names.index(chosen) + 1 :])


def test_select_slices_visible_injury_then_injured_then_healthy():
    store = make_toy_slice_set(n_patients=12, slices_per_patient=4, size=8)
    table = store.table
    test = table["split"].to_numpy() == "test"
    visible = test & (table["liver"].to_numpy() > 0) & (table["instance"].to_numpy() == 2)
    rows = select_slices(store, "liver", 50, seed=0, visible=visible)
    assert set(rows) == set(np.flatnonzero(test))  # only test slices, each once
    n_vis, n_inj = int(visible.sum()), int((test & (table["liver"].to_numpy() > 0)).sum())
    assert visible[rows[:n_vis]].all()
    assert (table["liver"].to_numpy()[rows[:n_inj]] > 0).all()
    assert (table["liver"].to_numpy()[rows[n_inj:]] == 0).all()


def test_explain_writes_overlays_and_localisation(workspace):
    from toolkit.sliceset import SliceSet

    table = SliceSet.load(workspace.store_dir).table
    _write_truth(workspace, table)
    cfg = Config(eval=EvalConfig(explain_slices=6))
    result = explain_runs(workspace, cfg, ["real-only", "topk"], "liver")
    assert result["n_slices"] == 6 and result["has_truth"]
    out = workspace.reports_dir / "explain-real-only-liver"
    data = json.loads((out / "explain.json").read_text())
    labels = [s["label"] for s in data["slices"]]
    assert labels == sorted(labels, reverse=True) and labels[0] > 0  # injured first
    pngs = sorted(out.glob("slice_*.png"))
    assert len(pngs) == 6
    Image.open(pngs[0]).verify()
    s = data["summary"]
    assert 0.0 <= s["organ_mass_share"] <= 1.0 and s["organ_area_share"] == pytest.approx(0.5)
    # The summary is the mean of the per-slice figures it reports.
    organ = [x["organ"] for x in data["slices"]]
    assert all(o["area_share"] == pytest.approx(0.5) for o in organ)  # the liver mask is the left half
    assert s["organ_pointing_hit"] == pytest.approx(np.mean([o["hit"] for o in organ]))
    assert s["organ_mass_share"] == pytest.approx(np.mean([o["mass_share"] for o in organ]))
    assert s["injury_n"] == sum(
        1 for x in data["slices"] if x["label"] > 0 or x["injury"]["mass_share"] is not None
    )
    assert (out / "explain.md").exists() and (out / "config.yaml").exists()
    assert (workspace.reports_dir / "explain-liver-compare" / "grid.png").exists()
    assert set(result["summary"]) == {"real-only", "topk"}
    with pytest.raises(ToolkitError, match="already exists"):
        explain_runs(workspace, cfg, ["real-only"], "liver")


def test_truth_codes_come_from_each_file(workspace):
    from toolkit.sliceset import SliceSet

    table = SliceSet.load(workspace.store_dir).table
    _write_truth(workspace, table)
    rows = table.iloc[:3]
    truth = load_truth(workspace.data_dir, rows, "liver", SIZE)
    assert all(t is not None for t in truth)
    assert all(t["organ"][:, : SIZE // 2].all() and not t["organ"][:, SIZE // 2 :].any() for t in truth)
    spleen = load_truth(workspace.data_dir, rows, "spleen", SIZE)
    assert all(t["organ"].sum() == 2 * SIZE for t in spleen)  # the 4-px strip at half size: 2 columns
    # An organ the legend does not name has no truth (not another organ's mask).
    assert load_truth(workspace.data_dir, rows, "kidney", SIZE) == [None] * 3
    injured = table.index[table["liver"].to_numpy() > 0].to_numpy()
    assert injury_visible(workspace.data_dir, table, "liver", injured)[injured].all()

    shutil.rmtree(workspace.data_dir / "phantom_truth")
    _write_truth(workspace, table, legend=False)
    first = workspace.data_dir / "phantom_truth" / f"{int(rows['series_id'].iloc[0])}.npz"
    with pytest.raises(DataError, match=f"{first} has no 'code_names'/'codes' legend"):
        load_truth(workspace.data_dir, rows, "liver", SIZE)


def _dicom_series(folder: Path, n: int = 4) -> Path:
    """Copies of pydicom's CT_small.dcm at different z (ImagePositionPatient) and instance numbers."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    src = get_testdata_file("CT_small.dcm")
    for i in range(n):
        ds = pydicom.dcmread(src)
        ds.InstanceNumber = i + 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z - 5.0 * i]
        ds.save_as(folder / f"{i + 1}.dcm")
    return folder


def test_predict_study_matches_the_fold_ensemble(workspace, tmp_path):
    from toolkit.data.dicom import read_series
    from train.inference import load_fold_models, predict_probs

    study = _dicom_series(tmp_path / "study")
    result = predict_study(workspace, Config(), study, "real-only")
    liver = result["organs"]["liver"]
    assert result["n_slices"] == 4 and list(result["organs"]) == ["liver"]
    hu, _ = read_series(study, size=SIZE)
    probs = predict_probs(load_fold_models(workspace.run_dir("real-only"), "liver"), hu, [[40, 400]], SIZE)
    assert probs.shape == (2, 4)  # one row per fold model
    assert liver["prob"] == pytest.approx(float(probs.mean(axis=0).max()), abs=1e-6)
    assert liver["prob_folds"] == pytest.approx(probs.max(axis=1).tolist(), abs=1e-6)
    # Fixed on out-of-fold patients: the lowest score of an injured one.
    run = load_run(workspace, "real-only")
    oof = run.table("liver", "oof_patients")
    assert liver["full_sensitivity_threshold"] == pytest.approx(oof.loc[oof["label"] > 0, "prob"].min())
    assert run_settings(run, {"split_hash": "toy-split", "size": [SIZE, SIZE]})["size"] == SIZE
    assert run_settings(run, {"split_hash": "other", "size": [SIZE, SIZE]})["size"] == 64
    assert result["elapsed_s"] > 0

    # The topk run scores liver with its own per-organ rule: the mean of the 2 highest slices.
    assert load_run(workspace, "topk").organ_settings("liver").aggregate == "topk"
    topk = predict_study(workspace, Config(), study, "topk")["organs"]["liver"]
    probs = predict_probs(load_fold_models(workspace.run_dir("topk"), "liver"), hu, [[40, 400]], SIZE)
    assert topk["aggregate"] == "top2"
    assert topk["prob"] == pytest.approx(float(np.sort(probs.mean(axis=0))[-2:].mean()), abs=1e-6)


def test_predict_cli_json_and_errors(workspace, tmp_path):
    study = _dicom_series(tmp_path / "study", n=3)
    out = tmp_path / "pred.json"
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(study), "--workdir", str(workspace.root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["organs"]["liver"]["run"] == "real-only" and 0 <= saved["organs"]["liver"]["prob"] <= 1
    assert "CompressedSamples" not in res.output and "1CT1" not in out.read_text()  # no DICOM identifiers

    best = runner.invoke(app, ["predict", str(study), "-w", str(workspace.root), "--run", "best"])
    assert best.exit_code == 0, best.output

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    res = runner.invoke(app, ["predict", str(empty), "--workdir", str(workspace.root)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "no readable DICOM" in res.output

    res = runner.invoke(app, ["predict", str(study), "--workdir", str(workspace.root), "--run", "nope"])
    assert res.exit_code == 2 and "no run 'nope'" in res.output

    res = runner.invoke(app, ["predict", str(study), "--workdir", str(workspace.root), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    shutil.rmtree(study)


def test_explain_cli_without_truth(workspace):
    res = CliRunner().invoke(
        app, ["explain", "--workdir", str(workspace.root), "--organ", "liver", "--slices", "3"]
    )
    assert res.exit_code == 0, res.output
    assert "no ground-truth masks" in res.output
    assert len(list((workspace.reports_dir / "explain-real-only-liver").glob("slice_*.png"))) == 3
