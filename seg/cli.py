"""``toolkit segment`` (the organ localizer for the series without masks) and ``toolkit crop`` (organ crop sets)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toolkit import CROP_ORGANS
from toolkit.cli_common import (
    ConfigOpt,
    ConsoleReporter,
    ForceOpt,
    SeedOpt,
    SetOpt,
    WorkdirOpt,
    console,
    handle_errors,
    setup,
)
from toolkit.config import save_config
from toolkit.errors import ToolkitError


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the ``toolkit`` app."""
    app.command("segment")(segment)
    app.command("crop")(crop)


@handle_errors
def segment(
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    seed: SeedOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Training epochs (segment.epochs).")] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Network input pixels per side (segment.image_size).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted training from store/segmenter/last/.")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Train a 2D organ localizer on the annotated TRAINING series and label every stored slice.

    The store's real masks (store/masks.npy, manifest column mask_source; written by `toolkit
    prepare` from RSNA segmentations/ or TotalSegmentator output) of training-split patients train
    a MONAI UNet; a share of those patients (segment.holdout_fraction) and every test-split patient
    are never trained on, and per-organ Dice is printed for both, with their series counts.

    Writes store/organ_labels.npy (uint8 (n_slices, S, S), codes liver 1, spleen 2, kidney_left 3,
    kidney_right 4, bowel 5; the real mask where a training-split series has one unless
    segment.keep_masks is false; test-split series always get the prediction), store/organs.csv
    (per slice: label_source, area_<organ> in pixels, vis_<organ> = area / the organ's largest area
    in the series) and store/segmenter/ (model.safetensors + config.json,
    metrics.csv, train_series.csv, dice.csv, summary.json). A series where an organ is found on no
    slice gets a warning; its other organs stay usable. A finished run is reused; --force redoes it.

    Examples: toolkit segment -w ws | toolkit segment -w ws --epochs 20 --force
    """
    from seg.run import format_dice, segment_store

    ws, cfg = setup(workdir, config, sets, {"segment": {"epochs": epochs, "image_size": image_size}}, seed)
    summary = segment_store(ws.store_dir, cfg, resume=resume, force=force, reporter=ConsoleReporter())
    typer.echo(format_dice(summary))
    missing = summary["missing_organs"]
    console.print(
        f"wrote {ws.store_dir / 'organ_labels.npy'} and organs.csv ({summary['label_maps']}); "
        f"{len(missing)} series with an organ not found; segmenter in {ws.store_dir / 'segmenter'} "
        f"({summary['seconds']:.0f} s)"
    )


@handle_errors
def crop(
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    organ: Annotated[
        list[str] | None,
        typer.Option("--organ", "-o", help=f"Organ (repeatable): {', '.join(CROP_ORGANS)}. Default: crop.organs."),
    ] = None,
    size: Annotated[int | None, typer.Option("--size", help="Crop pixels per side (crop.size).")] = None,
    margin: Annotated[
        float | None, typer.Option("--margin", help="Context on each side, share of the organ's box (crop.margin).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Cut each organ's crop set around the organ the localizer found (run `toolkit segment` first).

    For liver, spleen and each kidney: the slices where the organ is visible (store/organs.csv
    vis > crop.min_visibility), cut to ONE square per series around the organ (crop.margin added on
    each side), resized to crop.size. Writes store/crops/<organ>/ (kidney: left and right crops, column
    side): images.npy (int16 HU), masks.npy (the organ beside every crop), manifest.csv (store columns,
    crop box in stored pixels, vis, soft target = patient label x visibility unless image-level rows give
    the slice label, hard label) and meta.json. Bowel and extravasation keep the stored slices.
    A series where the localizer found no organ adds no crops for it (a warning) and keeps its other
    organs. Up-to-date sets are kept; sets cut with other settings need --force.

    Examples: toolkit crop -w ws | toolkit crop -w ws --size 96 --margin 0.25 --force
    """
    from seg.crops import make_crop_sets
    from toolkit.artifacts.crops import CROPS_DIR

    for o in organ or []:
        if o not in CROP_ORGANS:
            raise ToolkitError(f"unknown crop organ '{o}'; choose from {', '.join(CROP_ORGANS)}")
    ws, cfg = setup(workdir, config, sets, {"crop": {"size": size, "margin": margin}})
    results = make_crop_sets(ws.store_dir, cfg, organs=organ or None, force=force, reporter=ConsoleReporter())

    from rich.table import Table

    table = Table(title=f"organ crops ({cfg.crop.size} px, margin {cfg.crop.margin:g})")
    for column in ("organ", "status", "crops", "series", "patients", "injured", "organ share", "series w/o organ"):
        table.add_column(column)
    for name, r in results.items():
        table.add_row(name, r.get("status", ""), str(r.get("crops", "")), str(r.get("series", "")),
                      str(r.get("patients", "")), str(r.get("injured", "")), f"{r.get('organ_share', 0):.2f}",
                      str(r.get("series_without_organ", "")))
    console.print(table)
    save_config(cfg, ws.store_dir / CROPS_DIR / "config.yaml")
    console.print(f"crop sets in {ws.store_dir / CROPS_DIR}")
