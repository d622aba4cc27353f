"""A study's plan: its arms, the nested real-data subsets, the jobs, the shards, and where each output goes.

Arms
----
At every real-data fraction ``f`` of ``study.fractions``: the control (r = 0) and, for every
mode x backend, every synthetic ratio r > 0. The control at ``f`` is *count-matched*: it trains on
exactly the patients the synthetic arms at ``f`` train on, for the same number of samples per epoch
(``train.epoch_size``; see :mod:`train.balancer`), so an arm differs from its control only in the
synthetic share of what it sees.

Real-data subsets
-----------------
:func:`nested_subsets` orders the store's train-split patients once; the subset of fraction ``f``
is the first ``round(f * n)`` of that order. So every smaller subset lies inside every larger one,
every arm and organ at ``f`` gets the same patients, and each (fold, injury pattern) stratum keeps
its share (within one patient). A subset restricts training *and* validation folds (with less real
data a researcher also validates on less); the test set is never touched, so every arm is scored on
the same patients. A generator used at ``f`` trains on that subset only: no arm sees a patient its
fraction was denied.

Jobs
----
One generator job per organ x mode x backend x fraction; one training job per arm x organ x seed
x fold (each trains one fold of one run). Jobs are listed in a fixed order, generators first;
shard ``k`` of ``N`` takes every N-th job starting at the k-th, so shards cover each job once.

Layout::

    studies/<name>/study.yaml      the resolved config, saved before the first job (the design is fixed)
    studies/<name>/plan.json       when the design was saved, the primary comparisons, counts
    studies/<name>/subsets.csv     patient_id, fold, stratum, order, and a 0/1 column per fraction
    studies/<name>/jobs.csv        every job: id, kind, organ, fraction, ratio, mode, backend, seed, fold, run
    studies/<name>/synthetic/<mode>-<backend>-f<fraction>/<organ>/   a generator of that fraction (gen.run)
    studies/<name>/runs/<organ>-f<fraction>-<arm>-s<seed>/           one classifier run (artifacts.run)
    studies/<name>/report/         study.json, report.html, report.md, the curves (study.report)
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from toolkit.config import Config, StudyConfig
from toolkit.errors import ConfigError, DataError
from toolkit.sliceset import MANIFEST_FILE, SliceSet
from toolkit.workspace import Workspace

STUDY_FILE = "study.yaml"
PLAN_FILE = "plan.json"
SUBSETS_FILE = "subsets.csv"
JOBS_FILE = "jobs.csv"
REPORT_DIR = "report"
JOB_COLUMNS = ("id", "kind", "organ", "fraction", "ratio", "mode", "backend", "seed", "fold", "run")


def _g(x: float) -> str:
    return f"{x:g}"


# ------------------------------------------------------------------ arms and jobs
@dataclass(frozen=True)
class Arm:
    """One arm: a real-data fraction and a synthetic ratio (with its generator's mode and backend).

    The control (``ratio == 0``) has no mode or backend: one control per fraction serves every
    synthetic arm at that fraction.
    """

    fraction: float
    ratio: float
    mode: str | None = None
    backend: str | None = None

    @property
    def is_control(self) -> bool:
        return self.ratio == 0

    @property
    def kind(self) -> str:
        """The arm without its fraction: ``control`` or ``<mode>-<backend>-r<ratio>`` (one line of a curve)."""
        return "control" if self.is_control else f"{self.mode}-{self.backend}-r{_g(self.ratio)}"

    @property
    def name(self) -> str:
        """``f<fraction>-r0`` (control) or ``f<fraction>-<mode>-<backend>-r<ratio>``."""
        return f"f{_g(self.fraction)}-r0" if self.is_control else f"f{_g(self.fraction)}-{self.kind}"

    @property
    def generator(self) -> str | None:
        """The generator folder name ``<mode>-<backend>-f<fraction>``; None for the control."""
        return None if self.is_control else f"{self.mode}-{self.backend}-f{_g(self.fraction)}"

    def control(self) -> Arm:
        """The count-matched control of this arm (same fraction, r = 0)."""
        return Arm(self.fraction, 0.0)


def run_name(organ: str, arm: Arm, seed: int) -> str:
    """``<organ>-<arm>-s<seed>``: the run folder of one organ, arm and training seed."""
    return f"{organ}-{arm.name}-s{seed}"


@dataclass(frozen=True)
class Job:
    """One independent piece of a study: train a generator, or train one fold of one run."""

    kind: str  # "gen" | "train"
    organ: str
    arm: Arm  # for a generator: any arm that uses it (its fraction, mode, backend)
    seed: int | None = None  # train jobs: the classifier's training seed
    fold: int | None = None  # train jobs

    @property
    def run(self) -> str | None:
        return None if self.kind == "gen" else run_name(self.organ, self.arm, self.seed)

    @property
    def id(self) -> str:
        """``gen/<organ>/<mode>-<backend>-f<f>`` or ``train/<run>/fold<k>``."""
        if self.kind == "gen":
            return f"gen/{self.organ}/{self.arm.generator}"
        return f"train/{self.run}/fold{self.fold}"

    def row(self) -> dict[str, Any]:
        """One line of ``jobs.csv``."""
        generator = self.kind == "gen"
        return {"id": self.id, "kind": self.kind, "organ": self.organ, "fraction": self.arm.fraction,
                "ratio": None if generator else self.arm.ratio, "mode": self.arm.mode, "backend": self.arm.backend,
                "seed": self.seed, "fold": self.fold, "run": self.run}


def training_seeds(cfg: Config) -> list[int]:
    """The classifier seeds every arm trains with: ``seed``, ``seed + 1``, ... (``study.repeats`` of them)."""
    return [cfg.seed + i for i in range(cfg.study.repeats)]


def study_arms(study: StudyConfig) -> list[Arm]:
    """Every arm, by fraction: the control first, then mode x backend x ratio."""
    arms = []
    for fraction in study.fractions:
        arms.append(Arm(fraction, 0.0))
        arms += [Arm(fraction, r, mode, backend) for mode in study.modes for backend in study.backends
                 for r in study.ratios if r > 0]
    return arms


def primary_arms(study: StudyConfig) -> list[Arm]:
    """The synthetic arms the primary comparison tests (each against its control), in plan order."""
    p = study.primary
    modes, backends = p.modes or study.modes, p.backends or study.backends
    return [a for a in study_arms(study) if not a.is_control and a.fraction == p.fraction and a.ratio in p.ratios
            and a.mode in modes and a.backend in backends]


def plan_jobs(cfg: Config, n_folds: int) -> list[Job]:
    """Every job of the study in its fixed order: generators (organ, fraction, mode, backend), then
    training (organ, fraction, arm, seed, fold)."""
    study = cfg.study
    arms = study_arms(study)
    jobs: list[Job] = []
    for organ in study.organs:
        seen = set()
        for arm in arms:
            if arm.generator is not None and arm.generator not in seen:
                seen.add(arm.generator)
                jobs.append(Job("gen", organ, arm))
    for organ in study.organs:
        for arm in arms:
            for seed in training_seeds(cfg):
                jobs += [Job("train", organ, arm, seed, k) for k in range(n_folds)]
    return jobs


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: the 2nd of 4 shares (1-based, as a SLURM array index)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be k/N with whole numbers, e.g. 2/4, got '{text}'") from None
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(f"--shard {text}: need 1 <= k <= N, e.g. 1/{max(n, 1)} .. {max(n, 1)}/{max(n, 1)}")
    return k, n


def shard_jobs(jobs: list[Job], k: int, n: int) -> list[Job]:
    """The k-th (1-based) of ``n`` shares: jobs ``k-1, k-1+n, k-1+2n, ...`` of the plan.

    Taking every n-th job spreads generators and every arm's folds over the shares alike.
    """
    return jobs[k - 1 :: n]


# ------------------------------------------------------------------ real-data subsets
def patient_table(store: SliceSet, organs: list[str]) -> pd.DataFrame:
    """One row per train-split patient: ``patient_id``, ``fold`` and ``<organ>`` (injured 0/1), sorted by id."""
    table = store.table
    train = table[table["split"] == "train"]
    grouped = train.groupby("patient_id", sort=True)
    out = pd.DataFrame({"fold": grouped["fold"].first().astype(np.int64)})
    for organ in organs:
        out[organ] = (grouped[f"{organ}_patient"].max() > 0).astype(np.int64)
    return out.rename_axis("patient_id").reset_index()


def nested_subsets(patients: pd.DataFrame, fractions: list[float], organs: list[str], seed: int) -> pd.DataFrame:
    """Nested, stratified, patient-level subsets of the training patients.

    Patients are put in one order: within each stratum (store fold x injury pattern over ``organs``)
    a seeded random order, and the strata interleaved by relative position ``(rank + 0.5) / size``
    (ties in random order). A fraction's subset is a prefix of that order, so subsets are nested, and
    every stratum holds about ``f`` of its patients (each within one patient of its share of the prefix).

    Parameters
    ----------
    patients : DataFrame
        :func:`patient_table`: ``patient_id``, ``fold``, one 0/1 column per organ.
    fractions : list of float
        Each in (0, 1]; a fraction keeps ``max(1, round(f * n))`` patients.
    organs : list of str
    seed : int

    Returns
    -------
    DataFrame
        ``patient_id``, ``fold``, ``stratum``, ``order`` (0 = first kept), and ``f<fraction>`` (0/1)
        per fraction; one row per patient, sorted by ``patient_id``.
    """
    n = len(patients)
    rng = np.random.default_rng(seed)
    stratum = patients["fold"].astype(str) + ":" + patients[list(organs)].astype(str).agg("".join, axis=1)
    position = np.empty(n)
    for _, rows in stratum.groupby(stratum).indices.items():
        position[rows] = (rng.permutation(len(rows)) + 0.5) / len(rows)
    tiebreak = rng.random(n)
    order = np.empty(n, np.int64)
    order[np.lexsort((tiebreak, position))] = np.arange(n)
    out = pd.DataFrame({"patient_id": patients["patient_id"].to_numpy(), "fold": patients["fold"].to_numpy(),
                        "stratum": stratum.to_numpy(), "order": order})
    for f in fractions:
        keep = max(1, math.floor(f * n + 0.5))
        out[f"f{_g(f)}"] = (order < keep).astype(np.int64)
    return out


def subset_of(subsets: pd.DataFrame, fraction: float) -> set[int]:
    """The patient ids of ``fraction``'s subset."""
    column = f"f{_g(fraction)}"
    return set(subsets.loc[subsets[column] == 1, "patient_id"].astype(int))


def check_subsets(subsets: pd.DataFrame, patients: pd.DataFrame, cfg: Config, fold_of: dict[int, int],
                  n_folds: int) -> None:
    """Refuse a fraction that leaves a run's fold without injured or healthy patients of an organ.

    ``fold_of`` maps patient -> the run's fold (store fold % train.folds).
    """
    injured = patients.set_index("patient_id")
    for f in cfg.study.fractions:
        kept = sorted(subset_of(subsets, f))
        for organ in cfg.study.organs:
            labels = injured.loc[kept, organ].to_numpy()
            folds = np.array([fold_of[p] for p in kept])
            for k in range(n_folds):
                for part, rows in (("training", folds != k), ("validation", folds == k)):
                    classes = set(labels[rows].tolist())
                    if classes != {0, 1}:
                        missing = "injured" if 1 not in classes else "healthy"
                        raise ConfigError(
                            f"study.fractions {_g(f)} keeps {len(kept)} training patients, which leave fold {k}'s "
                            f"{part} part with no {missing} {organ} patient; raise that fraction, drop {organ} "
                            "from study.organs or use fewer folds (train.folds)"
                        )


# ------------------------------------------------------------------ where things go
@dataclass(frozen=True)
class StudyWorkspace(Workspace):
    """The workspace one study job sees: the shared store, and the study's own synthetic sets and runs.

    ``gen.run.generate`` and ``train.run.train_run`` take a workspace and read ``store_dir``,
    ``synthetic_dir(organ)`` and ``run_dir(name)`` from it; this one points the last two into the
    study folder (one synthetic root per generator arm), so neither stage needs to know about studies.
    """

    synthetic_base: Path = Path()
    runs_base: Path = Path()

    @property
    def synthetic_root(self) -> Path:
        return self.synthetic_base

    @property
    def runs_dir(self) -> Path:
        return self.runs_base


@dataclass(frozen=True)
class StudyFolder:
    """``studies/<name>/``: the paths of a study's files."""

    path: Path

    @classmethod
    def of(cls, ws: Workspace, name: str) -> StudyFolder:
        return cls(ws.root / "studies" / name)

    @property
    def config_path(self) -> Path:
        return self.path / STUDY_FILE

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def subsets_path(self) -> Path:
        return self.path / SUBSETS_FILE

    @property
    def jobs_path(self) -> Path:
        return self.path / JOBS_FILE

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    def synthetic_root(self, arm: Arm) -> Path:
        """Where the generator of ``arm`` (its mode, backend, fraction) writes ``<organ>/``."""
        if arm.generator is None:
            return self.path / "synthetic" / "none"  # controls read no synthetic set
        return self.path / "synthetic" / arm.generator

    def workspace(self, ws: Workspace, arm: Arm) -> StudyWorkspace:
        """The workspace the jobs of ``arm`` run in."""
        return StudyWorkspace(ws.root, synthetic_base=self.synthetic_root(arm), runs_base=self.runs_dir)


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, then rename: concurrent shards never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def load_store(ws: Workspace) -> SliceSet:
    if not (ws.store_dir / MANIFEST_FILE).exists():
        raise DataError(f"no slice store in {ws.store_dir}: run `toolkit demo-data` (or copy the RSNA data into "
                        f"{ws.data_dir}) and `toolkit prepare` first")
    return SliceSet.load(ws.store_dir)


def write_plan(folder: StudyFolder, cfg: Config, jobs: list[Job], subsets: pd.DataFrame, created: str) -> None:
    """``plan.json``, ``jobs.csv`` and ``subsets.csv`` (the same content from every shard)."""
    family = [{"organ": organ, "arm": arm.name, "control": arm.control().name}
              for organ in cfg.study.organs for arm in primary_arms(cfg.study)]
    plan = {"created": created, "study": cfg.study.name, "jobs": len(jobs),
            "generator_jobs": sum(j.kind == "gen" for j in jobs), "train_jobs": sum(j.kind == "train" for j in jobs),
            "primary": family, "training_seeds": training_seeds(cfg)}
    write_atomic(folder.plan_path, json.dumps(plan, indent=2))
    table = pd.DataFrame([j.row() for j in jobs], columns=list(JOB_COLUMNS)).astype({"seed": "Int64", "fold": "Int64"})
    write_atomic(folder.jobs_path, table.to_csv(index=False))
    write_atomic(folder.subsets_path, subsets.to_csv(index=False))


# Config keys that may differ when a study is resumed: the phantom section (a study reads the store, not
# the phantom) and settings that change no result.
RESUMABLE_KEYS = ("phantom", "data.workers", "train.num_workers", "gen.checkpoint_every", "eval.bootstrap")


def design_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Config keys (dotted) whose values differ between a saved ``study.yaml`` and the current config.

    Keys of :data:`RESUMABLE_KEYS` are left out.
    """

    def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if name in RESUMABLE_KEYS:
                continue
            if isinstance(value, dict) and value and name != "train.organs":
                out.update(leaves(value, f"{name}."))
            else:
                out[name] = value
        return out

    def text(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    old, new = leaves(saved), leaves(current)
    return sorted(k for k in set(old) | set(new) if text(old.get(k)) != text(new.get(k)))
