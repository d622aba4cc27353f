"""CLI commands of this stage: ``compare``, ``explain``, ``predict``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from toolkit.cli_common import (
    ConfigOpt,
    ForceOpt,
    SeedOpt,
    SetOpt,
    WorkdirOpt,
    console,
    handle_errors,
    make_progress,
    setup,
)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the ``toolkit`` app."""
    app.command("compare")(compare)
    app.command("explain")(explain)
    app.command("predict")(predict)


RunsOpt = Annotated[
    list[str] | None,
    typer.Option("--runs", "-r", help="Run name under runs/ (repeatable). Default: every complete run."),
]
BaselineOpt = Annotated[
    str | None,
    typer.Option("--baseline", help="The real-only run others are compared with (config eval.baseline)."),
]


@handle_errors
def compare(
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    seed: SeedOpt = None,
    runs: RunsOpt = None,
    baseline: BaselineOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Report folder under reports/ (default: compare).")] = None,
    bootstrap: Annotated[
        int | None,
        typer.Option("--bootstrap", help="Patient-bootstrap resamples per interval (config eval.bootstrap)."),
    ] = None,
    allow_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-mismatch",
            help="Compare runs that differ in more than the synthetic data (seed, epochs, model...); "
            "the differences are recorded in the report.",
        ),
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Compare synthetic-data runs with the real-only baseline on the held-out test patients.

    Per organ: patient- and slice-level AUC with patient-bootstrap 95% CIs, the AUC change vs the
    baseline with the paired DeLong p-value and a paired-bootstrap CI, full-sensitivity and Youden
    operating points, single-fold vs ensemble AUC, the RSNA 2023 weighted log loss, and a patient-level
    verdict ("improved" / "worse" only when the CI excludes 0 and p < alpha, both Holm-corrected across
    organs x compared runs; slice-level figures are descriptive). Writes reports/<name>/report.md,
    report.html (self-contained), report.json and plots. Refuses runs trained on different splits.
    """
    from eval.compare import compare_runs, report_dir
    from eval.report import summary_table
    from toolkit.artifacts.comparison import REPORT_HTML, REPORT_JSON, REPORT_MD

    ws, cfg = setup(workdir, config, sets, {"eval": {"baseline": baseline, "bootstrap": bootstrap}}, seed)
    with make_progress() as progress:
        result = compare_runs(ws, cfg, runs, name, force=force, allow_mismatch=allow_mismatch, progress=progress)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    for organ, res in result.organs.items():
        if res.note:
            console.print(f"[yellow]note:[/] {organ}: {res.note}")
    if result.settings_mismatch:
        console.print(
            "[bold red]WARNING: runs differ in " + ", ".join(result.settings_mismatch) + "; see the report[/]"
        )
    console.print(summary_table(result))
    console.print(f"report: {report_dir(ws, name) / REPORT_HTML} (also {REPORT_MD}, {REPORT_JSON})")


@handle_errors
def explain(
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    seed: SeedOpt = None,
    organ: Annotated[
        str, typer.Option("--organ", "-o", help="Organ: bowel, extravasation, kidney, liver or spleen.")
    ] = "liver",
    runs: Annotated[
        list[str] | None,
        typer.Option("--runs", "-r", help="Run to explain (repeatable, same slices for each). Default: the baseline."),
    ] = None,
    slices: Annotated[
        int | None,
        typer.Option("--slices", "-n", help="Test slices to explain, injured first (eval.explain_slices)."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Grad-CAM heat maps of a run's fold ensemble on test slices, with where-it-looks scores.

    Writes reports/explain-<run>-<organ>/ (CT + heat-map overlays, explain.json, explain.md). Where
    ground-truth masks exist (the built-in phantom's data/phantom_truth/) it scores the share of heat
    inside the organ and the injury and the pointing game (is the hottest pixel inside?). Give several
    --runs to see whether synthetic data changed where the model looks (a side-by-side grid is added).
    Default run: the baseline.
    """
    from eval.explain import explain_runs

    ws, cfg = setup(workdir, config, sets, {"eval": {"explain_slices": slices}}, seed)
    names = runs or [cfg.eval.baseline]
    with make_progress() as progress:
        result = explain_runs(ws, cfg, names, organ, force=force, progress=progress)
    from rich.table import Table

    table = Table(title=f"where the {organ} classifier looks ({result['n_slices']} test slices)")
    for col in (
        "run",
        "heat in organ",
        "organ area",
        "heat in injury",
        "injury area",
        "hit organ",
        "hit injury",
    ):
        table.add_column(col, justify="left" if col == "run" else "right")

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    for name, s in result["summary"].items():
        table.add_row(
            name,
            f(s["organ_mass_share"]),
            f(s["organ_area_share"]),
            f(s["injury_mass_share"]),
            f(s["injury_area_share"]),
            f(s["organ_pointing_hit"]),
            f(s["injury_pointing_hit"]),
        )
    console.print(table)
    if not result["has_truth"]:
        console.print("no ground-truth masks (data/phantom_truth/): only heat maps were written")
    for path in result["folders"]:
        console.print(f"wrote {path}")


@handle_errors
def predict(
    study: Annotated[Path, typer.Argument(help="Folder of one CT series (DICOM files).", show_default=False)],
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Run whose fold ensemble predicts (default: the baseline). 'best' picks per organ the run "
            "with the highest out-of-fold patient AUC (never the test set).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON result to this file.")] = None,
    force: ForceOpt = False,
) -> None:
    """Per-organ injury probabilities for one CT series from a trained run's fold ensemble.

    Reads the DICOM series and resamples it as the run's store was. Organs trained on organ crops
    (kidney, liver, spleen by default) run segment -> crop -> classify: the store's organ localizer
    labels the slices, the run's crop settings cut the organ's crops, each fold model scores them.
    Other organs score every slice. Folds are averaged and crops/slices aggregated to a study score
    with the run's rule (train.aggregate). Prints a table with the time of each step and the JSON
    (also written to --out).
    """
    from eval.predict import predict_study

    ws, cfg = setup(workdir, config, sets)
    if out is not None and out.exists() and not force:
        from toolkit.errors import ToolkitError

        raise ToolkitError(f"{out} already exists; pass --force to overwrite it")
    result = predict_study(ws, cfg, study, run or cfg.eval.baseline)
    from rich.table import Table

    steps = ", ".join(f"{step} {sec:.1f} s" for step, sec in result["seconds"].items())
    table = Table(title=f"{result['n_slices']} slices, {result['elapsed_s']:.1f} s ({steps})")
    for col in ("organ", "run", "input", "scored", "p(injury)", "flag at full-sensitivity threshold"):
        table.add_column(col, justify="left" if col in ("organ", "run", "input") else "right")
    for organ, r in result["organs"].items():
        thr = r["full_sensitivity_threshold"]
        flag = "n/a" if thr is None else ("injured" if r["prob"] >= thr else "below")
        table.add_row(organ, r["run"], r["input"], str(r["scored"]), f"{r['prob']:.3f}", flag)
    console.print(table)
    for organ, r in result["organs"].items():
        if r.get("note"):
            console.print(f"[yellow]note:[/] {organ}: {r['note']}")
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        console.print(f"wrote {out}")
    typer.echo(text)
