"""``toolkit explain``: Grad-CAM heat maps of a run's fold ensemble on test slices.

For each run the heat map of every fold model (Grad-CAM of the injury logit on
the last convolution with a map of at least 7 pixels, :func:`last_conv`) is
computed on the same test slices, normalised to [0, 1] per slice and averaged
over folds. Where ground-truth masks exist (the
built-in phantom writes ``data/phantom_truth/<series_id>.npz``) we score, per
slice, the share of heat inside the organ and inside the injury, against the
share of the image those masks cover (what a uniform heat map would score), and
the pointing game: is the hottest pixel inside the mask?

A run whose classifiers read organ crops (run.json ``inputs``; kidney, liver and spleen
by default) is explained on test crops of the organ's crop set: heat inside the organ
mask of the crop (the localizer's organ, ``masks.npy`` of the crop set) and inside the
injury (the truth cut to the crop's box), so the figures say whether the classifier looks
at the organ it was shown.

Outputs per run: ``reports/explain-<run>-<organ>/`` with one overlay PNG per
slice, ``explain.json``, ``explain.md`` and ``config.yaml``. With several runs a
side-by-side grid lands in ``reports/explain-<organ>-compare/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from eval.runs import load_run
from toolkit import ORGANS
from toolkit.artifacts.crops import CropSet, load_crop_set
from toolkit.config import Config, save_config
from toolkit.errors import DataError, ToolkitError
from toolkit.sliceset import FIELD_COLUMNS, SliceSet
from toolkit.transforms import window_hu
from toolkit.workspace import Workspace

TRUTH_DIR = "phantom_truth"


# --------------------------------------------------------------------------- selection + truth


def select_slices(store: SliceSet, organ: str, n: int, seed: int, visible: np.ndarray | None = None) -> np.ndarray:
    """Row indices of ``n`` test slices, injured first, in a seeded random order within each tier.

    Tiers: slices whose ground truth shows the injury (``visible``, when truth exists), then
    the other slices labelled injured (for kidney/liver/spleen a slice inherits its patient's
    label, so many show no lesion), then healthy slices.
    """
    table = store.table
    if "split" not in table.columns or organ not in table.columns:
        raise ToolkitError(f"store manifest lacks 'split' or '{organ}'; re-run `toolkit prepare`")
    test = table["split"].to_numpy() == "test"
    if not test.any():
        raise ToolkitError("the store has no test slices; re-run `toolkit prepare` with data.test_fraction > 0")
    injured = table[organ].to_numpy() > 0
    visible = np.zeros(len(table), bool) if visible is None else np.asarray(visible, bool)
    rng = np.random.default_rng(seed)
    tiers = [test & visible, test & injured & ~visible, test & ~injured & ~visible]
    return np.concatenate([rng.permutation(np.flatnonzero(tier)) for tier in tiers])[:n].astype(np.int64)


def truth_code(truth: Any, path: Path, organ: str) -> int | None:
    """``organ``'s label code in a truth file, from the file's own legend; None when it has no such label.

    A truth file names its codes in two arrays, ``code_names`` (str) and ``codes`` (int), so that
    masks from any source (the phantom, a segmentation tool) are read by the same rule.
    """
    if "code_names" not in truth or "codes" not in truth:
        raise DataError(
            f"{path} has no 'code_names'/'codes' legend for its masks; rewrite the phantom with "
            "`toolkit demo-data --force` (same seed: same images, the store and runs stay valid)"
        )
    legend = dict(zip(np.asarray(truth["code_names"]).tolist(), np.asarray(truth["codes"]).tolist(), strict=True))
    return None if organ not in legend else int(legend[organ])


def injury_visible(data_dir: Path, table: pd.DataFrame, organ: str, rows: np.ndarray) -> np.ndarray | None:
    """Bool per store row: does the ground truth show ``organ``'s injury on that slice? None without truth."""
    truth_dir = data_dir / TRUTH_DIR
    if not truth_dir.is_dir():
        return None
    out = np.zeros(len(table), bool)
    sub = table.iloc[rows]
    for series_id, part in sub.groupby("series_id"):
        path = truth_dir / f"{int(series_id)}.npz"
        if not path.exists():
            continue
        with np.load(path) as truth:
            code = truth_code(truth, path, organ)
            if code is None:
                continue
            has = (truth["injury"] == code).any(axis=(1, 2))
            by_instance = dict(zip(truth["instance_number"].tolist(), has.tolist(), strict=True))
        out[part.index.to_numpy()] = [by_instance.get(int(i), False) for i in part["instance"]]
    return out


