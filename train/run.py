"""``toolkit train``: one classifier per organ and fold, fold ensembles on the test set.

Folds
-----
The store's ``fold`` column (patient-grouped, computed once by ``prepare``) defines the
folds. ``cfg.train.folds = K`` smaller than the store's fold count merges them as
``fold % K`` (patients stay grouped: whole store folds move together); a larger ``K`` is
refused. For fold ``k`` the classifier trains on the real slices of every other fold
(+ synthetic slices, see :mod:`train.balancer`), early-stops on fold ``k``'s slices, and
finally scores every test slice.

Output: the run folder, :mod:`toolkit.artifacts.run` (its one definition; ``toolkit compare``,
``predict``, ``explain`` read it through the same module). Per organ, the folds' prediction
files are gathered into ``oof.csv``, ``oof_patients.csv``, ``test_folds.csv``,
``test_slices.csv`` and ``test_patients.csv``; ``run.json`` records each organ's resolved
settings (``train`` plus its ``train.organs`` override).

Inputs
------
With ``train.input: crops`` (the default) kidney, liver and spleen (``crop.organs``) train on their crop
set (``store/crops/<organ>/``, :mod:`toolkit.artifacts.crops`): each crop's soft target (patient label x
organ visibility, or the slice label where image-level rows give one) is the BCE target, and the
balancer stratifies on its hard label (target >= 0.5). A patient's score aggregates all of their crops
(both kidneys); a test or validation patient without any crop of the organ (the localizer found none)
scores 0. ``train.input: slices`` trains on the stored slices and slice labels, to compare. Bowel and
extravasation always read the stored slices. ``run.json`` records what each organ read (``inputs``).

Slice files use the slice label; patient files the patient label (``<organ>_patient > 0``)
and grade. A patient's ``prob`` aggregates its slice probabilities (``cfg.train.aggregate``:
max, or mean of the ``top_k`` highest); in ``test_patients.csv`` it aggregates the
ensemble slice probabilities, ``prob_fold_k`` those of fold ``k`` alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from toolkit import ORGANS
from toolkit.artifacts.crops import CropSet, load_crop_set, reads_crops
from toolkit.artifacts.run import RESULT_NEUTRAL_TRAIN_KEYS, RunFolder, RunInfo
from toolkit.artifacts.synthetic import SyntheticSet
from toolkit.config import Config, check_image_sizes, organ_config, save_config, validate
from toolkit.errors import ContractError, DataError, ToolkitError
from toolkit.reporting import Reporter, as_reporter
from toolkit.sliceset import MANIFEST_FILE, SliceSet
from toolkit.workspace import Workspace
from train.balancer import REAL, Balancer, series_position
from train.data import BalancedEpochDataset, SliceDataset, resize_hu
from train.engine import FoldData, TrainHooks, binary_auc, train_fold
from train.frozen import FrozenFeatures
from train.inference import patient_scores


def default_run_name(ratio: float) -> str:
    """``real-only`` for r = 0, else ``synthetic-<r>`` (``synthetic-0.5``)."""
    return "real-only" if ratio == 0 else f"synthetic-{ratio:g}"


# ------------------------------------------------------------------ checks
def check_store(store: SliceSet, organs: list[str], path: Path) -> None:
    """Columns present and no patient in two folds or in both a fold and the test set."""
    table = store.table
    need = ["split", "fold", *[c for o in organs for c in (o, f"{o}_patient")]]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ToolkitError(
            f"{path / MANIFEST_FILE} lacks column(s) {', '.join(missing)}; re-run `toolkit prepare --force`"
        )
    bad_split = sorted(set(table["split"].astype(str)) - {"train", "test"})
    if bad_split:
        raise ToolkitError(f"{path / MANIFEST_FILE} column split holds {bad_split}; expected train/test")
    is_test = table["split"].to_numpy() == "test"
    fold = table["fold"].to_numpy()
    if (fold[is_test] != -1).any() or (fold[~is_test] < 0).any():
        raise ToolkitError(f"{path / MANIFEST_FILE}: test rows need fold -1 and train rows a fold >= 0")
    per_patient = table.groupby("patient_id").agg(folds=("fold", "nunique"), splits=("split", "nunique"))
    leaking = per_patient.index[(per_patient["folds"] > 1) | (per_patient["splits"] > 1)]
    if len(leaking):
        raise ToolkitError(
            f"{path / MANIFEST_FILE}: patient {leaking[0]} (and {len(leaking) - 1} more) is in two folds "
            "or in both a fold and the test set; re-run `toolkit prepare --force`"
        )
    if not (~is_test).any() or not is_test.any():
        raise ToolkitError(f"{path / MANIFEST_FILE} needs both train and test patients")


def resolve_folds(table: pd.DataFrame, folds: int | None) -> tuple[int, np.ndarray]:
    """Number of folds ``K`` and each row's fold (``store fold % K``; -1 for test rows)."""
    store_fold = table["fold"].to_numpy().astype(np.int64)
    n_store = int(store_fold.max()) + 1
    k = n_store if folds is None else int(folds)
    if k < 2:
        raise ToolkitError(f"train.folds must be >= 2, got {k}")
    if k > n_store:
        raise ToolkitError(
            f"train.folds={k} but the store has {n_store} folds; use --folds <= {n_store} "
            f"or re-run `toolkit prepare --folds {k} --force`"
        )
    return k, merged_folds(table, k)


