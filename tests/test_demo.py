"""End to end: `toolkit demo` on a tiny phantom, through the real CLI, in one workspace."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from toolkit import ORGANS
from toolkit.artifacts.run import RunFolder
from toolkit.cli import app
from toolkit.data.phantom import identifying_values

TINY = [
    "phantom.patients=20",
    "phantom.slices=8",
    "phantom.size=64",
    "phantom.prevalence={bowel: 0.5, extravasation: 0.5, kidney: 0.5, liver: 0.5, spleen: 0.5}",
    "data.size=32",
    "data.slices_per_series=8",
    "data.folds=2",
    "data.test_fraction=0.3",
    "data.workers=1",
    "gen.image_size=32",
    "gen.train_steps=4",
    "gen.batch_size=8",
    "gen.checkpoint_every=2",
    "gen.n=16",
    "gen.gan.z_dim=16",
    "gen.gan.ngf=8",
    "gen.gan.ndf=8",
    "gen.audit_feature_epochs=1",
    # A localizer that finds the organs (as tests/test_segment.py's): crops of every organ in every fold.
    "segment.image_size=32",
    "segment.channels=[16, 32, 64]",
    "segment.epochs=20",
    "segment.batch_size=8",
    "segment.lr=0.01",
    "segment.augment=false",
    "crop.size=32",
    "train.model=mobilenetv2_050",
    "train.pretrained=false",
    "train.image_size=32",
    # demo.yaml trains kidney and bowel at 128 px (train.organs); this test wants every organ at 32 px.
    "train.organs={}",
    "train.epochs=1",
    "train.epoch_size=32",
    "train.batch_size=16",
    "eval.bootstrap=50",
]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_every_organ(tmp_path):
    args = ["demo", "--workdir", str(tmp_path)] + [a for item in TINY for a in ("--set", item)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report_dir = tmp_path / "reports" / "demo"
    report = json.loads((report_dir / "report.json").read_text())
    text = (report_dir / "report.md").read_text()
    for organ in ORGANS:
        assert organ in text
    assert "real-only" in text and "synthetic-0.5" in text
    assert (report_dir / "report.html").stat().st_size > 10_000  # plots embedded
    # Every organ is scored on exactly the store's test patients, for both runs.
    split = pd.read_csv(tmp_path / "store" / "split.csv")
    n_test = int((split["split"] == "test").sum())
    for organ in ORGANS:
        patient = report["organs"][organ]["patient"]
        assert patient["n_patients"] == n_test, organ
        assert set(patient["runs"]) == {"real-only", "synthetic-0.5"}, organ
        assert 0.0 <= patient["runs"]["real-only"]["auc"]["estimate"] <= 1.0, organ

    # The two runs differ only in the synthetic ratio: same split, folds, seed and steps.
    runs = {n: RunFolder(tmp_path / "runs" / n).read_info() for n in ("real-only", "synthetic-0.5")}
    assert runs["real-only"].split_hash == runs["synthetic-0.5"].split_hash
    for key in ("seed", "folds", "epochs", "epoch_size", "model", "image_size", "settings"):
        assert getattr(runs["real-only"], key) == getattr(runs["synthetic-0.5"], key), key
    # Every organ's classifiers saw the 32 px asked for: no per-organ size left over from demo.yaml.
    for name in runs:
        assert yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())["train"]["organs"] == {}
        folds = sorted((tmp_path / "runs" / name).glob("*/fold_*/config.json"))
        assert {p.parts[-3] for p in folds} == set(ORGANS)
        assert {json.loads(p.read_text())["image_size"] for p in folds} == {32}, name
        # Kidney, liver and spleen read their organ crops (segment -> crop ran), bowel and extravasation slices.
        inputs = {o: runs[name].input(o)["input"] for o in ORGANS}
        assert inputs == {o: "crops" if o in ("kidney", "liver", "spleen") else "slices" for o in ORGANS}, name
    for organ in ("kidney", "liver", "spleen"):
        assert (tmp_path / "store" / "crops" / organ / "masks.npy").exists()

    # Re-running keeps finished work: nothing is retrained, the report is rebuilt.
    before = (tmp_path / "runs" / "real-only" / "liver" / "test_patients.csv").read_bytes()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "already complete; kept" in again.output
    assert (tmp_path / "runs" / "real-only" / "liver" / "test_patients.csv").read_bytes() == before

    # No identifying DICOM value of the phantom reaches any file the pipeline wrote.
    secrets = {v for v in identifying_values(tmp_path / "data") if len(v) >= 6}
    assert secrets
    for path in tmp_path.rglob("*"):
        if path.is_file() and "data" not in path.relative_to(tmp_path).parts[:1]:
            blob = path.read_bytes()
            leaked = [s for s in secrets if s.encode() in blob]
            assert not leaked, f"{path} contains identifying values {leaked}"