def resize_mask(mask: np.ndarray, size: int, field: tuple[int, int, int] | None = None) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) label mask to (size, size), cut as the store cut its slice.

    ``field`` is the slice's (field_top, field_left, field_side) from the manifest; None: the whole
    image padded square (stores without the columns).
    """
    from toolkit.data.dicom import centred_field, cut_field

    mask = np.asarray(mask)
    mask = cut_field(mask, field or centred_field(*mask.shape), fill=0)
    h = mask.shape[0]
    idx = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    return mask[np.ix_(idx, idx)]


def load_truth(data_dir: Path, rows: pd.DataFrame, organ: str, size: int) -> list[dict[str, np.ndarray] | None]:
    """Organ and injury masks (bool, (size, size)) per slice row, None where no truth file/slice/label exists."""
    cache: dict[int, Any] = {}
    out: list[dict[str, np.ndarray] | None] = []
    has_field = all(c in rows.columns for c in FIELD_COLUMNS)
    for j, (series_id, instance) in enumerate(zip(rows["series_id"], rows["instance"], strict=True)):
        series_id = int(series_id)
        if series_id not in cache:
            path = data_dir / TRUTH_DIR / f"{series_id}.npz"
            truth = dict(np.load(path)) if path.exists() else None
            code = None if truth is None else truth_code(truth, path, organ)
            cache[series_id] = None if code is None else (truth, code)
        if cache[series_id] is None:
            out.append(None)
            continue
        truth, code = cache[series_id]
        hit = np.flatnonzero(np.asarray(truth["instance_number"]) == int(instance))
        if len(hit) == 0:
            out.append(None)
            continue
        i = int(hit[0])
        fld = tuple(int(v) for v in rows.iloc[j][list(FIELD_COLUMNS)]) if has_field else None
        out.append(
            {
                "organ": resize_mask(truth["organs"][i] == code, size, fld).astype(bool),
                "injury": resize_mask(truth["injury"][i] == code, size, fld).astype(bool),
            }
        )
    return out


def nearest_resize(masks: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of (n, H, W) masks to (n, size, size) (H = W)."""
    masks = np.asarray(masks)
    idx = np.minimum(((np.arange(size) + 0.5) * masks.shape[-1] / size).astype(np.int64), masks.shape[-1] - 1)
    return masks[:, idx][:, :, idx]


def crop_truth(
    data_dir: Path, crops: CropSet, rows_idx: np.ndarray, organ: str, store_size: int, size: int
) -> list[dict[str, np.ndarray] | None]:
    """Organ and injury masks (bool, (size, size)) of crops: the organ is the crop set's mask (the localizer's
    organ, on real data too), the injury the phantom truth cut to the crop's box (None without truth)."""
    from toolkit.data.dicom import cut_field

    rows = crops.table.iloc[rows_idx].reset_index(drop=True)
    organ_masks = nearest_resize(np.asarray(crops.masks[rows_idx]) > 0, size)
    truth = load_truth(data_dir, rows, organ, store_size)
    out: list[dict[str, np.ndarray] | None] = []
    for i, t in enumerate(truth):
        box = tuple(int(rows.iloc[i][c]) for c in ("crop_top", "crop_left", "crop_side"))
        injury = None if t is None else nearest_resize(cut_field(t["injury"][None].astype(np.uint8), box, 0), size)[0]
        out.append({"organ": organ_masks[i], "injury": np.zeros_like(organ_masks[i]) if injury is None
                    else injury.astype(bool), "has_injury_truth": t is not None})
    return out


