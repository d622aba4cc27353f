"""Run a study's jobs: all of them, or one shard; every finished job is kept, so a study resumes.

:func:`open_study` fixes the design before anything runs: it saves ``study.yaml`` (the resolved
config, primary comparison included), the real-data subsets and the job list, and refuses to
continue a study whose saved design differs from the config given. :func:`run_jobs` runs jobs in
plan order: a generator job trains one organ's generator on one fraction's patients
(:func:`gen.run.generate`), a training job trains one fold of one run (:func:`train.run.train_run`
with that fraction's patients). A job whose output exists is skipped; one cut short resumes.

Shards run concurrently (a SLURM array, several GPUs) and share nothing but files: each job
writes its own folder, and the files several jobs rewrite (a run's ``config.yaml`` and
``run.json``) are replaced atomically with the same content. A shard's training job whose
generator another shard makes, and has not finished, is left waiting (run generator jobs first:
``--stage gen`` for every shard, then ``--stage train``).
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from study.plan import (
    Arm,
    Job,
    StudyFolder,
    check_subsets,
    design_differences,
    load_store,
    nested_subsets,
    patient_table,
    plan_jobs,
    subset_of,
    write_plan,
)
from toolkit.artifacts.run import CONFIG_FILE, RunFolder
from toolkit.config import Config, save_config, validate
from toolkit.errors import ConfigError, ContractError, DataError
from toolkit.reporting import Reporter, as_reporter
from toolkit.sliceset import MANIFEST_FILE, SliceSet
from toolkit.workspace import Workspace

STAGES = ("gen", "train")


@dataclass
class Study:
    """An opened study: its folder, config, store, subsets and jobs."""

    folder: StudyFolder
    cfg: Config
    store: SliceSet
    subsets: pd.DataFrame
    jobs: list[Job]
    n_folds: int

    def patients(self, fraction: float) -> set[int]:
        """The training patients of ``fraction`` (every arm at that fraction uses exactly these)."""
        return subset_of(self.subsets, fraction)


@dataclass
class JobReport:
    """What a call of :func:`run_jobs` did, by job id."""

    done: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # already finished
    waiting: list[str] = field(default_factory=list)  # training jobs whose generator is not there yet


def open_study(ws: Workspace, cfg: Config, force: bool = False, reporter: Reporter | None = None) -> Study:
    """Plan the study and save its design, or check the saved design when it exists.

    Parameters
    ----------
    ws : Workspace
        Reads ``store/``; the study lives in ``studies/<study.name>/``.
    cfg : Config
        Every section; ``study`` says what to run.
    force : bool, default=False
        Delete an existing study of that name first.

    Raises
    ------
    ConfigError
        The saved design differs (naming the first key), or a fraction leaves a fold without a class.
    DataError
        No store, or the store's patients changed since the study was planned.
    """
    from train.run import check_store, resolve_folds

    cfg = validate(cfg)
    study = cfg.study
    folder = StudyFolder.of(ws, study.name)
    store = load_store(ws)
    check_store(store, list(study.organs), ws.store_dir)
    n_folds, fold_of = resolve_folds(store.table, cfg.train.folds)
    patients = patient_table(store, list(study.organs))
    subsets = nested_subsets(patients, list(study.fractions), list(study.organs), cfg.seed)
    run_fold = dict(zip(store.table["patient_id"].astype(int), fold_of.astype(int), strict=True))
    check_subsets(subsets, patients, cfg, run_fold, n_folds)
    jobs = plan_jobs(cfg, n_folds)

    if force and folder.path.exists():
        shutil.rmtree(folder.path)
    if folder.config_path.exists():
        saved = yaml.safe_load(folder.config_path.read_text()) or {}
        changed = design_differences(saved, cfg.to_dict())
        if changed:
            key = changed[0]
            raise ConfigError(
                f"{folder.config_path} fixed this study's design before it ran, and {key} differs now "
                f"({len(changed)} key(s) in all); run it with the saved settings (--config {folder.config_path}), "
                "pick another study.name, or pass --force to delete the study and start over"
            )
        if folder.subsets_path.read_text() != subsets.to_csv(index=False):
            raise DataError(
                f"{folder.subsets_path} no longer matches the store's training patients (was the store re-prepared?); "
                "pass --force to start the study over on this store"
            )
    else:  # shards that start together all write the same files, each replaced whole
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_plan(folder, cfg, jobs, subsets, created)
        save_config(cfg, folder.config_path)  # last: its presence says the design is saved
        as_reporter(reporter).info(f"study '{study.name}': design saved to {folder.config_path} before any job runs")
    return Study(folder=folder, cfg=cfg, store=store, subsets=subsets, jobs=jobs, n_folds=n_folds)


# ------------------------------------------------------------------ one job
def generator_config(cfg: Config, arm: Arm) -> Config:
    """The config ``arm``'s generator trains with: ``gen.model`` set to its backend.

    The mode goes to ``gen.mode`` once gen has that setting (whole-image generators need none).
    """
    gen = dataclasses.replace(cfg.gen, model=arm.backend)
    if any(f.name == "mode" for f in dataclasses.fields(gen)):
        gen = dataclasses.replace(gen, mode=arm.mode)
    elif arm.mode != "image":
        raise ConfigError(f"study.modes lists '{arm.mode}', but gen has no gen.mode setting to make it with")
    return validate(dataclasses.replace(cfg, gen=gen))


def run_config(cfg: Config, arm: Arm, seed: int) -> Config:
    """The config one run of ``arm`` trains with: the training seed and the arm's synthetic ratio."""
    return dataclasses.replace(cfg, seed=seed, train=dataclasses.replace(cfg.train, synthetic_ratio=arm.ratio))