def merged_folds(table: pd.DataFrame, k: int) -> np.ndarray:
    """Each row's fold among ``k`` (``store fold % k``; -1 for test rows): the store's manifest or a crop set's."""
    store_fold = table["fold"].to_numpy().astype(np.int64)
    return np.where(store_fold >= 0, store_fold % k, -1)


# ------------------------------------------------------------------ what an organ reads
@dataclass
class OrganData:
    """The rows one organ's classifiers train and are scored on: the store's slices or the organ's crops.

    Attributes
    ----------
    table : DataFrame of n rows
        The store's manifest or the crop set's; datasets index its rows (prediction files' ``row``).
    images : ndarray of shape (n, S, S), dtype=int16
        HU resized to the organ's ``train.image_size``.
    labels : ndarray of shape (n,), dtype=int64
        Binary labels: slice labels, or the crops' hard labels (what the balancer stratifies on).
    targets : ndarray of shape (n,), dtype=float32
        Training targets: the labels, or the crops' soft targets.
    fold_of : ndarray of shape (n,), dtype=int64
        Fold among the run's ``K`` (-1: test).
    position : ndarray of shape (n,)
        Relative level in the series (:func:`train.balancer.series_position`).
    record : dict
        What run.json ``inputs`` records for the organ.
    """

    table: pd.DataFrame
    images: np.ndarray
    labels: np.ndarray
    targets: np.ndarray
    fold_of: np.ndarray
    position: np.ndarray
    record: dict[str, Any]


def organ_input(cfg: Config, organ: str) -> str:
    """``"crops"`` when ``organ`` trains on its crop set (``train.input`` crops and ``organ`` in ``crop.organs``),
    else ``"slices"``."""
    return "crops" if reads_crops(cfg.train.for_organ(organ).input, organ, cfg.crop.organs) else "slices"


def crop_record(crops: CropSet, store_dir: Path) -> dict[str, Any]:
    """run.json ``inputs`` entry of an organ trained on ``crops``: enough for ``predict`` to cut a new series."""
    from seg.store import SEGMENTER_DIR

    return {"input": "crops", "crop_id": crops.crop_id, "size": int(crops.size), "margin": float(crops.margin),
            "min_visibility": float(crops.min_visibility), "segmenter_dir": str(Path(store_dir) / SEGMENTER_DIR)}


def check_crop_sizes(organ_cfgs: dict[str, Config], crop_sets: dict[str, CropSet]) -> None:
    """Refuse a classifier larger than its crops (it would learn upsampled crops), as for the store."""
    for organ, crops in crop_sets.items():
        size = organ_cfgs[organ].train.image_size
        if size > crops.size:
            raise ContractError(
                f"the {organ} classifier's image size {size} (train.image_size / train.organs.{organ}) is above the "
                f"{crops.size} px crops of {crops.path}: lower it to <= {crops.size} or re-run `toolkit crop --force "
                f"--size {size}`"
            )


