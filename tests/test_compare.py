"""``toolkit compare`` on run folders laid out exactly as ``toolkit train`` writes them."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from eval.compare import IMPROVED, NO_EVIDENCE, WORSE, compare_runs, verdict
from toolkit import GRADED_ORGANS, ORGANS
from toolkit.cli import app
from toolkit.config import Config, EvalConfig
from toolkit.errors import ToolkitError
from toolkit.workspace import Workspace

N_PATIENTS = 60
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


def write_fake_run(
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
    """A complete run folder per the train contract, with scores ``separation * label + noise``.

    The noise is a shared patient effect (same for every run) plus run-specific noise from
    ``noise_seed``, so runs are correlated like real models on one test set.
    """
    run = root / "runs" / name
    run.mkdir(parents=True)
    grades = _labels()
    shared = np.random.default_rng(123)
    rng = np.random.default_rng(noise_seed)
    gens = {}
    for organ in organs:
        d = run / organ
        d.mkdir()
        g = grades[organ]
        y = (g > 0).astype(int)
        patient_effect = shared.normal(0, 1, N_PATIENTS)
        slice_rows, fold_rows = [], []
        for p in range(N_PATIENTS):
            for s in range(SLICES):
                slice_label = int(y[p] and s % 2 == 0)  # injured patients: half their slices show it
                base = separation * slice_label + patient_effect[p] + shared.normal(0, 0.5)
                fold_logits = base + rng.normal(0, 0.7, FOLDS)
                fold_probs = 1 / (1 + np.exp(-fold_logits))
                key = {"patient_id": 1000 + p, "series_id": 5000 + p, "instance": s + 1, "label": slice_label}
                slice_rows.append({**key, "prob": float(fold_probs.mean())})
                for k in range(FOLDS):
                    fold_rows.append({**key, "fold": k, "prob": float(fold_probs[k])})
        slices = pd.DataFrame(slice_rows)
        folds = pd.DataFrame(fold_rows)
        slices.to_csv(d / "test_slices.csv", index=False)
        folds[["patient_id", "series_id", "instance", "label", "fold", "prob"]].to_csv(
            d / "test_folds.csv", index=False
        )
        pat = slices.groupby("patient_id")["prob"].max().reset_index()
        pat["label"] = y
        pat["grade"] = g
        for k in range(FOLDS):
            pat[f"prob_fold_{k}"] = folds[folds.fold == k].groupby("patient_id")["prob"].max().to_numpy()
        pat[["patient_id", "label", "grade", "prob"] + [f"prob_fold_{k}" for k in range(FOLDS)]].to_csv(
            d / "test_patients.csv", index=False
        )
        oof = pd.DataFrame(
            {
                "patient_id": np.arange(200, 230),
                "fold": np.arange(30) % FOLDS,
                "label": np.arange(30) % 3 == 0,
            }
        )
        oof["grade"] = oof["label"].astype(int)
        oof["prob"] = np.clip(0.3 + 0.4 * oof["label"] + rng.normal(0, 0.2, 30), 0, 1)
        oof.to_csv(d / "oof_patients.csv", index=False)
        gens[organ] = (
            None
            if ratio == 0
            else {"generator_id": f"gan-{organ}-1", "synthetic_dir": f"synthetic/{organ}", "audit": audit}
        )
    meta = {
        "name": name,
        "split_hash": split_hash,
        "synthetic_ratio": ratio,
        "seed": seed,
        "folds": FOLDS,
        "organs": list(organs),
        "model": "mobilenetv2_100",
        "image_size": 64,
        "windows": [[40, 400]],
        "epoch_size": 512,
        "epochs": epochs,
        "generators": {o: v for o, v in gens.items() if v},
        "complete": True,
    }
    (run / "run.json").write_text(json.dumps(meta))
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "seed": seed,
                "train": {
                    "synthetic_ratio": ratio,
                    "lr": 1e-3,
                    "trainable_blocks": 3,
                    "organs": {"kidney": {"image_size": 128, "trainable_blocks": -1}},
                },
            }
        )
    )
    return run


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
    write_fake_run(tmp_path, "real-only", 0.0, separation=0.3, noise_seed=1)
    write_fake_run(tmp_path, "synthetic-0.5", 0.5, separation=4.0, noise_seed=2, audit=AUDIT)
    write_fake_run(tmp_path, "same", 0.25, separation=0.3, noise_seed=1)  # identical scores to the baseline
    ws = Workspace(tmp_path)
    out = compare_runs(ws, _cfg())
    assert out == tmp_path / "reports" / "compare"
    for f in ("report.md", "report.html", "report.json", "config.yaml", "auc_delta.png", "roc_liver.png"):
        assert (out / f).exists(), f
    result = json.loads((out / "report.json").read_text())
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
    assert compare_runs(ws, _cfg(), runs=["synthetic-0.5"], force=True) == out


def test_compare_worse_and_low_power(tmp_path):
    write_fake_run(tmp_path, "real-only", 0.0, separation=4.0, noise_seed=1, organs=("liver",))
    write_fake_run(tmp_path, "synthetic-1.0", 1.0, separation=-1.0, noise_seed=2, organs=("liver",))
    result = json.loads((compare_runs(Workspace(tmp_path), _cfg()) / "report.json").read_text())
    liver = result["organs"]["liver"]
    assert liver["patient"]["runs"]["synthetic-1.0"]["vs_baseline"]["verdict"] == WORSE
    assert liver["low_power"] is False
    assert list(result["organs"]) == ["liver"]
    assert result["rsna_log_loss"]["real-only"]["left_out"]["any_injury"].startswith("needs all five organs")


def _invoke(tmp_path: Path, *args: str):
    return CliRunner().invoke(app, ["compare", "--workdir", str(tmp_path), "--bootstrap", "100", *args])


def test_cli_refuses_different_split_hashes(tmp_path):
    write_fake_run(tmp_path, "real-only", 0.0, 0.3, 1, split_hash="aaa111", organs=("liver",))
    write_fake_run(tmp_path, "synthetic-0.5", 0.5, 2.0, 2, split_hash="bbb222", organs=("liver",))
    res = _invoke(tmp_path)
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "error: runs were trained on different patient splits (split_hash real-only=aaa111, "
        "synthetic-0.5=bbb222); retrain them on the same store"
    ]


def test_cli_missing_baseline_says_how_to_make_it(tmp_path):
    write_fake_run(tmp_path, "synthetic-0.5", 0.5, 2.0, 2, organs=("liver",))
    res = _invoke(tmp_path)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "toolkit train --synthetic-ratio 0" in res.output


def test_cli_settings_mismatch_refused_then_recorded(tmp_path):
    write_fake_run(tmp_path, "real-only", 0.0, 0.3, 1, organs=("liver",))
    write_fake_run(tmp_path, "synthetic-0.5", 0.5, 2.0, 2, epochs=9, organs=("liver",))
    res = _invoke(tmp_path)
    assert res.exit_code == 2 and "epochs: real-only=4, synthetic-0.5=9" in res.output
    res = _invoke(tmp_path, "--allow-mismatch")
    assert res.exit_code == 0, res.output
    assert "improved" in res.output or "no evidence" in res.output  # the terminal summary table
    result = json.loads((tmp_path / "reports" / "compare" / "report.json").read_text())
    assert result["settings_mismatch"] == {"epochs": {"real-only": 4, "synthetic-0.5": 9}}
    assert "WARNING: these runs differ" in (tmp_path / "reports" / "compare" / "report.md").read_text()


def test_compare_refuses_different_test_patients(tmp_path):
    write_fake_run(tmp_path, "real-only", 0.0, 0.3, 1, organs=("liver",))
    run = write_fake_run(tmp_path, "synthetic-0.5", 0.5, 2.0, 2, organs=("liver",))
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

    assert _classifier_text({"image_size": 96, "trainable_blocks": blocks}) == text
