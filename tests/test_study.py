"""`toolkit study`: nested real-data fractions, generators and classifiers that see only their fraction,
shards that cover every job once, and --collect equal to an unsharded study."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import make_toy_slice_set
from PIL import Image
from typer.testing import CliRunner

from gen.data import load_training_data, train_patients_hash
from study.plan import Arm, nested_subsets, parse_shard, plan_jobs, primary_arms, shard_jobs
from study.report import collect_and_report
from study.run import open_study, run_gen_job, run_study
from toolkit.artifacts.run import RunFolder
from toolkit.artifacts.synthetic import SyntheticSet
from toolkit.cli import app
from toolkit.config import Config, load_config
from toolkit.errors import ConfigError, ToolkitError
from toolkit.sliceset import SliceSet
from toolkit.workspace import Workspace
from train.balancer import REAL
from train.engine import TrainHooks
from train.run import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ORGAN = "liver"


def study_config(**study: object) -> Config:
    """A study small enough for a test: one organ, 2 folds, 1 epoch of 32 samples, a 4-step GAN.

    The toy store has no organ crops, so the classifiers and the generator read whole slices.
    """
    design = {"name": "toy", "organs": [ORGAN], "ratios": [0, 0.5], "fractions": [0.5, 1.0], "backends": ["gan"],
              "repeats": 2, "primary": {"ratios": [0.5], "fraction": 1.0}}
    design.update(study)
    return load_config("default", {
        "data": {"windows": [[40, 400]]},
        "train": {"model": "mobilenetv2_050", "pretrained": False, "image_size": 32, "folds": 2, "epochs": 1,
                  "epoch_size": 32, "batch_size": 16, "trainable_blocks": -1, "num_workers": 0,
                  "synthetic_resize": True, "input": "slices"},
        "gen": {"model": "gan", "input": "slices", "image_size": 16, "train_steps": 4, "batch_size": 8,
                "checkpoint_every": 2, "n": 24, "audit_feature_epochs": 1, "gan": {"ngf": 8, "ndf": 8, "z_dim": 8}},
        "eval": {"bootstrap": 200},
        "study": design,
    })


def toy_workspace(root) -> Workspace:
    """24 training patients in 3 store folds (merged into 2 by train.folds), 8 test patients."""
    ws = Workspace(root)
    make_toy_slice_set(n_patients=32, slices_per_patient=6, size=40, folds=3, test_fraction=0.25).save(ws.store_dir)
    return ws


# ------------------------------------------------------------------ plan
def test_fractions_are_nested_stratified_subsets_of_the_training_patients():
    rng = np.random.default_rng(0)
    n = 150
    patients = pd.DataFrame({"patient_id": np.arange(n) + 100, "fold": rng.integers(0, 5, n),
                             "liver": (rng.random(n) < 0.3).astype(int), "spleen": (rng.random(n) < 0.15).astype(int)})
    fractions = [0.1, 0.25, 0.5, 1.0]
    subsets = nested_subsets(patients, fractions, ["liver", "spleen"], seed=3)
    kept = {f: set(subsets.loc[subsets[f"f{f:g}"] == 1, "patient_id"]) for f in fractions}
    assert kept[1.0] == set(patients["patient_id"])
    for small, large in zip(fractions, fractions[1:], strict=False):
        assert kept[small] < kept[large]  # each smaller subset inside the larger
    for f in fractions:
        assert len(kept[f]) == round(f * n)
        # Every stratum (fold x injury pattern) keeps its share, within one patient.
        share = subsets.groupby("stratum")[f"f{f:g}"].agg(["sum", "size"])
        assert ((share["sum"] - f * share["size"]).abs() < 1).all(), f
    # Same inputs and seed, same subsets; another seed, other ones.
    assert nested_subsets(patients, fractions, ["liver", "spleen"], seed=3).equals(subsets)
    assert not nested_subsets(patients, fractions, ["liver", "spleen"], seed=4).equals(subsets)


def test_shards_cover_every_job_exactly_once():
    cfg = load_config("default", {"study": {"organs": ["kidney", "liver", "spleen"], "ratios": [0, 0.25, 0.5],
                                            "fractions": [0.25, 0.5, 1.0], "backends": ["gan", "diffusion"],
                                            "repeats": 3}})
    jobs = plan_jobs(cfg, n_folds=5)
    generators = 3 * 3 * 2  # organs x fractions x backends (one mode)
    arms = 3 * (1 + 2 * 2)  # per fraction: the control + 2 ratios x 2 backends
    assert sum(j.kind == "gen" for j in jobs) == generators
    assert sum(j.kind == "train" for j in jobs) == 3 * arms * 3 * 5  # organs x arms x seeds x folds
    ids = [j.id for j in jobs]
    assert len(set(ids)) == len(ids)
    for n in (1, 2, 7, len(jobs) + 3):
        shares = [shard_jobs(jobs, k, n) for k in range(1, n + 1)]
        flat = [j.id for share in shares for j in share]
        assert sorted(flat) == sorted(ids)  # every job once, none twice
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert parse_shard("3/8") == (3, 8)
    for bad in ("0/4", "5/4", "2", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    # The primary family: each organ x the declared arms, each against the control at its fraction.
    # (study.primary.backends left empty: every backend of the study)
    assert [a.name for a in primary_arms(cfg.study)] == ["f1-image-gan-r0.5", "f1-image-diffusion-r0.5"]
    assert Arm(0.5, 0.25, "image", "gan").control() == Arm(0.5, 0.0)


def test_a_bad_design_or_shard_is_a_one_line_error(tmp_path):
    ws = toy_workspace(tmp_path / "ws")
    runner = CliRunner()
    cases = [
        (["--set", "study.ratios=[0.25,0.5]"], "study.ratios must include 0"),
        (["--set", "study.primary.fraction=0.3"], "study.primary.fraction 0.3 is not one of study.fractions"),
        (["--set", "study.primary.ratios=[0.75]"], "study.primary.ratios lists 0.75"),
        (["--shard", "5/4"], "--shard 5/4"),
        (["--collect", "--shard", "1/2"], "--collect only merges"),
        (["--set", "study.fractions=[0.1,1.0]"], "study.fractions 0.1 keeps 2 training patients"),
    ]
    config = tmp_path / "study.yaml"
    config.write_text(json.dumps(study_config().to_dict()))
    for args, message in cases:
        res = runner.invoke(app, ["study", "--workdir", str(ws.root), "--config", str(config), *args])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert message in res.output, res.output


def test_a_studys_design_is_fixed_once_saved(tmp_path):
    ws = toy_workspace(tmp_path / "ws")
    study = open_study(ws, study_config())
    saved = study.folder.config_path.read_text()
    assert "primary" in saved and study.folder.subsets_path.exists() and study.folder.jobs_path.exists()
    open_study(ws, study_config())  # the same design reopens
    with pytest.raises(ConfigError, match=r"study.yaml fixed this study's design .* study.primary.ratios differs"):
        open_study(ws, study_config(ratios=[0, 0.25, 0.5], primary={"ratios": [0.25], "fraction": 1.0}))
    with pytest.raises(ConfigError, match="train.epochs differs"):
        cfg = study_config()
        open_study(ws, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3)))
    open_study(ws, study_config(repeats=3), force=True)  # --force starts over
    with pytest.raises(ConfigError, match="--force deletes the whole study"):
        run_study(ws, study_config(repeats=3), shard=(1, 2), force=True)


# ------------------------------------------------------------------ only the fraction's patients
def test_a_generator_at_a_fraction_never_sees_a_patient_outside_it(tmp_path):
    ws = toy_workspace(tmp_path / "ws")
    study = open_study(ws, study_config())
    half = study.patients(0.5)
    store = SliceSet.load(ws.store_dir)
    train_split = set(store.table.loc[store.table["split"] == "train", "patient_id"])
    assert half < train_split and len(half) == 12

    data = load_training_data(store, ORGAN, study.cfg, patients=half)
    assert set(data.patient_ids) == half

    (job,) = [j for j in study.jobs if j.kind == "gen" and j.arm.fraction == 0.5]
    assert run_gen_job(ws, study, job) == "done"
    out = study.folder.workspace(ws, job.arm).synthetic_dir(ORGAN)
    assert set(pd.read_csv(out / "train_patients.csv")["patient_id"]) == half
    synthetic = SyntheticSet.load(out)
    assert synthetic.train_patients_hash == train_patients_hash(np.array(sorted(half)))
    assert run_gen_job(ws, study, job) == "kept"  # finished jobs are kept


class Seen(TrainHooks):
    def __init__(self) -> None:
        self.trained: list[tuple[int, np.ndarray]] = []
        self.evaluated: list[tuple[int, str, np.ndarray]] = []

    def on_train_epoch(self, organ, fold, epoch, dataset):
        plan = dataset.plan
        self.trained.append((fold, plan.index[plan.source == REAL]))

    def on_evaluate(self, organ, fold, split, index, source):
        self.evaluated.append((fold, split, index))


def test_a_run_restricted_to_patients_trains_and_validates_on_them_and_tests_on_everyone(tmp_path):
    ws = toy_workspace(tmp_path / "ws")
    table = SliceSet.load(ws.store_dir).table
    cfg = study_config()
    subset = open_study(ws, cfg).patients(0.5)
    test_rows = np.flatnonzero(table["split"].to_numpy() == "test")
    seen = Seen()
    run = train_run(ws, cfg, name="half", organs=[ORGAN], hooks=seen, train_patients=subset, only_folds=[1])
    assert {f for f, _ in seen.trained} == {1}  # only the fold asked for
    for fold, rows in seen.trained:
        assert set(table.loc[rows, "patient_id"]) <= subset
        assert (table.loc[rows, "fold"] % 2 != fold).all()
    for fold, split, rows in seen.evaluated:
        if split == "val":
            assert set(table.loc[rows, "patient_id"]) <= subset and (table.loc[rows, "fold"] % 2 == fold).all()
        else:
            assert np.array_equal(np.sort(rows), test_rows)  # the whole test set, unchanged
    folder = RunFolder(run)
    assert not folder.has_table(ORGAN, "test_patients") and folder.state() == "partial"  # fold 0 not trained yet
    train_run(ws, cfg, name="half", organs=[ORGAN], resume=True, train_patients=subset, only_folds=[0])
    assert folder.state() == "complete"
    assert set(folder.read_table(ORGAN, "oof_patients")["patient_id"]) == subset
    with pytest.raises(ToolkitError, match=r"only_folds \[2\] must lie in 0..1"):
        train_run(ws, cfg, name="half", organs=[ORGAN], resume=True, only_folds=[2])


# ------------------------------------------------------------------ shards, collect, report
def _study_json(ws: Workspace) -> dict:
    return json.loads((ws.root / "studies" / "toy" / "report" / "study.json").read_text())


@pytest.mark.slow
def test_sharded_study_collects_to_the_unsharded_result(tmp_path):
    cfg = study_config()
    whole = toy_workspace(tmp_path / "whole")
    study, report = run_study(whole, cfg)
    assert len(report.done) == len(study.jobs) == 2 + 16 and not report.waiting
    result, html = collect_and_report(whole, cfg)

    sharded = toy_workspace(tmp_path / "sharded")
    for stage in ("gen", "train"):  # as a cluster would: every shard's generators, then the training
        for k in (1, 2, 3):
            _, part = run_study(sharded, cfg, shard=(k, 3), stage=stage)
            assert not part.waiting
    collect_and_report(sharded, cfg)
    assert _study_json(sharded) == _study_json(whole)

    # Every arm at a fraction trained and validated on that fraction's patients, and was tested on everyone.
    table = SliceSet.load(whole.store_dir).table
    test_patients = set(table.loc[table["split"] == "test", "patient_id"])
    for organ_arm in result.organs[ORGAN].arms:
        for name in organ_arm.runs:
            folder = RunFolder(study.folder.runs_dir / name)
            assert set(folder.read_table(ORGAN, "oof_patients")["patient_id"]) == study.patients(organ_arm.fraction)
            assert set(folder.read_table(ORGAN, "test_patients")["patient_id"]) == test_patients
    assert {a.arm for a in result.organs[ORGAN].arms} == {"f0.5-r0", "f0.5-image-gan-r0.5", "f1-r0",
                                                          "f1-image-gan-r0.5"}
    arms = {a.arm: a for a in result.organs[ORGAN].arms}
    # Every synthetic arm carries its descriptive p; controls carry none. An image-mode set has no realism test.
    assert all((a.p is None) == (a.vs_control is None) for a in arms.values())
    assert 0.0 <= arms["f0.5-image-gan-r0.5"].p <= 1.0 and arms["f0.5-image-gan-r0.5"].realism_auc is None
    (primary,) = result.primary
    assert primary.p == arms["f1-image-gan-r0.5"].p
    assert (primary.organ, primary.arm, primary.control) == (ORGAN, "f1-image-gan-r0.5", "f1-r0")
    assert primary.delta.level == 0.95 and len(primary.delta.per_seed) == 2
    assert primary.verdict in ("improved", "worse", "no evidence of change")

    page = html.read_text()
    assert "Holm" in page and "descriptive" in page
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 2  # AUC vs ratio, AUC vs fraction
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert "only 4 injured test patient(s) of liver" in page  # 8 test patients: the low-power note, with the count

    again = run_study(whole, cfg)[1]  # a finished study resumes to nothing
    assert not again.done and len(again.kept) == len(study.jobs)