# --------------------------------------------------------------------------- CAM


def last_conv(model: nn.Module, image_size: int | None = None, min_side: int = 7) -> nn.Module:
    """Grad-CAM's target: the last ``nn.Conv2d`` whose output map is at least ``min_side`` pixels wide.

    At 224 px this is timm MobileNetV2's ``conv_head`` (7 x 7), the usual choice. At the small
    sizes of a CPU demo the head's map shrinks to 2 x 2 (64 px) or 1 x 1 (32 px), which says
    nothing about *where*; then the last convolution with a map of at least
    ``min(min_side, image_size // 8)`` pixels is used instead. ``image_size=None``: the last Conv2d.
    """
    import torch

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ToolkitError(f"model {type(model).__name__} has no Conv2d layer for Grad-CAM")
    if image_size is None:
        return convs[-1]
    sides: dict[int, int] = {}
    hooks = [
        conv.register_forward_hook(lambda _m, _i, out, k=k: sides.__setitem__(k, int(out.shape[-1])))
        for k, conv in enumerate(convs)
    ]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, convs[0].in_channels, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    want = min(min_side, max(1, image_size // 8))
    wide = [k for k in range(len(convs)) if sides.get(k, 0) >= want]
    return convs[wide[-1]] if wide else convs[-1]


def windowed_inputs(hu: np.ndarray, windows: list, image_size: int) -> np.ndarray:
    """HU slices -> windowed [0, 1] network input before normalisation, as train.inference prepares it.

    Returns
    -------
    ndarray of shape (n, C, image_size, image_size), dtype=float32
    """
    from train.data import resize_hu

    return window_hu(resize_hu(np.asarray(hu), image_size), windows)


def gradcam_maps(models: list[nn.Module], x: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Fold-averaged Grad-CAM of the injury logit.

    Parameters
    ----------
    models : list of nn.Module
        Fold models with one output logit; each is normalised with its own
        ``pretrained_cfg`` mean/std, as in :func:`train.inference.predict_probs`.
    x : ndarray of shape (n, C, S, S)
        Windowed inputs in [0, 1] (:func:`windowed_inputs`).

    Returns
    -------
    ndarray of shape (n, S, S), dtype=float32
        Each fold's map scaled to [0, 1] per slice, then averaged over folds.
    """
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    total = np.zeros((len(x), x.shape[-2], x.shape[-1]), np.float32)
    for model in models:
        # Frozen backbones would give no gradient at the target layer; these are our own copies.
        for p in model.parameters():
            p.requires_grad_(True)
        device = next(model.parameters()).device
        mean = torch.tensor(model.pretrained_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(model.pretrained_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
        layer = last_conv(model, int(x.shape[-1]))
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for start in range(0, len(x), batch_size):
                xb = ((torch.from_numpy(x[start : start + batch_size]) - mean) / std).to(device)
                targets = [ClassifierOutputTarget(0)] * len(xb)
                total[start : start + len(xb)] += cam(input_tensor=xb, targets=targets)
    return total / max(1, len(models))


def localisation(cam: np.ndarray, mask: np.ndarray) -> dict[str, float | bool | None]:
    """Heat share inside ``mask``, the mask's area share, and the pointing-game hit (None if undefined)."""
    if not mask.any():
        return {"mass_share": None, "area_share": 0.0, "hit": None}
    mass = float(cam.sum())
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return {
        "mass_share": float(cam[mask].sum() / mass) if mass > 0 else None,
        "area_share": float(mask.mean()),
        "hit": bool(mask[peak]) if mass > 0 else None,
    }


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over slices (only slices where each figure is defined)."""
    out: dict[str, Any] = {"n_slices": len(records), "mean_prob": _mean([r["prob"] for r in records])}
    for part in ("organ", "injury"):
        out[f"{part}_mass_share"] = _mean([r[part]["mass_share"] for r in records if r.get(part)])
        out[f"{part}_area_share"] = _mean(
            [r[part]["area_share"] for r in records if r.get(part) and r[part]["mass_share"] is not None]
        )
        out[f"{part}_pointing_hit"] = _mean([r[part]["hit"] for r in records if r.get(part)])
        out[f"{part}_n"] = sum(1 for r in records if r.get(part) and r[part]["mass_share"] is not None)
    return out


def lesion_localisation(
    models: list[nn.Module], synthetic: Any, windows: list, image_size: int, n: int, seed: int
) -> dict[str, Any]:
    """Grad-CAM mass inside the inserted lesion masks of up to ``n`` synthetic injured crops (a lesion set).

    Does the classifier look at the lesion drawn into a healthy crop? ``lesion_mass_share`` is the mean
    share of the heat inside the lesion mask, beside ``lesion_area_share`` (the share a uniform map gets).

    Parameters
    ----------
    synthetic : toolkit.artifacts.synthetic.SyntheticSet
        Mode ``lesion``, with ``lesion_masks`` of shape (N, S, S).
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(synthetic))[: int(n)])
    hu = np.asarray(synthetic.slices.images[rows])
    masks = nearest_resize(np.asarray(synthetic.lesion_masks[rows], dtype=np.uint8), image_size) > 0
    cams = gradcam_maps(models, windowed_inputs(hu, windows, image_size))
    found = [localisation(cams[i], masks[i]) for i in range(len(rows))]
    return {
        "lesion_n": sum(1 for f in found if f["mass_share"] is not None),
        "lesion_mass_share": _mean([f["mass_share"] for f in found]),
        "lesion_area_share": _mean([f["area_share"] for f in found if f["mass_share"] is not None]),
        "lesion_pointing_hit": _mean([f["hit"] for f in found]),
        "lesion_generator_id": synthetic.generator_id,
    }


# --------------------------------------------------------------------------- figures


def _overlay_png(path: Path, ct: np.ndarray, cam: np.ndarray, truth: dict[str, np.ndarray] | None, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for k, show_cam in enumerate((False, True)):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(ct, cmap="gray", vmin=0, vmax=1)
        if show_cam:
            ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        if truth is not None:
            for key, color in (("organ", "lime"), ("injury", "red")):
                if truth[key].any():
                    ax.contour(truth[key].astype(float), levels=[0.5], colors=color, linewidths=0.8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _grid_png(path: Path, cts: np.ndarray, cams: dict[str, np.ndarray], rows: pd.DataFrame, organ: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = min(len(cts), 8)
    cols = 1 + len(cams)
    fig = Figure(figsize=(1.9 * cols, 1.9 * n + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(n):
        for j in range(cols):
            ax = fig.add_subplot(n, cols, i * cols + j + 1)
            ax.imshow(cts[i], cmap="gray", vmin=0, vmax=1)
            if j:
                name = list(cams)[j - 1]
                ax.imshow(cams[name][i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
                if i == 0:
                    ax.set_title(name, fontsize=7)
            elif i == 0:
                ax.set_title("CT", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{organ}={int(rows[organ].iloc[i])}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)


def _markdown(run: str, organ: str, summary: dict[str, Any], records: list[dict[str, Any]], has_truth: bool) -> str:
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    lines = [
        f"# Grad-CAM: run '{run}', {organ}",
        "",
        f"{summary['n_slices']} test slices (injured first), fold-averaged Grad-CAM of the injury "
        "logit on the last convolution with a map >= 7 px (conv_head at 224 px). Heat share = "
        "share of the heat map inside the mask; area share = share of the image the mask covers "
        "(what a uniform map would get); pointing hit = "
        "hottest pixel inside the mask.",
        "",
    ]
    if has_truth:
        lines += [
            "| mask | slices | heat share | area share | pointing hit |",
            "|---|---|---|---|---|",
        ]
        for part in ("organ", "injury"):
            lines.append(
                f"| {part} | {summary[f'{part}_n']} | {f(summary[f'{part}_mass_share'])} | "
                f"{f(summary[f'{part}_area_share'])} | {f(summary[f'{part}_pointing_hit'])} |"
            )
    else:
        lines.append("No ground-truth masks (data/phantom_truth/): heat maps only.")
    lines += [
        "",
        "| file | slice label | p(injury) | heat in organ | heat in injury |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['file']} | {r['label']} | {r['prob']:.3f} | "
            f"{f(r['organ']['mass_share'] if r.get('organ') else None)} | "
            f"{f(r['injury']['mass_share'] if r.get('injury') else None)} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point


def explain_runs(
    ws: Workspace,
    cfg: Config,
    runs: list[str],
    organ: str,
    force: bool = False,
    progress: Any | None = None,
) -> dict[str, Any]:
    """Grad-CAM of each run's fold ensemble on the same ``cfg.eval.explain_slices`` test slices of ``organ``.

    Parameters
    ----------
    ws : Workspace
    cfg : Config
    runs : list of str
        Run names (each must hold ``<organ>/fold_*`` models).
    organ : str
    force : bool, default=False
        Replace existing output folders.
    progress : rich.progress.Progress, optional

    Returns
    -------
    dict
        ``n_slices``, ``has_truth``, ``summary`` {run: figures}, ``folders`` (paths written).
    """
    from train.inference import load_fold_models, predict_probs

    if organ not in ORGANS:
        raise ToolkitError(f"unknown organ '{organ}'; choose one of {', '.join(ORGANS)}")
    if not runs:
        raise ToolkitError("no run to explain; pass --runs NAME")
    loaded = [load_run(ws, name) for name in dict.fromkeys(runs)]
    for run in loaded:
        if not run.has_models(organ):
            raise ToolkitError(
                f"run '{run.name}' has no {organ} models in {run.organ_dir(organ)}; train that organ first"
            )
    outs = {r.name: ws.reports_dir / f"explain-{r.name}-{organ}" for r in loaded}
    compare_dir = ws.reports_dir / f"explain-{organ}-compare" if len(loaded) > 1 else None
    for path in [*outs.values(), *([compare_dir] if compare_dir else [])]:
        if path.exists() and not force:
            raise ToolkitError(f"{path} already exists; pass --force to replace it")

    store = SliceSet.load(ws.store_dir)
    store_hash = store.meta.get("split_hash")
    for run in loaded:
        if store_hash is not None and run.info.split_hash not in (None, store_hash):
            raise ToolkitError(
                f"run '{run.name}' was trained on split {run.info.split_hash} but the store has "
                f"{store_hash}; its test slices are not this store's"
            )
    # Every run is explained on the same images: runs that read different inputs cannot be.
    records = {r.name: r.info.input(organ) for r in loaded}
    kinds = {json.dumps({k: v for k, v in rec.items() if k in ("input", "crop_id")}) for rec in records.values()}
    if len(kinds) > 1:
        raise ToolkitError(
            f"runs {', '.join(records)} read different {organ} inputs ({'; '.join(sorted(kinds))}): explain them "
            "one at a time"
        )
    record = next(iter(records.values()))
    lesions = None  # the organ's lesion set, if gen --mode lesion wrote one for these crops
    syn_dir = ws.synthetic_dir(organ)
    if record["input"] == "crops" and (syn_dir / "manifest.csv").exists():
        from toolkit.artifacts.synthetic import SyntheticSet

        found = SyntheticSet.load(syn_dir)
        same_crops = found.provenance.get("input_id") == record.get("crop_id")
        lesions = found if found.mode == "lesion" and same_crops else None
    crops: CropSet | None = None
    if record["input"] == "crops":
        crops = load_crop_set(ws.store_dir, organ)
        if crops.crop_id != record.get("crop_id"):
            raise ToolkitError(
                f"run '{loaded[0].name}' was trained on {organ} crops {record.get('crop_id')} but {crops.path} holds "
                f"{crops.crop_id}: re-run `toolkit crop --force` with the run's crop settings, or retrain"
            )
        source = crops.slices
    else:
        source = store
    test_rows = np.flatnonzero(source.table["split"].to_numpy() == "test") if "split" in source.table else []
    visible = injury_visible(ws.data_dir, source.table, organ, test_rows)
    rows_idx = select_slices(source, organ, int(cfg.eval.explain_slices), cfg.seed, visible)
    rows = source.table.iloc[rows_idx].reset_index(drop=True)
    hu = np.asarray(source.images[rows_idx])

    task = progress.add_task("grad-cam", total=len(loaded)) if progress is not None else None
    summary: dict[str, Any] = {}
    cams_by_run: dict[str, np.ndarray] = {}
    cts = None
    has_truth = False
    for run in loaded:
        windows = run.info.windows or [[40.0, 400.0]]
        image_size = run.image_size(organ)
        models = load_fold_models(run.path, organ)
        probs = np.asarray(predict_probs(models, hu, windows, image_size)).mean(axis=0)
        x = windowed_inputs(hu, windows, image_size)
        cams = gradcam_maps(models, x)
        if crops is not None:
            truth = crop_truth(ws.data_dir, crops, rows_idx, organ, store.size[0], image_size)
            has_truth = True  # the crop's organ mask, at least
        else:
            truth = load_truth(ws.data_dir, rows, organ, image_size)
            has_truth = has_truth or any(t is not None for t in truth)
        ct = x[:, 0]  # the first window, as the model saw it
        cts = ct if cts is None else cts
        out = outs[run.name]
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        records = []
        for i in range(len(rows)):
            row = rows.iloc[i]
            name = f"slice_{i:02d}_series{int(row['series_id'])}_inst{int(row['instance'])}.png"
            rec: dict[str, Any] = {
                "file": name,
                "patient_id": int(row["patient_id"]),
                "series_id": int(row["series_id"]),
                "instance": int(row["instance"]),
                "label": int(row[organ]),
                "prob": float(probs[i]),
            }
            if truth[i] is not None:
                rec["organ"] = localisation(cams[i], truth[i]["organ"])
                if truth[i].get("has_injury_truth", True):
                    rec["injury"] = localisation(cams[i], truth[i]["injury"])
            if crops is not None:
                rec["side"] = str(row["side"])
            records.append(rec)
            title = f"{run.name} | {organ} label {rec['label']} | p={rec['prob']:.2f}"
            _overlay_png(out / name, ct[i], cams[i], truth[i], title)
        summary[run.name] = summarise(records)
        if lesions is not None:
            summary[run.name].update(lesion_localisation(models, lesions, windows, image_size,
                                                         int(cfg.eval.explain_slices), cfg.seed))
        (out / "explain.json").write_text(
            json.dumps({"run": run.name, "organ": organ, "summary": summary[run.name], "slices": records}, indent=2)
        )
        (out / "explain.md").write_text(_markdown(run.name, organ, summary[run.name], records, has_truth))
        save_config(cfg, out / "config.yaml")
        cams_by_run[run.name] = cams
        if progress is not None:
            progress.update(task, advance=1, info=run.name)

    folders = list(outs.values())
    if compare_dir is not None and cts is not None:
        if compare_dir.exists():
            shutil.rmtree(compare_dir)
        compare_dir.mkdir(parents=True)
        # Runs of different image sizes: compare on the first run's grid only when sizes match.
        sizes = {c.shape[-1] for c in cams_by_run.values()}
        if len(sizes) == 1:
            _grid_png(compare_dir / "grid.png", cts, cams_by_run, rows, organ)
        (compare_dir / "explain.json").write_text(json.dumps({"organ": organ, "summary": summary}, indent=2))
        save_config(cfg, compare_dir / "config.yaml")
        folders.append(compare_dir)
    return {
        "n_slices": int(len(rows)),
        "has_truth": has_truth,
        "summary": summary,
        "folders": [str(p) for p in folders],
    }
