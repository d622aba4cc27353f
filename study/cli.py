"""CLI command of this stage: ``toolkit study``."""

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
    """Add this stage's command to the ``toolkit`` app."""
    app.command("study")(study)


@handle_errors
def study(
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    seed: SeedOpt = None,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="Run only the k-th of N shares of the jobs, e.g. 2/4 (a SLURM array index "
                                     "k of N, or one GPU each); then --collect."),
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option("--stage", help="Only 'gen' (generator) or 'train' (classifier) jobs: on a cluster run every "
                                     "shard's gen stage before any train stage."),
    ] = None,
    collect: Annotated[
        bool, typer.Option("--collect", help="Merge what the shards wrote and write the report (no training).")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Synthetic-ratio and real-data-size curves over repeated seeds, with Holm-corrected verdicts.

    Reads the config's `study:` section (arms: synthetic ratios x real-data fractions x generator modes
    and backends; seeds per arm; the primary comparison), saves the resolved config to
    studies/<name>/study.yaml before anything runs, then runs every job: one generator per organ,
    mode, backend and fraction (trained on that fraction's patients only) and one classifier fold per
    arm, organ, seed and fold. Finished jobs are kept: re-run to resume. Without --shard it ends with
    the report (studies/<name>/report/report.html): AUC against ratio and fraction per organ, every
    arm's mean and spread over seeds, and verdicts for the primary comparisons only.

    Example: toolkit study -w ws -c study-demo | toolkit study -w ws --shard 3/8 | toolkit study -w ws --collect
    """
    from study.plan import parse_shard
    from study.report import collect_and_report
    from study.run import run_study
    from toolkit.errors import ConfigError

    if collect and (shard or stage or force):
        raise ConfigError("--collect only merges and reports: run it without --shard, --stage or --force")
    ws, cfg = setup(workdir, config, sets, seed=seed)
    reporter = ConsoleReporter()
    if not collect:
        part = parse_shard(shard) if shard else None
        _, report = run_study(ws, cfg, shard=part, stage=stage, force=force, reporter=reporter)
        console.print(f"jobs: {len(report.done)} run, {len(report.kept)} already done, "
                      f"{len(report.waiting)} waiting for a generator")
        if report.waiting:
            console.print(f"[yellow]note:[/] {len(report.waiting)} training job(s) wait for generators of other "
                          f"shards (first: {report.waiting[0]}); run every shard with --stage gen first, then "
                          "this again")
        if part is not None or stage == "gen" or report.waiting:
            console.print("when every shard is done: toolkit study --collect")
            return
    result, html = collect_and_report(ws, cfg, reporter)
    _print_primary(result)
    console.print(f"report: {html} (also report.md, study.json, curves)")


def _print_primary(result) -> None:
    from rich.table import Table

    table = Table(title=f"primary comparisons ({result.multiplicity}-corrected across {result.family_size})")
    for column in ("organ", "arm", "Δ AUC [interval]", "level", "p (Holm)", "verdict"):
        table.add_column(column)
    styles = {"improved": "bold green", "worse": "bold red"}
    for p in result.primary:
        d = p.delta
        shown = f"[{styles[p.verdict]}]{p.verdict}[/]" if p.verdict in styles else p.verdict
        table.add_row(p.organ, p.arm, f"{d.estimate:+.3f} [{d.low:.3f}, {d.high:.3f}]", f"{100 * d.level:.4g}%",
                      "<0.001" if p.p_holm < 0.001 else f"{p.p_holm:.3f}", shown)
    console.print(table)
    for organ in result.organs.values():
        if organ.note:
            console.print(f"[yellow]note:[/] {organ.note}")