# ------------------------------------------------------------------ synthetic pool
@dataclass
class SyntheticPool:
    """The usable synthetic slices of one organ (near copies removed), resized for training.

    A lesion set's pool holds its injured crops followed by their healthy source crops (read from the
    organ's crop set): ``source_patients`` says whose anatomy each row is, ``twins`` pairs them.
    """

    images: np.ndarray  # (n, S, S) int16 HU
    labels: np.ndarray  # (n,) int64
    near_copy_fraction: float
    info: dict[str, Any]  # generator_id, synthetic_dir, audit (run.json "generators")
    source_patients: np.ndarray | None = None  # (n,) int64, lesion sets only
    twins: np.ndarray | None = None  # (n,) int64: injured row -> its healthy source's row, -1 elsewhere

    def for_patients(self, patients: np.ndarray) -> SyntheticPool:
        """The rows drawn into ``patients``' anatomy only (a fold's training patients); an image pool as it is.

        A lesion crop is its source patient's data: a fold must not train on one whose source patient it
        validates on (or tests on), so rows of other patients are dropped, twins renumbered.
        """
        if self.source_patients is None:
            return self
        keep = np.isin(self.source_patients, np.asarray(patients))
        new_row = np.full(len(keep), -1, np.int64)
        new_row[keep] = np.arange(int(keep.sum()))
        twins = None
        if self.twins is not None:
            old = self.twins[keep]
            twins = np.where(old >= 0, new_row[np.maximum(old, 0)], -1)
        return dataclasses.replace(self, images=self.images[keep], labels=self.labels[keep],
                                   source_patients=self.source_patients[keep], twins=twins)


def load_synthetic_pool(
    ws: Workspace,
    organ: str,
    split_hash: str | None,
    image_size: int,
    windows: list[list[float]],
    allow_resize: bool = False,
    reporter: Reporter | None = None,
    input_id: str = "slices",
    crops: CropSet | None = None,
) -> SyntheticPool:
    """Read ``synthetic/<organ>/`` and refuse a set made for another split, window, input (``input_id``:
    ``"slices"`` or the crop id the classifier reads) or (unless ``allow_resize``, i.e.
    ``train.synthetic_resize``) image size; see ``SyntheticSet.check_compatible``.

    A lesion set (mode ``lesion``) needs the organ's crop set ``crops``: its healthy class is the source
    crops of its injured ones (the counterfactual twins), appended after them.
    """
    directory = ws.synthetic_dir(organ)
    if not (directory / MANIFEST_FILE).exists():
        raise ToolkitError(
            f"no synthetic slices for {organ} in {directory}: run `toolkit gen --organ {organ}` "
            "or pass --synthetic-ratio 0"
        )
    synthetic = SyntheticSet.load(directory)
    resize = synthetic.check_compatible(
        organ=organ, split_hash=split_hash, windows=windows, image_size=image_size, allow_resize=allow_resize,
        input_id=input_id, mode=synthetic.mode,
    )
    near = synthetic.near_copy
    keep = np.flatnonzero(~near)
    audit_path = directory / "audit.json"
    info = {
        "generator_id": synthetic.generator_id,
        "synthetic_dir": str(directory),
        "mode": synthetic.mode,
        "audit": json.loads(audit_path.read_text()) if audit_path.exists() else None,
    }
    if resize:
        info["resized"] = {"from": int(synthetic.image_size), "to": int(image_size)}
        as_reporter(reporter).warn(
            f"{organ}: synthetic slices made at {synthetic.image_size} px are resized to {image_size} px "
            "for training (train.synthetic_resize)"
        )
    images = resize_hu(synthetic.slices.images, image_size, keep)
    labels = (synthetic.classes[keep] > 0).astype(np.int64)
    near_fraction = float(near.mean()) if len(near) else 0.0
    if synthetic.mode != "lesion":
        return SyntheticPool(images=images, labels=labels, near_copy_fraction=near_fraction, info=info)
    if crops is None:
        raise ContractError(f"synthetic set {directory} holds lesion crops but this run's {organ} classifier reads "
                            "no crop set (train.input=crops); re-run `toolkit gen` with --mode image")
    source_rows = synthetic.source_rows[keep]
    sources, twin_of = np.unique(source_rows, return_inverse=True)
    n = len(keep)
    twins = np.concatenate([n + twin_of, np.full(len(sources), -1)]).astype(np.int64)
    return SyntheticPool(
        images=np.concatenate([images, resize_hu(crops.images, image_size, sources)]),
        labels=np.concatenate([labels, np.zeros(len(sources), np.int64)]),
        near_copy_fraction=near_fraction,
        info=info,
        source_patients=np.concatenate([synthetic.source_patients[keep],
                                        crops.table["patient_id"].to_numpy()[sources]]).astype(np.int64),
        twins=twins,
    )


