"""Data commands: ``demo-data``, ``prepare``, ``status``."""

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
from toolkit.config import save_config


def register(app: typer.Typer) -> None:
    app.command("demo-data")(demo_data)
    app.command("prepare")(prepare)
    app.command("status")(status)


@handle_errors
def demo_data(
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    seed: SeedOpt = None,
    patients: Annotated[int | None, typer.Option(help="Number of patients.")] = None,
    slices: Annotated[int | None, typer.Option(help="Slices per series.")] = None,
    size: Annotated[int | None, typer.Option(help="Pixels per side of each DICOM slice.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <workdir>/data).")] = None,
    force: ForceOpt = False,
) -> None:
    """Write the built-in CT trauma phantom in the RSNA 2023 Abdominal Trauma Detection layout.

    Real DICOM files (pydicom) with fake identifying tags, train.csv, train_series_meta.csv,
    image_level_labels.csv, and phantom_truth/ (organ and injury masks, for evaluation only).
    """
    ws, cfg = setup(
        workdir, config, sets, {"phantom": {"patients": patients, "slices": slices, "size": size}}, seed
    )
    from toolkit.data.phantom import write_phantom

    out_dir = out or ws.data_dir
    summary = write_phantom(out_dir, cfg.phantom, seed=cfg.seed, force=force, reporter=ConsoleReporter())
    save_config(cfg, out_dir / "config.yaml")
    console.print(f"wrote phantom to {out_dir}: {summary}")


@handle_errors
def prepare(
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    seed: SeedOpt = None,
    source: Annotated[Path | None, typer.Option(help="RSNA-layout input folder (default: <workdir>/data).")] = None,
    out: Annotated[Path | None, typer.Option(help="Slice store folder (default: <workdir>/store).")] = None,
    size: Annotated[int | None, typer.Option(help="Stored slice size in pixels.")] = None,
    slices_per_series: Annotated[
        int | None, typer.Option(help="Slices kept per series, evenly spaced along z (0 = all).")
    ] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Share of patients held out for testing.")] = None,
    folds: Annotated[int | None, typer.Option(help="Cross-validation folds over the other patients.")] = None,
    workers: Annotated[int | None, typer.Option(help="Processes reading DICOM (0 = all cores).")] = None,
    force: ForceOpt = False,
) -> None:
    """Read DICOM series + label CSVs into a de-identified int16 HU slice store with a patient-level split.

    Resumes an interrupted run; unreadable files are skipped and listed in store/errors.csv.
    """
    ws, cfg = setup(
        workdir,
        config,
        sets,
        {
            "data": {
                "size": size,
                "slices_per_series": slices_per_series,
                "test_fraction": test_fraction,
                "folds": folds,
                "workers": workers,
            }
        },
        seed,
    )
    from toolkit.data.prepare import prepare_store, summarize_store

    store = prepare_store(source or ws.data_dir, out or ws.store_dir, cfg, force=force, reporter=ConsoleReporter())
    console.print(summarize_store(store))


@handle_errors
def status(workdir: WorkdirOpt = Path(".")) -> None:
    """Show what the workspace holds and which stage comes next."""
    from rich.table import Table

    from toolkit.workspace import Workspace

    ws = Workspace(workdir)
    table = Table(title=f"workspace {ws.root}")
    table.add_column("stage")
    table.add_column("done")
    table.add_column("detail")
    next_stage = None
    for stage, done, detail in ws.status():
        table.add_row(stage, "yes" if done else "no", detail)
        if not done and next_stage is None:
            next_stage = detail
    console.print(table)
    console.print(f"next: {next_stage}" if next_stage else "every stage has outputs; see reports/")
