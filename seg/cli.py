"""``toolkit segment``: the organ localizer for the series without masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the ``toolkit`` app."""
    app.command("segment")(segment)


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
