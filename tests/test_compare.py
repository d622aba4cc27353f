"""``toolkit compare`` on run folders written by ``toolkit train``'s own writer, fed constructed scores."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from eval.compare import DESCRIPTIVE, IMPROVED, NO_EVIDENCE, WORSE, compare_runs, report_dir, verdict
from eval.multiplicity import holm
from toolkit import GRADED_ORGANS, ORGANS
from toolkit.artifacts.comparison import REPORT_JSON, Comparison, json_safe
from toolkit.artifacts.run import OrganSettings, RunFolder, RunInfo
from toolkit.cli import app
from toolkit.config import Config, EvalConfig, TrainConfig, load_config, save_config
from toolkit.errors import ToolkitError
from toolkit.workspace import Workspace
from train.run import organ_config, write_organ_outputs

N_PATIENTS = 60  # test patients
N_OOF = 30  # training patients (one slice each): the out-of-fold predictions
SLICES = 4
FOLDS = 3


def _labels(seed: int = 0) -> dict[str, np.ndarray]:
    """Patient grades per organ (~30% injured, fixed by seed so every run shares them)."""
    rng = np.random.default_rng(seed)
    out = {}
    for organ in ORGANS:
        injured = rng.random(N_PATIENTS) < 0.3
        high = rng.random(N_PATIENTS) < 0.4
        out[organ] = np.where(injured, np.where(high & (organ in GRADED_ORGANS), 2, 1), 0)
    return out


def _store_table() -> pd.DataFrame:
    """The manifest the scores refer to: test patients 1000.. (SLICES each), then training patients 200.."""
    grades = _labels()
    rows = []
    for p in range(N_PATIENTS):
        for s in range(SLICES):
            row = {"patient_id": 1000 + p, "series_id": 5000 + p, "instance": s + 1, "split": "test", "fold": -1}
            rows.append(row | {f"{o}_patient": int(grades[o][p]) for o in ORGANS})
    for i in range(N_OOF):
        row = {"patient_id": 200 + i, "series_id": 2000 + i, "instance": 1, "split": "train", "fold": i % FOLDS}
        rows.append(row | {f"{o}_patient": int(i % 3 == 0) for o in ORGANS})
    return pd.DataFrame(rows)


def _frame(table: pd.DataFrame, rows: np.ndarray, labels: np.ndarray, probs: np.ndarray, fold: int) -> pd.DataFrame:
    """A fold prediction frame as the training loop makes it."""
    picked = table.iloc[rows]
    return pd.DataFrame({"row": rows, "patient_id": picked["patient_id"].to_numpy(),
                         "series_id": picked["series_id"].to_numpy(), "instance": picked["instance"].to_numpy(),
                         "fold": fold, "label": labels, "prob": probs})


def write_scored_run(
    root: Path,
    name: str,
    ratio: float,
    separation: float,
    noise_seed: int,
    split_hash: str = "split-abc",
    seed: int = 0,
    epochs: int = 4,
    organs: tuple[str, ...] = ORGANS,
    audit: dict | None = None,
) -> Path:
    """A complete run folder written by train's writer, with fold scores ``separation * label + noise``.

    Instead of training, each fold's predictions are constructed; from there on the code is
    train's: ``FoldFolder.write_predictions``, ``write_organ_outputs``, ``RunInfo.from_config``,
    ``RunFolder.write_info``. The noise is a shared patient effect (same for every run) plus
    run-specific noise from ``noise_seed``, so runs are correlated like real models on one test set.
    """
    cfg = load_config("default", {
        "seed": seed,
        "data": {"windows": [[40, 400]]},
        "train": {"synthetic_ratio": ratio, "model": "mobilenetv2_100", "image_size": 64, "epoch_size": 512,
                  "epochs": epochs, "lr": 1.0e-3, "trainable_blocks": 3,
                  "organs": {"kidney": {"image_size": 128, "trainable_blocks": -1}}},
    })
    folder = RunFolder(root / "runs" / name)
    table = _store_table()
    test_rows = np.arange(N_PATIENTS * SLICES)
    grades = _labels()
    shared = np.random.default_rng(123)
    rng = np.random.default_rng(noise_seed)
    for organ in organs:
        y = (grades[organ] > 0).astype(int)
        patient_effect = shared.normal(0, 1, N_PATIENTS)
        slice_labels, fold_probs = [], []
        for p in range(N_PATIENTS):
            for s in range(SLICES):
                slice_label = int(y[p] and s % 2 == 0)  # injured patients: half their slices show it
                base = separation * slice_label + patient_effect[p] + shared.normal(0, 0.5)
                slice_labels.append(slice_label)
                fold_probs.append(1 / (1 + np.exp(-(base + rng.normal(0, 0.7, FOLDS)))))
        slice_labels, fold_probs = np.array(slice_labels), np.array(fold_probs)
        oof_rows = np.arange(N_OOF) + len(test_rows)
        oof_labels = (np.arange(N_OOF) % 3 == 0).astype(int)
        oof_probs = np.clip(0.3 + 0.4 * oof_labels + rng.normal(0, 0.2, N_OOF), 0, 1)
        for k in range(FOLDS):
            fold = folder.fold(organ, k)
            fold.path.mkdir(parents=True)
            fold.write_predictions("test", _frame(table, test_rows, slice_labels, fold_probs[:, k], k))
            in_fold = np.arange(N_OOF) % FOLDS == k
            fold.write_predictions("val", _frame(table, oof_rows[in_fold], oof_labels[in_fold], oof_probs[in_fold], k))
        otc = organ_config(cfg, organ).train
        write_organ_outputs(folder, organ, table, FOLDS, otc.aggregate, otc.top_k)
    generators = {} if ratio == 0 else {
        o: {"generator_id": f"gan-{o}-1", "synthetic_dir": f"synthetic/{o}", "audit": audit} for o in organs
    }
    info = RunInfo.from_config(name, cfg, split_hash=split_hash, folds=FOLDS, organs=list(organs),
                               organ_train={o: organ_config(cfg, o).train for o in organs}, generators=generators)
    info.complete = all(folder.has_table(o, "test_patients") for o in organs)
    save_config(cfg, folder.config_path)
    folder.write_info(info)
    return folder.path


AUDIT = {
    "summary": "Frechet distance 12.5; diversity 0.42",
    "frechet_distance": {"synthetic_vs_real": 12.5, "real_vs_real_reference": 0.8, "note": "lower is better"},
    "hu_histogram_distance": 0.031,
    "diversity": 0.42,
    "near_copies": 0,
    "per_class": {"healthy": {"frechet_distance": 3.0}},
    "ok": True,
}


def _cfg(n_boot: int = 300) -> Config:
    return Config(eval=EvalConfig(bootstrap=n_boot))


def test_verdict_needs_both_ci_and_p():
    assert verdict(0.01, 0.10, 0.01, 0.05) == IMPROVED
    assert verdict(-0.10, -0.01, 0.01, 0.05) == WORSE
    assert verdict(0.01, 0.10, 0.20, 0.05) == NO_EVIDENCE  # CI clear but p not
    assert verdict(-0.01, 0.10, 0.001, 0.05) == NO_EVIDENCE  # p small but CI spans 0
    assert verdict(float("nan"), 0.1, 0.01, 0.05) == NO_EVIDENCE


def test_compare_writes_reports_and_verdicts(tmp_path):
    write_scored_run(tmp_path, "real-only", 0.0, separation=0.3, noise_seed=1)
    write_scored_run(tmp_path, "synthetic-0.5", 0.5, separation=4.0, noise_seed=2, audit=AUDIT)
    write_scored_run(tmp_path, "same", 0.25, separation=0.3, noise_seed=1)  # identical scores to the baseline
    ws = Workspace(tmp_path)
    comparison = compare_runs(ws, _cfg())
    out = report_dir(ws)
    assert out == tmp_path / "reports" / "compare"
    for f in ("report.md", "report.html", "report.json", "config.yaml", "auc_delta.png", "roc_liver.png"):
        assert (out / f).exists(), f
    result = json.loads((out / "report.json").read_text())
    # report.json is the returned comparison (NaN written as null), and reads back to it.
    assert result == json_safe(comparison.to_dict())
    assert json_safe(Comparison.read_json(out / REPORT_JSON).to_dict()) == result
    assert comparison.organs["kidney"].settings.image_size == 128
    assert comparison.organs["liver"].patient.runs["synthetic-0.5"].vs_baseline.verdict == IMPROVED
    for organ in ORGANS:
        runs = result["organs"][organ]["patient"]["runs"]
        assert runs["synthetic-0.5"]["vs_baseline"]["verdict"] == IMPROVED
        assert runs["synthetic-0.5"]["vs_baseline"]["ci_low"] > 0
        same = runs["same"]["vs_baseline"]
        assert same["verdict"] == NO_EVIDENCE and same["delta"] == 0 and same["p"] == 1
        assert len(runs["real-only"]["fold_aucs"]) == FOLDS
        assert 0 <= runs["real-only"]["full_sensitivity"]["specificity"] <= 1
    ll = result["rsna_log_loss"]["real-only"]
    assert set(ll["groups"]) == {"bowel", "extravasation", "any_injury"}
    assert set(ll["left_out"]) == {"kidney", "liver", "spleen"}

    md = (out / "report.md").read_text()
    assert "improved" in md and "Methods" in md
    # Each organ's section says how its classifiers saw the slices (train.organs overrides kidney).
    kidney, liver = (md.split(f"## {o}\n")[1].split("## ")[0] for o in ("kidney", "liver"))
    assert "Classifiers: 128 px slices, every layer fine-tuned." in kidney
    assert "Classifiers: 64 px slices, the last 3 block(s) and the head fine-tuned." in liver
    audit = md.split("Generator audit")[1].split("## ")[0]
    assert "| figure | same | synthetic-0.5 |" in audit  # one column per synthetic run
    assert "| frechet_distance.synthetic_vs_real | n/a | 12.5 |" in audit
    assert "| near_copies | n/a | 0 |" in audit and "Frechet distance 12.5; diversity 0.42" in audit
    assert "per_class" not in audit and "| ok |" not in audit  # deep detail and bools stay in audit.json
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # readable offline
    uris = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(uris) == len(ORGANS) + 1
    for data in uris:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()

    with pytest.raises(ToolkitError, match="already exists"):
        compare_runs(ws, _cfg())
    again = compare_runs(ws, _cfg(), runs=["synthetic-0.5"], force=True)
    assert list(again.runs) == ["real-only", "synthetic-0.5"]
    assert list(Comparison.read_json(out / REPORT_JSON).runs) == ["real-only", "synthetic-0.5"]


def test_compare_worse_and_low_power(tmp_path):
    write_scored_run(tmp_path, "real-only", 0.0, separation=4.0, noise_seed=1, organs=("liver",))
    write_scored_run(tmp_path, "synthetic-1.0", 1.0, separation=-1.0, noise_seed=2, organs=("liver",))
    result = compare_runs(Workspace(tmp_path), _cfg())
    liver = result.organs["liver"]
    assert liver.patient.runs["synthetic-1.0"].vs_baseline.verdict == WORSE
    assert liver.low_power is False
    assert list(result.organs) == ["liver"]
    assert result.rsna_log_loss["real-only"].left_out["any_injury"].startswith("needs all five organs")


def _invoke(tmp_path: Path, *args: str):
    return CliRunner().invoke(app, ["compare", "--workdir", str(tmp_path), "--bootstrap", "100", *args])


def test_cli_refuses_different_split_hashes(tmp_path):
    write_scored_run(tmp_path, "real-only", 0.0, 0.3, 1, split_hash="aaa111", organs=("liver",))
    write_scored_run(tmp_path, "synthetic-0.5", 0.5, 2.0, 2, split_hash="bbb222", organs=("liver",))
    res = _invoke(tmp_path)
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "error: runs were trained on different patient splits (split_hash real-only=aaa111, "
        "synthetic-0.5=bbb222); retrain them on the same store"
    ]


def test_cli_missing_baseline_says_how_to_make_it(tmp_path):
    write_scored_run(tmp_path, "synthetic-0.5", 0.5, 2.0, 2, organs=("liver",))
    res = _invoke(tmp_path)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "toolkit train --synthetic-ratio 0" in res.output


def test_cli_settings_mismatch_refused_then_recorded(tmp_path):
    write_scored_run(tmp_path, "real-only", 0.0, 0.3, 1, organs=("liver",))
    write_scored_run(tmp_path, "synthetic-0.5", 0.5, 2.0, 2, epochs=9, organs=("liver",))
    res = _invoke(tmp_path)
    assert res.exit_code == 2 and "epochs: real-only=4, synthetic-0.5=9" in res.output
    res = _invoke(tmp_path, "--allow-mismatch")
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "reports" / "compare" / "report.json").read_text())
    assert result["organs"]["liver"]["patient"]["runs"]["synthetic-0.5"]["vs_baseline"]["verdict"] == IMPROVED
    # The terminal summary table shows that verdict and no other (cells may wrap, words do not).
    assert IMPROVED in res.output and "evidence" not in res.output and WORSE not in res.output
    assert result["settings_mismatch"] == {"epochs": {"real-only": 4, "synthetic-0.5": 9}}
    assert "WARNING: these runs differ" in (tmp_path / "reports" / "compare" / "report.md").read_text()


def test_compare_refuses_different_test_patients(tmp_path):
    write_scored_run(tmp_path, "real-only", 0.0, 0.3, 1, organs=("liver",))
    run = write_scored_run(tmp_path, "synthetic-0.5", 0.5, 2.0, 2, organs=("liver",))
    tp = pd.read_csv(run / "liver" / "test_patients.csv")
    tp.iloc[1:].to_csv(run / "liver" / "test_patients.csv", index=False)
    with pytest.raises(ToolkitError, match="tested on different patients for liver"):
        compare_runs(Workspace(tmp_path), _cfg())


@pytest.mark.parametrize(
    ("blocks", "text"),
    [
        (-1, "Classifiers: 96 px slices, every layer fine-tuned."),
        (0, "Classifiers: 96 px slices, only the head fine-tuned."),
        (2, "Classifiers: 96 px slices, the last 2 block(s) and the head fine-tuned."),
    ],
)
def test_report_says_which_layers_were_fine_tuned(blocks: int, text: str) -> None:
    from eval.report import _classifier_text

    settings = OrganSettings.from_train(TrainConfig(image_size=96, trainable_blocks=blocks))
    assert _classifier_text(settings) == text


def test_compare_verdicts_are_holm_corrected_across_organs_and_runs(tmp_path):
    write_scored_run(tmp_path, "real-only", 0.0, separation=0.3, noise_seed=1)
    write_scored_run(tmp_path, "synthetic-0.5", 0.5, separation=1.2, noise_seed=2)
    write_scored_run(tmp_path, "synthetic-1.0", 1.0, separation=0.6, noise_seed=3)
    result = compare_runs(Workspace(tmp_path), _cfg())
    family = [(o, n) for o in ORGANS for n in ("synthetic-0.5", "synthetic-1.0")]
    deltas = [result.organs[o].patient.runs[n].vs_baseline for o, n in family]
    expected = holm([d.p for d in deltas], 0.05)
    assert [d.p_adjusted for d in deltas] == pytest.approx(expected.adjusted.tolist())
    assert [d.ci_level for d in deltas] == pytest.approx(expected.levels.tolist())
    assert sum(d.verdict == IMPROVED for d in deltas) == 5  # synthetic-0.5 on every organ
    # liver, synthetic-1.0: p = 0.015 alone, 0.07 after Holm over ten comparisons: no verdict.
    liver = result.organs["liver"].patient.runs["synthetic-1.0"].vs_baseline
    assert liver.p < 0.05 <= liver.p_adjusted and liver.verdict == NO_EVIDENCE
    for d in deltas:
        called = d.verdict in (IMPROVED, WORSE)
        assert called == (d.p_adjusted < 0.05 and (d.ci_low > 0 or d.ci_high < 0)), d
    slice_level = [result.organs[o].slice.runs[n].vs_baseline for o, n in family]
    assert {d.verdict for d in slice_level} == {DESCRIPTIVE}  # slice-level figures carry no verdict
    assert result.eval.multiplicity == "Holm"
    md = (report_dir(Workspace(tmp_path)) / "report.md").read_text()
    assert "Holm's step-down procedure across all 10 comparisons" in md


def test_two_crops_of_one_slice_are_told_apart_by_their_row() -> None:
    """A kidney slice has a left and a right crop: test_slices rows align on ``row``, never cross-joined by slice."""
    import pandas as pd

    from toolkit.artifacts.run import test_slice_keys
    from toolkit.errors import DataError

    slices = pd.DataFrame({"patient_id": [1, 1, 2], "series_id": [7, 7, 8], "instance": [3, 3, 3],
                           "label": [1, 0, 0], "prob": [0.9, 0.2, 0.1], "row": [10, 11, 12]})
    keys = test_slice_keys(slices, slices.sample(frac=1.0, random_state=0))
    assert keys[0] == "row"
    merged = slices[[*keys, "label"]].merge(slices, on=keys, how="left", suffixes=("", "_run"))
    assert len(merged) == len(slices) and (merged["label"] == merged["label_run"]).all()
    with pytest.raises(DataError, match=r"two rows of one slice .* re-run `toolkit train --force`"):
        test_slice_keys(slices.drop(columns="row"))
    assert test_slice_keys(slices.iloc[1:].drop(columns="row")) == ["patient_id", "series_id", "instance"]
