"""The workspace: one folder with a fixed layout, so commands need no paths.

::

    <workdir>/
      config.yaml              the workspace's config (written by the first command given --config)
      data/                    raw RSNA-layout input: train.csv, train_series_meta.csv,
                               image_level_labels.csv, train_images/<patient>/<series>/<n>.dcm
                               (+ phantom_truth/ for the built-in phantom)
      store/                   the real slice store (toolkit prepare), organ label maps (toolkit segment)
      store/crops/<organ>/     organ crop sets of kidney, liver, spleen (toolkit crop)
      synthetic/<organ>/       synthetic slice set + generator checkpoint + audit (toolkit gen)
      runs/<name>/             classifier runs (toolkit train)
      reports/<name>/          comparisons (toolkit compare), heat maps (toolkit explain)
      studies/<name>/          a study's design, its own synthetic sets and runs, its report (toolkit study)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit import CROP_ORGANS, ORGANS
from toolkit.errors import ConfigError


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(
                f"workspace {self.root} is a file, not a folder; pass --workdir a folder (created if missing)"
            )

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def synthetic_root(self) -> Path:
        return self.root / "synthetic"

    def synthetic_dir(self, organ: str) -> Path:
        return self.synthetic_root / organ

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def status(self) -> list[tuple[str, bool, str]]:
        """(stage, done, detail) for each stage in pipeline order."""
        rows: list[tuple[str, bool, str]] = []
        has_data = (self.data_dir / "train.csv").exists()
        hint = "no data/train.csv: run `toolkit demo-data` or copy the RSNA data into data/"
        rows.append(("data", has_data, str(self.data_dir) if has_data else hint))
        has_store = (self.store_dir / "manifest.csv").exists()
        hint = "no slice store: run `toolkit prepare`"
        rows.append(("prepare", has_store, str(self.store_dir) if has_store else hint))
        has_labels = (self.store_dir / "organs.csv").exists()
        hint = "no organ label maps: run `toolkit segment` (or train and generate from slices: train.input=slices)"
        rows.append(("segment", has_labels, str(self.store_dir / "organ_labels.npy") if has_labels else hint))
        cropped = [o for o in CROP_ORGANS if (self.store_dir / "crops" / o / "manifest.csv").exists()]
        hint = "no organ crops: run `toolkit crop`"
        rows.append(("crop", bool(cropped), f"crop sets for: {', '.join(cropped)}" if cropped else hint))
        done = [o for o in ORGANS if (self.synthetic_dir(o) / "manifest.csv").exists()]
        hint = "no synthetic slices: run `toolkit gen --organ all`"
        rows.append(("gen", bool(done), f"synthetic sets for: {', '.join(done)}" if done else hint))
        runs = sorted(p.name for p in self.runs_dir.glob("*") if (p / "config.yaml").exists())
        rows.append(("train", bool(runs), f"runs: {', '.join(runs)}" if runs else "no runs: run `toolkit train`"))
        reports = sorted(p.name for p in self.reports_dir.glob("*") if p.is_dir())
        hint = "no report: run `toolkit compare`"
        rows.append(("compare", bool(reports), f"reports: {', '.join(reports)}" if reports else hint))
        return rows
