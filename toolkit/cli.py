"""The ``toolkit`` command line: one typer app, commands registered by each stage."""

from __future__ import annotations

import typer

from toolkit import __version__

app = typer.Typer(
    name="toolkit",
    help=(
        "Does synthetic CT make my injury classifier better? Pipeline: "
        "demo-data -> prepare -> segment -> crop -> gen -> train -> compare (or all at once: demo). "
        "Every command works in a workspace folder (--workdir, default: current directory)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Synthetic-data training toolkit for abdominal trauma CT."""


def _register_all() -> None:
    # Each stage owns its commands; import order is the order shown in --help.
    from eval.cli import register as register_eval
    from gen.cli import register as register_gen
    from seg.cli import register as register_seg
    from study.cli import register as register_study
    from toolkit.cli_data import register as register_data
    from toolkit.demo import register as register_demo
    from train.cli import register as register_train

    register_data(app)
    register_seg(app)
    register_gen(app)
    register_train(app)
    register_eval(app)
    register_study(app)
    register_demo(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    from toolkit.runtime import passive_openmp, tune_malloc

    passive_openmp()  # effective only if torch is not imported yet

    # Before torch allocates: CPU training reuses large activation buffers instead of
    # re-faulting them every step (about 2x at 224 px on a 2-core CPU; see benchmarks/bench_train.py).
    tune_malloc()
    app()


if __name__ == "__main__":
    main()
