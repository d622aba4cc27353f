"""Reading the run folders written by ``toolkit train`` (the only files ``eval/`` reads of a run).

The layout, ``run.json`` and the prediction tables are defined once, in
:mod:`toolkit.artifacts.run`; :class:`Run` adds what comparing runs needs (settings,
generator audits) on top of its :class:`~toolkit.artifacts.run.RunFolder` and
:class:`~toolkit.artifacts.run.RunInfo`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from toolkit.artifacts.run import OrganSettings, RunFolder, RunInfo
from toolkit.config import organ_train_settings
from toolkit.errors import ToolkitError
from toolkit.workspace import Workspace

_INFO_KEYS = frozenset(f.name for f in fields(RunInfo))

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
    "input",
)


@dataclass
class Run:
    """One finished (or partial) classifier run."""

    name: str
    folder: RunFolder
    info: RunInfo
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def organs(self) -> list[str]:
        return list(self.info.organs)

    @property
    def complete(self) -> bool:
        return self.info.complete

    @property
    def synthetic_ratio(self) -> float:
        return float(self.info.synthetic_ratio or 0.0)

    def organ_dir(self, organ: str) -> Path:
        return self.folder.organ_dir(organ)

    def has_organ(self, organ: str) -> bool:
        """``organ`` finished: its test predictions exist."""
        return organ in self.organs and self.folder.has_table(organ, "test_patients")

    def has_models(self, organ: str) -> bool:
        """``organ`` has fold checkpoints to predict with."""
        return organ in self.organs and bool(self.folder.checkpoints(organ))

    def table(self, organ: str, name: str, required: bool = True) -> pd.DataFrame | None:
        """``<organ>/<name>.csv`` with its columns checked (:meth:`RunFolder.read_table`)."""
        return self.folder.read_table(organ, name, required)

    def organ_settings(self, organ: str) -> OrganSettings:
        """The settings ``organ`` was trained with, as run.json records them.

        A run.json written before settings were recorded per organ: rebuilt from config.yaml
        with :meth:`organ_setting` (the rule train applied).
        """
        if organ in self.info.settings:
            return self.info.settings[organ]
        return OrganSettings.from_dict({f.name: self.organ_setting(organ, f.name) for f in fields(OrganSettings)})

    def organ_setting(self, organ: str | None, key: str) -> Any:
        """A train setting as ``organ`` was trained with it: its ``train.organs`` override, else the run's.

        :func:`toolkit.config.organ_train_settings` (the rule training used) on the saved config, with
        run.json's record of run-level values; ``organ=None`` gives the run's.
        """
        train = dict(self.config.get("train") or {})
        if key in _INFO_KEYS:
            train[key] = getattr(self.info, key)
        return organ_train_settings(train, organ).get(key)

    def image_size(self, organ: str) -> int:
        """Pixels per side ``organ``'s fold models take."""
        return int(self.organ_settings(organ).image_size)

    def setting(self, key: str) -> Any:
        """A setting from run.json, else from the train section of config.yaml."""
        if key in _INFO_KEYS:
            return getattr(self.info, key)
        return (self.config.get("train") or {}).get(key)

    def generator_audit(self, organ: str) -> dict[str, float]:
        """Numeric figures of the generator audit used for ``organ`` (empty if none).

        Audits differ between generators, so every numeric value up to two levels deep is kept
        under a dotted key (``frechet_distance.synthetic_vs_real``, ``diversity``); deeper
        detail (per-class breakdowns) stays in audit.json.
        """
        gen = self.info.generators.get(organ) or {}
        return flatten_numeric(gen.get("audit") or {}, depth=2)

    def generator_summary(self, organ: str) -> str | None:
        """The audit's one-line ``summary`` text, when it has one."""
        gen = self.info.generators.get(organ) or {}
        summary = (gen.get("audit") or {}).get("summary")
        return summary if isinstance(summary, str) else None

    def generator_id(self, organ: str) -> str | None:
        gen = self.info.generators.get(organ) or {}
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
    folder = RunFolder(ws.run_dir(name))
    if not folder.exists:
        found = list_runs(ws, complete_only=False)
        hint = f"runs found: {', '.join(found)}" if found else "no runs yet"
        raise ToolkitError(f"no run '{name}' in {ws.runs_dir} ({hint}); train it with `toolkit train --name {name}`")
    return Run(name=name, folder=folder, info=folder.read_info(), config=folder.read_config())


def list_runs(ws: Workspace, complete_only: bool = True) -> list[str]:
    """Names of run folders holding a run.json, sorted (only complete ones by default)."""
    if not ws.runs_dir.exists():
        return []
    folders = [RunFolder(p) for p in sorted(ws.runs_dir.iterdir())]
    return [f.name for f in folders if f.exists and (not complete_only or f.state() == "complete")]


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
    # What each organ read (organ crops and which ones, or slices): compared runs must have read the same.
    shared = set.intersection(*(set(r.organs) for r in runs)) if runs else set()
    inputs = {r.name: {o: {k: v for k, v in r.info.input(o).items() if k != "segmenter_dir"} for o in sorted(shared)}
              for r in runs}
    if len({json.dumps(v, sort_keys=True) for v in inputs.values()}) > 1:
        out["inputs"] = inputs
    return out
