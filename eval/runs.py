"""Reading the run folders written by ``toolkit train`` (the only files ``eval/`` reads of a run).

::

    runs/<name>/config.yaml              resolved config
    runs/<name>/run.json                 name, split_hash, synthetic_ratio, seed, folds, organs, model,
                                         image_size, windows, epoch_size, epochs, generators, complete
    runs/<name>/<organ>/fold_<k>/        model.safetensors + config.json, metrics.csv
    runs/<name>/<organ>/oof.csv          patient_id, series_id, instance, fold, label, prob
    runs/<name>/<organ>/oof_patients.csv patient_id, fold, label, grade, prob
    runs/<name>/<organ>/test_folds.csv   patient_id, series_id, instance, label, fold, prob
    runs/<name>/<organ>/test_slices.csv  patient_id, series_id, instance, label, prob (fold ensemble)
    runs/<name>/<organ>/test_patients.csv patient_id, label, grade, prob, prob_fold_0..K-1
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from toolkit.config import organ_train_settings
from toolkit.errors import ToolkitError
from toolkit.workspace import Workspace

RUN_FILE = "run.json"

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "test_patients": ("patient_id", "label", "grade", "prob"),
    "test_slices": ("patient_id", "series_id", "instance", "label", "prob"),
    "test_folds": ("patient_id", "series_id", "instance", "label", "fold", "prob"),
    "oof_patients": ("patient_id", "fold", "label", "grade", "prob"),
    "oof": ("patient_id", "series_id", "instance", "fold", "label", "prob"),
}

# Settings that must match between compared runs; the compared thing (synthetic
# ratio, generator) may differ, nothing else should.
MATCH_KEYS: tuple[str, ...] = ("seed", "folds", "model", "image_size", "windows", "epoch_size", "epochs")
# Config keys of the train section that also change results; synthetic_ratio is the compared thing.
TRAIN_MATCH_KEYS: tuple[str, ...] = (
    "pretrained",
    "weights",
    "batch_size",
    "lr",
    "weight_decay",
    "trainable_blocks",
    "patience",
    "augment",
    "aggregate",
    "top_k",
    "mixed_precision",
    "organs",
)


@dataclass
class Run:
    """One finished (or partial) classifier run."""

    name: str
    path: Path
    meta: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def organs(self) -> list[str]:
        return list(self.meta.get("organs", []))

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", False))

    @property
    def synthetic_ratio(self) -> float:
        return float(self.meta.get("synthetic_ratio", 0.0) or 0.0)

    def organ_dir(self, organ: str) -> Path:
        return self.path / organ

    def has_organ(self, organ: str) -> bool:
        return organ in self.organs and (self.organ_dir(organ) / "test_patients.csv").exists()

    def table(self, organ: str, name: str, required: bool = True) -> pd.DataFrame | None:
        """Read ``<organ>/<name>.csv`` and check its columns."""
        path = self.organ_dir(organ) / f"{name}.csv"
        if not path.exists():
            if required:
                raise ToolkitError(f"run '{self.name}' has no {path}; re-run `toolkit train --resume`")
            return None
        df = pd.read_csv(path)
        missing = [c for c in TABLE_COLUMNS.get(name, ()) if c not in df.columns]
        if missing:
            raise ToolkitError(f"{path} lacks column(s) {', '.join(missing)}; re-create it with `toolkit train`")
        return df

    def organ_setting(self, organ: str | None, key: str) -> Any:
        """A train setting as ``organ`` was trained with it: its ``train.organs`` override, else the run's.

        :func:`toolkit.config.organ_train_settings` (the rule training used) on the saved config, with
        run.json's record of run-level values; ``organ=None`` gives the run's.
        """
        train = dict(self.config.get("train") or {})
        if key in self.meta:
            train[key] = self.meta[key]
        return organ_train_settings(train, organ).get(key)

    def image_size(self, organ: str) -> int:
        """Pixels per side ``organ``'s fold models take."""
        return int(self.organ_setting(organ, "image_size"))

    def setting(self, key: str) -> Any:
        """A setting from run.json, else from the train section of config.yaml."""
        if key in self.meta:
            return self.meta[key]
        return (self.config.get("train") or {}).get(key)

    def generator_audit(self, organ: str) -> dict[str, float]:
        """Numeric figures of the generator audit used for ``organ`` (empty if none).

        Audits differ between generators, so every numeric value up to two levels deep is kept
        under a dotted key (``frechet_distance.synthetic_vs_real``, ``diversity``); deeper
        detail (per-class breakdowns) stays in audit.json.
        """
        gen = (self.meta.get("generators") or {}).get(organ) or {}
        return flatten_numeric(gen.get("audit") or {}, depth=2)

    def generator_summary(self, organ: str) -> str | None:
        """The audit's one-line ``summary`` text, when it has one."""
        gen = (self.meta.get("generators") or {}).get(organ) or {}
        summary = (gen.get("audit") or {}).get("summary")
        return summary if isinstance(summary, str) else None

    def generator_id(self, organ: str) -> str | None:
        gen = (self.meta.get("generators") or {}).get(organ) or {}
        return gen.get("generator_id")


def flatten_numeric(tree: dict[str, Any], depth: int = 2, prefix: str = "") -> dict[str, float]:
    """Numeric leaves (not bools) of nested dicts down to ``depth`` levels, keyed ``a.b``."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, dict) and depth > 1:
            out.update(flatten_numeric(value, depth - 1, f"{name}."))
    return out


def load_run(ws: Workspace, name: str) -> Run:
    """Read ``runs/<name>/run.json`` (+ config.yaml) or raise a one-line error."""
    path = ws.run_dir(name)
    meta_path = path / RUN_FILE
    if not meta_path.exists():
        found = list_runs(ws, complete_only=False)
        hint = f"runs found: {', '.join(found)}" if found else "no runs yet"
        raise ToolkitError(f"no run '{name}' in {ws.runs_dir} ({hint}); train it with `toolkit train --name {name}`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"{meta_path} is not valid JSON ({exc.msg}); re-run `toolkit train`") from None
    config_path = path / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    return Run(name=name, path=path, meta=meta, config=config or {})


def list_runs(ws: Workspace, complete_only: bool = True) -> list[str]:
    """Names of run folders holding a run.json, sorted (only complete ones by default)."""
    if not ws.runs_dir.exists():
        return []
    names = []
    for p in sorted(ws.runs_dir.iterdir()):
        meta = p / RUN_FILE
        if not meta.exists():
            continue
        if complete_only:
            try:
                if not json.loads(meta.read_text()).get("complete", False):
                    continue
            except json.JSONDecodeError:
                continue
        names.append(p.name)
    return names


def settings_mismatch(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Settings (other than the compared synthetic data) that differ between ``runs``: key -> {run: value}."""
    out: dict[str, dict[str, Any]] = {}
    for key in MATCH_KEYS + TRAIN_MATCH_KEYS:
        values = {r.name: r.setting(key) for r in runs}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            out[key] = values
    windows = {r.name: (r.config.get("data") or {}).get("windows") for r in runs}
    if "windows" not in out and len({json.dumps(v, default=str) for v in windows.values()}) > 1:
        out["windows"] = windows
    return out
