"""``toolkit train``: one classifier per organ and fold, fold ensembles on the test set.

Folds
-----
The store's ``fold`` column (patient-grouped, computed once by ``prepare``) defines the
folds. ``cfg.train.folds = K`` smaller than the store's fold count merges them as
``fold % K`` (patients stay grouped: whole store folds move together); a larger ``K`` is
refused. For fold ``k`` the classifier trains on the real slices of every other fold
(+ synthetic slices, see :mod:`train.balancer`), early-stops on fold ``k``'s slices, and
finally scores every test slice.

Output (read by ``toolkit compare``; do not change without it)::

    runs/<name>/config.yaml            resolved config
    runs/<name>/run.json               name, split_hash, synthetic_ratio, seed, folds, organs, model,
                                       image_size, windows, epoch_size, epochs, generators, complete
    runs/<name>/<organ>/fold_<k>/model.safetensors + config.json      best checkpoint of fold k
    runs/<name>/<organ>/fold_<k>/metrics.csv    epoch, train_loss, val_loss, val_auc, lr, seconds, slices_per_s
    runs/<name>/<organ>/learning_curve.png      train/val loss and val AUC per epoch, one line per fold
    runs/<name>/<organ>/oof.csv                 patient_id, series_id, instance, fold, label, prob
    runs/<name>/<organ>/test_folds.csv          patient_id, series_id, instance, label, fold, prob
    runs/<name>/<organ>/test_slices.csv         patient_id, series_id, instance, label, prob (mean over folds)
    runs/<name>/<organ>/test_patients.csv       patient_id, label, grade, prob, prob_fold_0..prob_fold_{K-1}
    runs/<name>/<organ>/oof_patients.csv        patient_id, fold, label, grade, prob

Slice files use the slice label; patient files the patient label (``<organ>_patient > 0``)
and grade. A patient's ``prob`` aggregates its slice probabilities (``cfg.train.aggregate``:
max, or mean of the ``top_k`` highest); in ``test_patients.csv`` it aggregates the
ensemble slice probabilities, ``prob_fold_k`` those of fold ``k`` alone.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from toolkit import ORGANS
from toolkit.artifacts.synthetic import SyntheticSet
from toolkit.config import Config, organ_config, save_config, validate
from toolkit.errors import ToolkitError
from toolkit.reporting import Reporter, as_reporter
from toolkit.sliceset import MANIFEST_FILE, SliceSet
from toolkit.workspace import Workspace
from train.balancer import REAL, Balancer, series_position
from train.data import BalancedEpochDataset, SliceDataset, resize_hu
from train.engine import DONE_FILE, FoldData, TrainHooks, binary_auc, train_fold
from train.inference import patient_scores

RUN_FILE = "run.json"
# Settings a resumed run must share with the interrupted one (else its folds would differ).
_RESUME_IGNORES = ("num_workers",)


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
    return k, np.where(store_fold >= 0, store_fold % k, -1)


# ------------------------------------------------------------------ synthetic pool
@dataclass
class SyntheticPool:
    """The usable synthetic slices of one organ (near copies removed), resized for training."""

    images: np.ndarray  # (n, S, S) int16 HU
    labels: np.ndarray  # (n,) int64
    near_copy_fraction: float
    info: dict[str, Any]  # generator_id, synthetic_dir, audit (run.json "generators")


def load_synthetic_pool(
    ws: Workspace,
    organ: str,
    split_hash: str | None,
    image_size: int,
    windows: list[list[float]],
    allow_resize: bool = False,
    reporter: Reporter | None = None,
) -> SyntheticPool:
    """Read ``synthetic/<organ>/`` and refuse a set made for another split, window or (unless
    ``allow_resize``, i.e. ``train.synthetic_resize``) image size; see ``SyntheticSet.check_compatible``."""
    directory = ws.synthetic_dir(organ)
    if not (directory / MANIFEST_FILE).exists():
        raise ToolkitError(
            f"no synthetic slices for {organ} in {directory}: run `toolkit gen --organ {organ}` "
            "or pass --synthetic-ratio 0"
        )
    synthetic = SyntheticSet.load(directory)
    resize = synthetic.check_compatible(
        organ=organ, split_hash=split_hash, windows=windows, image_size=image_size, allow_resize=allow_resize
    )
    near = synthetic.near_copy
    keep = np.flatnonzero(~near)
    audit_path = directory / "audit.json"
    info = {
        "generator_id": synthetic.generator_id,
        "synthetic_dir": str(directory),
        "audit": json.loads(audit_path.read_text()) if audit_path.exists() else None,
    }
    if resize:
        info["resized"] = {"from": int(synthetic.image_size), "to": int(image_size)}
        as_reporter(reporter).warn(
            f"{organ}: synthetic slices made at {synthetic.image_size} px are resized to {image_size} px "
            "for training (train.synthetic_resize)"
        )
    return SyntheticPool(
        images=resize_hu(synthetic.slices.images, image_size, keep),
        labels=(synthetic.classes[keep] > 0).astype(np.int64),
        near_copy_fraction=float(near.mean()) if len(near) else 0.0,
        info=info,
    )


# ------------------------------------------------------------------ run folder
def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in cfg_dict["train"].items() if k not in _RESUME_IGNORES}
    return {"seed": cfg_dict["seed"], "windows": cfg_dict["data"]["windows"], "train": train}


def _open_run_dir(run_dir: Path, cfg: Config, resume: bool, force: bool, main: bool = True) -> list[str]:
    """Check that ``run_dir`` may be (re)used; return the organs an interrupted run already listed.

    Every process runs the checks (so all raise alike); only the ``main`` one deletes.
    """
    if resume and force:
        raise ToolkitError("pass either --resume (continue the run) or --force (start it over), not both")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return []
    if force:
        if main:
            shutil.rmtree(run_dir)
        return []
    if not resume:
        raise ToolkitError(
            f"run '{run_dir.name}' already exists in {run_dir.parent}: pass --resume to continue it, "
            "--force to overwrite it, or --name to start another"
        )
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else None
    if saved is None:
        raise ToolkitError(f"{run_dir} has no config.yaml to resume from; pass --force to start it over")
    old, new = _comparable(saved), _comparable(cfg.to_dict())
    for key in ("seed", "windows"):
        if old[key] != new[key]:
            raise ToolkitError(f"cannot resume run '{run_dir.name}': {key} was {old[key]}, now {new[key]}")
    for key, value in new["train"].items():
        if old["train"].get(key) != value:
            raise ToolkitError(
                f"cannot resume run '{run_dir.name}': train.{key} was {old['train'].get(key)}, now {value}; "
                "use the same settings or --force"
            )
    run = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).exists() else {}
    return list(run.get("organs", []))


def _write_run_json(run_dir: Path, info: dict[str, Any]) -> None:
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(run_dir / RUN_FILE)


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


# ------------------------------------------------------------------ main
def train_run(
    ws: Workspace,
    cfg: Config,
    name: str | None = None,
    organs: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    hooks: TrainHooks | None = None,
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

    Returns
    -------
    Path
        The run folder.
    """
    from accelerate import Accelerator

    from toolkit.cli_common import make_progress

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
    n_folds, fold_of = resolve_folds(store.table, tc.folds)
    split_hash = store.meta.get("split_hash")

    try:
        accelerator = Accelerator(mixed_precision=tc.mixed_precision)
    except ValueError as exc:
        raise ToolkitError(f"train.mixed_precision: {str(exc).splitlines()[0]}") from None
    main = accelerator.is_main_process

    organ_cfgs = {o: organ_config(cfg, o) for o in organs}
    pools: dict[str, SyntheticPool] = {}
    if tc.synthetic_ratio > 0:
        pools = {
            o: load_synthetic_pool(
                ws, o, split_hash, organ_cfgs[o].train.image_size, cfg.data.windows,
                allow_resize=organ_cfgs[o].train.synthetic_resize,
            )
            for o in organs
        }

    run_dir = ws.run_dir(name)
    previous_organs = _open_run_dir(run_dir, cfg, resume, force, main)
    accelerator.wait_for_everyone()
    listed = [o for o in ORGANS if o in set(organs) | set(previous_organs)]
    info = {
        "name": name,
        "split_hash": split_hash,
        "synthetic_ratio": tc.synthetic_ratio,
        "seed": cfg.seed,
        "folds": n_folds,
        "organs": listed,
        "model": tc.model,
        "image_size": tc.image_size,
        "windows": cfg.data.windows,
        "epoch_size": tc.epoch_size,
        "epochs": tc.epochs,
        "generators": {o: p.info for o, p in pools.items()},
        "complete": False,
    }
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / RUN_FILE).exists():  # keep generator records of organs trained earlier
            info["generators"] = {**json.loads((run_dir / RUN_FILE).read_text()).get("generators", {}),
                                  **info["generators"]}
        save_config(cfg, run_dir / "config.yaml")
        _write_run_json(run_dir, info)

    table = store.table
    is_train = table["split"].to_numpy() == "train"
    test_rows = np.flatnonzero(~is_train)
    # Resize every needed slice once per image size (train + test rows of the memory-mapped store).
    resized: dict[int, np.ndarray] = {}
    position = series_position(table["series_id"].to_numpy(), table["z"].to_numpy())

    with _deterministic(accelerator.device.type == "cpu"), make_progress() as progress:
        for organ in organs:
            ocfg = organ_cfgs[organ]
            otc = ocfg.train
            if otc.image_size not in resized:
                resized[otc.image_size] = resize_hu(store.images, otc.image_size)
            real = resized[otc.image_size]
            organ_dir = run_dir / organ
            labels = store.labels(organ, "slice")
            pool = pools.get(organ)
            for k in range(n_folds):
                fold_dir = organ_dir / f"fold_{k}"
                if (fold_dir / DONE_FILE).exists():
                    continue
                train_rows = np.flatnonzero(is_train & (fold_of != k))
                val_rows = np.flatnonzero(is_train & (fold_of == k))
                balancer = Balancer(
                    train_rows,
                    labels[train_rows],
                    None if pool is None else pool.labels,
                    epoch_size=otc.epoch_size,
                    ratio=tc.synthetic_ratio,
                    seed=cfg.seed,
                    fold=k,
                    max_repeat=otc.synthetic_max_repeat,
                    organ=organ,
                    near_copy_fraction=0.0 if pool is None else pool.near_copy_fraction,
                    real_position=position[train_rows],
                    matched_negatives=otc.matched_negatives,
                )
                data = FoldData(
                    organ=organ,
                    fold=k,
                    train_set=BalancedEpochDataset(real, None if pool is None else pool.images, balancer, cfg.seed),
                    val_set=_real_set(real, val_rows, labels),
                    test_set=_real_set(real, test_rows, labels),
                    table=table,
                )
                train_fold(accelerator, ocfg, data, fold_dir, ORGANS.index(organ), progress, hooks)
            if main:
                write_organ_outputs(organ_dir, organ, table, n_folds, otc.aggregate, otc.top_k)
                plot_learning_curve(organ_dir, organ, n_folds)
            accelerator.wait_for_everyone()

    if main:
        info["complete"] = all((run_dir / o / "test_patients.csv").exists() for o in listed)
        _write_run_json(run_dir, info)
    return run_dir