# ------------------------------------------------------------------ run folder
def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in cfg_dict["train"].items() if k not in RESULT_NEUTRAL_TRAIN_KEYS}
    return {"seed": cfg_dict["seed"], "windows": cfg_dict["data"]["windows"], "train": train,
            "crop": cfg_dict.get("crop")}


def _open_run_dir(folder: RunFolder, cfg: Config, resume: bool, force: bool, main: bool = True) -> RunInfo | None:
    """Check that the run folder may be (re)used; return the info of the run it continues, if any.

    Every process runs the checks (so all raise alike); only the ``main`` one deletes.
    """
    run_dir = folder.path
    if resume and force:
        raise ToolkitError("pass either --resume (continue the run) or --force (start it over), not both")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if force:
        if main:
            shutil.rmtree(run_dir)
        return None
    if not resume:
        raise ToolkitError(
            f"run '{run_dir.name}' already exists in {run_dir.parent}: pass --resume to continue it, "
            "--force to overwrite it, or --name to start another"
        )
    saved = folder.read_config()
    if not saved:
        raise ToolkitError(f"{run_dir} has no config.yaml to resume from; pass --force to start it over")
    old, new = _comparable(saved), _comparable(cfg.to_dict())
    for key in ("seed", "windows", "crop"):
        if key == "crop" and old[key] is None:  # a run from before organ crops
            continue
        if old[key] != new[key]:
            raise ToolkitError(f"cannot resume run '{run_dir.name}': {key} was {old[key]}, now {new[key]}")
    for key, value in new["train"].items():
        if old["train"].get(key) != value:
            raise ToolkitError(
                f"cannot resume run '{run_dir.name}': train.{key} was {old['train'].get(key)}, now {value}; "
                "use the same settings or --force"
            )
    return folder.read_info() if folder.exists else None


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the duration (restored after)."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@contextlib.contextmanager
def _collect_only_new_objects() -> Iterator[None]:
    """``gc.freeze`` for the duration: full garbage collections skip the objects alive now.

    accelerate's ``free_memory`` after each fold runs a full ``gc.collect``; walking the half million
    objects that importing torch, timm and pandas creates made that 0.3 s a fold (7% of a demo fold).
    What a fold leaves behind is still collected; the frozen objects are unfrozen after.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ------------------------------------------------------------------ main
def train_run(
    ws: Workspace,
    cfg: Config,
    name: str | None = None,
    organs: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    hooks: TrainHooks | None = None,
    reporter: Reporter | None = None,
    train_patients: Collection[int] | None = None,
    only_folds: Collection[int] | None = None,
) -> Path:
    """Train every (organ, fold) of one run and write the run folder (see module docstring).

    Parameters
    ----------
    ws : Workspace
        Reads ``store/`` and ``synthetic/<organ>/``, writes ``runs/<name>/``.
    cfg : Config
        ``cfg.train`` (and ``cfg.data.windows``, ``cfg.seed``).
    name : str, optional
        Run folder name; default ``real-only`` (r = 0) or ``synthetic-<r>``.
    organs : list of str, optional
        Default: all five.
    resume : bool
        Continue an interrupted run: finished folds are kept, a fold cut short continues
        from its last completed epoch.
    force : bool
        Delete an existing run of that name first.
    hooks : TrainHooks, optional
        Callbacks into the training loop.
    reporter : Reporter, optional
        Progress (one bar per organ and fold) and messages; default: the logging reporter.
    train_patients : collection of int, optional
        Use only these train-split patients, for training *and* validation (a study's real-data
        fraction: with less real data a researcher also validates on less). The test set is unchanged,
        so runs with different subsets are scored on the same patients. Default: every one.
    only_folds : collection of int, optional
        Train only these folds (the others are trained by other calls, e.g. another study shard).
        An organ's tables (``test_patients.csv`` ...) are written once all of its folds are done.

    Returns
    -------
    Path
        The run folder.
    """
    from accelerate import Accelerator

    cfg = validate(cfg)  # the checks load_config ran, for a Config built in code
    tc = cfg.train
    organs = list(organs or ORGANS)
    unknown = [o for o in organs if o not in ORGANS]
    if unknown:
        raise ToolkitError(f"unknown organ '{unknown[0]}'; choose from {', '.join(ORGANS)}")
    name = name or default_run_name(tc.synthetic_ratio)
    if not (ws.store_dir / MANIFEST_FILE).exists():
        raise ToolkitError(f"no slice store in {ws.store_dir}: run `toolkit prepare` first")
    store = SliceSet.load(ws.store_dir)
    check_store(store, organs, ws.store_dir)
    check_image_sizes(cfg, store.size[0], ws.store_dir, "train")
    n_folds, fold_of = resolve_folds(store.table, tc.folds)
    split_hash = store.meta.get("split_hash")
    is_test = store.table["split"].to_numpy() == "test"
    is_train = ~is_test
    if train_patients is not None:
        is_train &= np.isin(store.table["patient_id"].to_numpy(), np.fromiter(train_patients, np.int64))
        if not is_train.any():
            raise ToolkitError(f"none of the {len(train_patients)} train_patients is a train-split patient of "
                               f"{ws.store_dir}; pass ids from its manifest.csv patient_id column")
    folds_to_train = range(n_folds) if only_folds is None else sorted(set(only_folds))
    if any(not 0 <= k < n_folds for k in folds_to_train):
        raise ToolkitError(f"only_folds {list(folds_to_train)} must lie in 0..{n_folds - 1} (the run's folds)")

    try:
        accelerator = Accelerator(mixed_precision=tc.mixed_precision)
    except ValueError as exc:
        raise ToolkitError(f"train.mixed_precision: {str(exc).splitlines()[0]}") from None
    main = accelerator.is_main_process

    # Each organ's settings with the input it really reads (train.input crops: slices for bowel/extravasation).
    organ_cfgs = {o: organ_config(cfg, o) for o in organs}
    organ_cfgs = {o: dataclasses.replace(c, train=dataclasses.replace(c.train, input=organ_input(cfg, o)))
                  for o, c in organ_cfgs.items()}
    crop_sets = {o: load_crop_set(ws.store_dir, o) for o in organs if organ_cfgs[o].train.input == "crops"}
    check_crop_sizes(organ_cfgs, crop_sets)
    inputs = {o: crop_record(crop_sets[o], ws.store_dir) if o in crop_sets else {"input": "slices"} for o in organs}
    pools: dict[str, SyntheticPool] = {}
    if tc.synthetic_ratio > 0:
        pools = {
            o: load_synthetic_pool(
                ws, o, split_hash, organ_cfgs[o].train.image_size, cfg.data.windows,
                allow_resize=organ_cfgs[o].train.synthetic_resize, reporter=reporter,
                input_id=crop_sets[o].crop_id if o in crop_sets else "slices", crops=crop_sets.get(o),
            )
            for o in organs
        }

    folder = RunFolder(ws.run_dir(name))
    previous = _open_run_dir(folder, cfg, resume, force, main)
    accelerator.wait_for_everyone()
    info = RunInfo.from_config(
        name,
        cfg,
        split_hash=split_hash,
        folds=n_folds,
        organs=[o for o in ORGANS if o in set(organs) | set(previous.organs if previous else [])],
        organ_train={o: c.train for o, c in organ_cfgs.items()},
        generators={o: p.info for o, p in pools.items()},
        inputs=inputs,
    )
    if previous is not None:  # keep the records of organs trained earlier
        info.generators = {**previous.generators, **info.generators}
        info.settings = {**previous.settings, **info.settings}
        info.inputs = {**previous.inputs, **info.inputs}
    if main:
        folder.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder.config_path)
        folder.write_info(info)

    table = store.table
    # Stored slices resized once per image size (train + test rows of the memory-mapped store).
    allowed = None if train_patients is None else np.fromiter(train_patients, np.int64)
    # The patients each organ's tables cover: the test set and the training patients the run may use.
    scored = table if allowed is None else table[(table["split"] == "test") | table["patient_id"].isin(allowed)]
    resized: dict[int, np.ndarray] = {}
    position = series_position(table["series_id"].to_numpy(), table["z"].to_numpy())

    with _deterministic(accelerator.device.type == "cpu"), _collect_only_new_objects(), \
            as_reporter(reporter).progress() as progress:
        for organ in organs:
            ocfg = organ_cfgs[organ]
            otc = ocfg.train
            if organ in crop_sets:
                data_o = crop_data(crop_sets[organ], otc.image_size, n_folds, inputs[organ])
            else:
                if otc.image_size not in resized:
                    resized[otc.image_size] = resize_hu(store.images, otc.image_size)
                labels = store.labels(organ, "slice")
                data_o = OrganData(table, resized[otc.image_size], labels, labels.astype(np.float32), fold_of,
                                   position, inputs[organ])
            split = data_o.table["split"].to_numpy()
            is_train = split == "train"
            if allowed is not None:  # a study's real-data fraction: fewer training and validation patients
                is_train &= np.isin(data_o.table["patient_id"].to_numpy(), allowed)
            test_rows = np.flatnonzero(split == "test")  # the test set never changes
            features = FrozenFeatures(otc.feature_cache_mb * 2**20)  # shared by the organ's folds
            for k in folds_to_train:
                fold = folder.fold(organ, k)
                if fold.done:
                    continue
                data = fold_data(cfg, ocfg, organ, k, data_o, is_train, test_rows, pools.get(organ), features)
                train_fold(accelerator, ocfg, data, fold, ORGANS.index(organ), progress, hooks)
            if main and all(folder.fold(organ, k).done for k in range(n_folds)):
                write_organ_outputs(folder, organ, data_o.table, n_folds, otc.aggregate, otc.top_k,
                                    patients=scored, reporter=reporter)
                plot_learning_curve(folder, organ, n_folds)
            accelerator.wait_for_everyone()

    if main:
        info.complete = all(folder.has_table(o, "test_patients") for o in info.organs)
        folder.write_info(info)
    return folder.path


def fold_data(
    cfg: Config,
    ocfg: Config,
    organ: str,
    k: int,
    data: OrganData,
    is_train: np.ndarray,
    test_rows: np.ndarray,
    pool: SyntheticPool | None,
    features: FrozenFeatures | None = None,
) -> FoldData:
    """Fold ``k``'s training epochs (the balancer over real and synthetic rows), validation and test sets.

    Parameters
    ----------
    cfg, ocfg : Config
        The run's config (seed, synthetic ratio) and the organ's resolved one (``train.organs`` applied).
    data : OrganData
        What the organ reads (stored slices or its crops).
    is_train : ndarray of shape (n,), dtype=bool
        Rows of training patients the run may use (a study's fraction restricts them).
    test_rows : ndarray of int
        The test set, the same for every fold and run.
    pool : SyntheticPool, optional
        The organ's synthetic slices; only mixed into the training epochs.
    features : FrozenFeatures, optional
        The organ's kept front features of validation and test batches (:mod:`train.frozen`).
    """
    otc = ocfg.train
    train_rows = np.flatnonzero(is_train & (data.fold_of != k))
    val_rows = np.flatnonzero(is_train & (data.fold_of == k))
    _check_rows(organ, k, data, val_rows, test_rows)
    if pool is not None:  # lesion crops drawn into a validation (or test) patient's anatomy stay out of this fold
        pool = pool.for_patients(data.table["patient_id"].to_numpy()[train_rows])
    balancer = Balancer(
        train_rows,
        data.labels[train_rows],
        None if pool is None else pool.labels,
        epoch_size=otc.epoch_size,
        ratio=cfg.train.synthetic_ratio,
        seed=cfg.seed,
        fold=k,
        max_repeat=otc.synthetic_max_repeat,
        organ=organ,
        near_copy_fraction=0.0 if pool is None else pool.near_copy_fraction,
        real_position=data.position[train_rows],
        matched_negatives=otc.matched_negatives,
        real_targets=data.targets[train_rows],
        synthetic_pairs=pool.twins if pool is not None and otc.synthetic_pairs else None,
    )
    return FoldData(
        organ=organ,
        fold=k,
        train_set=BalancedEpochDataset(data.images, None if pool is None else pool.images, balancer, cfg.seed),
        val_set=_real_set(data.images, val_rows, data.labels),
        test_set=_real_set(data.images, test_rows, data.labels),
        table=data.table,
        features=features,
    )


def _check_rows(organ: str, k: int, data: OrganData, val_rows: np.ndarray, test_rows: np.ndarray) -> None:
    """A validation fold or a test set without any row of the organ (a localizer that found it nowhere there)."""
    if len(val_rows) and len(test_rows):
        return
    what = f"validation fold {k}" if not len(val_rows) else "the test split"
    if data.record["input"] == "crops":
        raise DataError(
            f"{what} holds no {organ} crop: the organ localizer found no {organ} in any of its series; check "
            f"`toolkit segment`'s Dice (segment.epochs) or train {organ} on whole slices (--set train.input=slices)"
        )
    raise DataError(f"{what} holds no {organ} slice; re-run `toolkit prepare --force`")


def crop_data(crops: CropSet, image_size: int, n_folds: int, record: dict[str, Any]) -> OrganData:
    """An organ's crop set as training rows: crops resized, hard labels, soft targets, folds, levels."""
    table = crops.table
    # Both kidneys of a slice share its level: the position is ranked within series and side.
    series_side = table["series_id"].astype(str) + "/" + table["side"].astype(str)
    return OrganData(
        table=table,
        images=resize_hu(crops.images, image_size),
        labels=crops.hard_labels,
        targets=crops.targets,
        fold_of=merged_folds(table, n_folds),
        position=series_position(series_side.to_numpy(), table["z"].to_numpy()),
        record=record,
    )


def _real_set(real: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> SliceDataset:
    return SliceDataset(real, None, np.full(len(rows), REAL, np.int8), rows, labels[rows].astype(np.float32))


# ------------------------------------------------------------------ outputs
def _patient_truth(table: pd.DataFrame, organ: str) -> pd.DataFrame:
    grade = table.groupby("patient_id")[f"{organ}_patient"].max().astype(np.int64)
    return pd.DataFrame({"label": (grade > 0).astype(np.int64), "grade": grade})


def write_organ_outputs(
    folder: RunFolder,
    organ: str,
    table: pd.DataFrame,
    n_folds: int,
    aggregate: str,
    top_k: int,
    patients: pd.DataFrame | None = None,
    reporter: Reporter | None = None,
) -> None:
    """Gather the folds' prediction files into the organ's slice- and patient-level tables.

    Parameters
    ----------
    folder : RunFolder
        Reads ``<organ>/fold_<k>/{val,test}_predictions.csv``, writes the organ's tables.
    organ : str
    table : DataFrame
        The rows the predictions' ``row`` index: the store's manifest or the organ's crop set's.
    n_folds : int
    aggregate, top_k
        The organ's slice-to-patient rule (:func:`train.inference.patient_scores`).
    patients : DataFrame, optional
        The store's manifest (``patient_id``, ``split``, ``fold``, ``<organ>_patient``: the patient truth).
        Every test patient and every training patient's validation fold then gets a score: 0 for a
        patient without any scored row (no crop of the organ), so the tables cover the same patients
        whatever a run read. Default: ``table``.
    reporter : Reporter, optional
        Warns of patients scored 0 that way.
    """
    folds = [folder.fold(organ, k) for k in range(n_folds)]
    val = pd.concat([f.read_predictions("val") for f in folds])
    test = pd.concat([f.read_predictions("test") for f in folds])
    store_table = table if patients is None else patients
    truth = _patient_truth(store_table, organ)

    val = val.sort_values(["fold", "row"])
    folder.write_table(organ, "oof", val)
    test = test.sort_values(["row", "fold"])
    folder.write_table(organ, "test_folds", test)
    ensemble = test.groupby("row", sort=True).agg(
        patient_id=("patient_id", "first"),
        series_id=("series_id", "first"),
        instance=("instance", "first"),
        label=("label", "first"),
        prob=("prob", "mean"),
    )
    folder.write_table(organ, "test_slices", ensemble.reset_index(), extra=("row",))  # row: two kidney crops a slice

    prob = patient_scores(ensemble, aggregate, top_k)
    per_fold = patient_scores(test, aggregate, top_k, by=("patient_id", "fold")).unstack("fold")
    test_ids = np.unique(store_table.loc[store_table["split"] == "test", "patient_id"].to_numpy())
    unscored = np.setdiff1d(test_ids, prob.index.to_numpy())
    if len(unscored):
        as_reporter(reporter).warn(
            f"{organ}: {len(unscored)} test patient(s) have no {organ} crop (the localizer found no {organ}; first: "
            f"{int(unscored[0])}); they score 0"
        )
    prob = prob.reindex(test_ids, fill_value=0.0)
    per_fold = per_fold.reindex(test_ids).fillna(0.0)
    patients = truth.loc[prob.index].assign(prob=prob)
    fold_columns = [f"prob_fold_{k}" for k in range(n_folds)]
    for k, column in enumerate(fold_columns):
        patients[column] = per_fold[k]
    folder.write_table(organ, "test_patients", patients.rename_axis("patient_id").reset_index(), extra=fold_columns)

    oof = patient_scores(val, aggregate, top_k, by=("patient_id", "fold")).rename("prob")
    is_train = store_table["split"] == "train"
    train_fold = store_table[is_train].groupby("patient_id")["fold"].first() % n_folds
    expected = pd.MultiIndex.from_arrays([train_fold.index, train_fold.to_numpy()], names=["patient_id", "fold"])
    oof = oof.reindex(expected.sort_values(), fill_value=0.0).reset_index()
    folder.write_table(organ, "oof_patients", oof.join(truth, on="patient_id"))


def plot_learning_curve(folder: RunFolder, organ: str, n_folds: int) -> Path:
    """``learning_curve.png``: train/val loss and validation slice and patient AUC per epoch, one colour per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    for k in range(n_folds):
        metrics = folder.fold(organ, k).read_metrics()
        color = f"C{k}"
        ax_loss.plot(metrics["epoch"], metrics["train_loss"], "--", color=color, label=f"fold {k} train")
        ax_loss.plot(metrics["epoch"], metrics["val_loss"], "-", color=color, label=f"fold {k} val")
        ax_auc.plot(metrics["epoch"], metrics["val_auc"], "-o", color=color, label=f"fold {k} slice")
        if "val_patient_auc" in metrics:
            ax_auc.plot(metrics["epoch"], metrics["val_patient_auc"], ":s", color=color, label=f"fold {k} patient")
    ax_loss.set(xlabel="epoch", ylabel="BCE loss", title=f"{organ}: loss")
    ax_auc.set(xlabel="epoch", ylabel="AUC", title=f"{organ}: validation AUC (slice, patient)", ylim=(0, 1))
    ax_loss.legend(fontsize=7)
    ax_auc.legend(fontsize=7)
    fig.tight_layout()
    path = folder.learning_curve_path(organ)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class OrganSummary:
    organ: str
    patients: int
    injured: int
    ensemble_auc: float
    mean_fold_auc: float


def summarize_run(run_dir: Path) -> list[OrganSummary]:
    """Patient-level test AUC of the fold ensemble and the mean single-fold AUC, per organ."""
    folder = RunFolder(run_dir)
    out = []
    for organ in folder.read_info().organs:
        df = folder.read_table(organ, "test_patients", required=False)
        if df is None:
            continue
        fold_cols = [c for c in df.columns if c.startswith("prob_fold_")]
        fold_aucs = [binary_auc(df["label"], df[c]) for c in fold_cols]
        out.append(
            OrganSummary(
                organ=organ,
                patients=len(df),
                injured=int(df["label"].sum()),
                ensemble_auc=binary_auc(df["label"], df["prob"]),
                mean_fold_auc=float(np.mean(fold_aucs)) if fold_aucs else float("nan"),
            )
        )
    return out

