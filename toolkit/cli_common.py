"""Pieces every CLI command shares: options, error handling, workspace + config setup."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from toolkit.config import Config, load_config, parse_overrides, resolve_config_path
from toolkit.errors import ToolkitError
from toolkit.reporting import Reporter
from toolkit.workspace import Workspace

console = Console(stderr=True)

WorkdirOpt = Annotated[
    Path,
    typer.Option("--workdir", "-w", help="Workspace folder (data/, store/, synthetic/, runs/, reports/)."),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="Config name (demo, default; ./configs/<name>.yaml first) or a YAML path. "
        "Default: the workspace's config.yaml, else 'default'.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config value, e.g. --set train.lr=1e-4 (repeatable)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite outputs that already exist.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (default: config 'seed').")]

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn a :class:`ToolkitError` into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ToolkitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: finished work is kept; re-run the command to continue (gen and train: add --resume)",
                err=True,
            )
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def setup(
    workdir: Path,
    config: str | None,
    sets: list[str] | None,
    flags: dict[str, Any] | None = None,
    seed: int | None = None,
) -> tuple[Workspace, Config]:
    """Resolve the workspace and the config for one command.

    ``flags`` are the command's own options as nested ``{"section": {"key": value}}``;
    ``None`` values (flag not given) are dropped so the config keeps its value.
    """
    ws = Workspace(workdir)
    overrides = parse_overrides(sets)
    for section, values in (flags or {}).items():
        for key, value in values.items():
            if value is not None:
                overrides.setdefault(section, {})[key] = value
    if seed is not None:
        overrides["seed"] = seed
    cfg = load_config(config, overrides, workdir=ws.root)
    if config is not None and not ws.config_file.exists():
        # Remember the chosen config so later commands in this workspace use it by default.
        ws.root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(resolve_config_path(config, ws.root), ws.config_file)
    return ws, cfg


def make_progress(transient: bool = False) -> Progress:
    """A rich progress bar with count, rate-friendly columns and time left."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        _InfoColumn(),
        console=console,
        transient=transient,
    )


class _InfoColumn(ProgressColumn):
    """Free text set with ``progress.update(task, info="loss 0.12 | 85 img/s")``."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")))


class ConsoleReporter(Reporter):
    """The CLI's :class:`~toolkit.reporting.Reporter`: stderr, yellow warnings, rich progress bars."""

    def info(self, message: str) -> None:
        console.print(message, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        console.print(f"[yellow]warning: {message}", highlight=False, soft_wrap=True)

    def progress(self, transient: bool = False) -> Progress:
        return make_progress(transient=transient)