def claim_run_folder(path: Path, cfg: Config) -> None:
    """Create a run folder holding its config.yaml in one step (a renamed staging folder).

    Shards that start the same run at once: one rename wins, the others find the folder complete,
    so :func:`train.run.train_run` (``resume=True``) never reads a folder without its config.
    """
    if path.exists():
        return
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.init")
    staging.mkdir(parents=True)
    save_config(cfg, staging / CONFIG_FILE)
    try:
        staging.rename(path)
    except OSError:  # another shard created it first
        shutil.rmtree(staging, ignore_errors=True)


def run_gen_job(ws: Workspace, study: Study, job: Job, reporter: Reporter | None = None) -> str:
    """Train (or resume, or keep) one generator on its fraction's patients; ``"done"`` or ``"kept"``."""
    from gen.base import TRAINING_STATE_NAME
    from gen.run import generate

    sws = study.folder.workspace(ws, job.arm)
    out = sws.synthetic_dir(job.organ)
    patients = study.patients(job.arm.fraction)
    if (out / MANIFEST_FILE).exists():
        trained = set(pd.read_csv(out / "train_patients.csv")["patient_id"].astype(int))
        if not trained <= patients:
            raise ContractError(
                f"{out} was trained on {len(trained - patients)} patient(s) outside fraction "
                f"{job.arm.fraction:g} of the study; delete that folder to retrain it"
            )
        return "kept"
    resume = (out / "checkpoint" / TRAINING_STATE_NAME).exists()
    generate(sws, generator_config(study.cfg, job.arm), job.organ, resume=resume, reporter=reporter,
             train_patients=patients)
    return "done"


def run_train_job(ws: Workspace, study: Study, job: Job, reporter: Reporter | None = None) -> str:
    """Train (or resume, or keep) one fold of one run; ``"done"``, ``"kept"`` or ``"waiting"``."""
    from train.run import train_run

    sws = study.folder.workspace(ws, job.arm)
    folder = RunFolder(sws.run_dir(job.run))
    if folder.fold(job.organ, job.fold).done:
        return "kept"
    if not job.arm.is_control and not (sws.synthetic_dir(job.organ) / MANIFEST_FILE).exists():
        return "waiting"
    cfg = run_config(study.cfg, job.arm, job.seed)
    claim_run_folder(folder.path, cfg)
    train_run(sws, cfg, name=job.run, organs=[job.organ], resume=True, reporter=reporter,
              train_patients=study.patients(job.arm.fraction), only_folds=[job.fold])
    return "done"


def run_jobs(ws: Workspace, study: Study, jobs: list[Job], stage: str | None = None,
             reporter: Reporter | None = None) -> JobReport:
    """Run ``jobs`` in order (generators first), keeping finished ones.

    Parameters
    ----------
    stage : {"gen", "train"}, optional
        Run only that kind of job (a cluster runs every shard's generators before any training).
    """
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; choose one of {', '.join(STAGES)}")
    reporter = as_reporter(reporter)
    chosen = [j for j in jobs if stage is None or j.kind == stage]
    chosen.sort(key=lambda j: j.kind != "gen")  # stable: plan order within each kind
    report = JobReport()
    for i, job in enumerate(chosen, 1):
        run = run_gen_job if job.kind == "gen" else run_train_job
        status = run(ws, study, job, reporter)
        getattr(report, status).append(job.id)
        if status != "kept":
            reporter.info(f"[{i}/{len(chosen)}] {job.id}: {status}")
    return report


def run_study(
    ws: Workspace,
    cfg: Config,
    shard: tuple[int, int] | None = None,
    stage: str | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> tuple[Study, JobReport]:
    """Open (or plan) the study and run its jobs, or one shard of them.

    Parameters
    ----------
    shard : (k, N), optional
        Run the k-th (1-based) of N shares of the jobs (:func:`study.plan.shard_jobs`).
    stage : {"gen", "train"}, optional
        Only generator or only training jobs.
    force : bool, default=False
        Delete the study first (refused with ``shard``: it would delete other shards' work).

    Returns
    -------
    study : Study
    report : JobReport
    """
    from study.plan import shard_jobs

    if force and shard is not None:
        raise ConfigError("--force deletes the whole study, other shards' work included: run it once without "
                          "--shard (e.g. with --stage gen), then start the shards")
    study = open_study(ws, cfg, force=force, reporter=reporter)
    jobs = study.jobs if shard is None else shard_jobs(study.jobs, *shard)
    return study, run_jobs(ws, study, jobs, stage, reporter)