def _real_set(real: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> SliceDataset:
    return SliceDataset(real, None, np.full(len(rows), REAL, np.int8), rows, labels[rows].astype(np.float32))


# ------------------------------------------------------------------ outputs
def _patient_truth(table: pd.DataFrame, organ: str) -> pd.DataFrame:
    grade = table.groupby("patient_id")[f"{organ}_patient"].max().astype(np.int64)
    return pd.DataFrame({"label": (grade > 0).astype(np.int64), "grade": grade})


def write_organ_outputs(
    organ_dir: Path, organ: str, table: pd.DataFrame, n_folds: int, aggregate: str, top_k: int
) -> None:
    """Gather the folds' prediction files into the organ's slice- and patient-level CSVs."""
    folds = range(n_folds)
    val = pd.concat([pd.read_csv(organ_dir / f"fold_{k}" / "val_predictions.csv") for k in folds])
    test = pd.concat([pd.read_csv(organ_dir / f"fold_{k}" / DONE_FILE) for k in folds])
    truth = _patient_truth(table, organ)
    keys = ["patient_id", "series_id", "instance"]

    val = val.sort_values(["fold", "row"])
    val[[*keys, "fold", "label", "prob"]].to_csv(organ_dir / "oof.csv", index=False)
    test = test.sort_values(["row", "fold"])
    test[[*keys, "label", "fold", "prob"]].to_csv(organ_dir / "test_folds.csv", index=False)
    ensemble = test.groupby("row", sort=True).agg(
        patient_id=("patient_id", "first"),
        series_id=("series_id", "first"),
        instance=("instance", "first"),
        label=("label", "first"),
        prob=("prob", "mean"),
    )
    ensemble[[*keys, "label", "prob"]].to_csv(organ_dir / "test_slices.csv", index=False)

    prob = patient_scores(ensemble, aggregate, top_k)
    per_fold = patient_scores(test, aggregate, top_k, by=("patient_id", "fold")).unstack("fold")
    patients = truth.loc[prob.index].assign(prob=prob)
    for k in folds:
        patients[f"prob_fold_{k}"] = per_fold[k]
    patients.rename_axis("patient_id").reset_index().to_csv(organ_dir / "test_patients.csv", index=False)

    oof = patient_scores(val, aggregate, top_k, by=("patient_id", "fold")).rename("prob").reset_index()
    oof = oof.join(truth, on="patient_id")[["patient_id", "fold", "label", "grade", "prob"]]
    oof.to_csv(organ_dir / "oof_patients.csv", index=False)


def plot_learning_curve(organ_dir: Path, organ: str, n_folds: int) -> Path:
    """``learning_curve.png``: train/val loss and validation slice and patient AUC per epoch, one colour per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    for k in range(n_folds):
        metrics = pd.read_csv(organ_dir / f"fold_{k}" / "metrics.csv")
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
    path = organ_dir / "learning_curve.png"
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
    run = json.loads((Path(run_dir) / RUN_FILE).read_text())
    out = []
    for organ in run["organs"]:
        path = Path(run_dir) / organ / "test_patients.csv"
        if not path.exists():
            continue
        df = pd.read_csv(path)
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

