"""The library stands apart from the CLI: no library module imports a CLI module, even lazily."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolkit", "gen", "train", "eval")
CLI_MODULES = frozenset(
    {"toolkit.cli", "toolkit.cli_common", "toolkit.cli_data", "toolkit.demo", "toolkit.__main__"}
    | {"gen.cli", "train.cli", "eval.cli"}
)


def library_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            names.append(info.name)
    return sorted(n for n in names if n not in CLI_MODULES)


def module_path(name: str) -> Path:
    base = ROOT.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement anywhere in the file names, function bodies included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_every_package_has_library_modules() -> None:
    modules = library_modules()
    # The walk finds the modules this file guards; an empty walk would make the checks below pass vacuously.
    assert {"toolkit.data.prepare", "toolkit.data.phantom", "toolkit.data.dicom", "eval.explain"} <= set(modules)


@pytest.mark.parametrize("name", library_modules())
def test_library_module_imports_no_cli_module(name: str) -> None:
    cli = sorted(imported_modules(module_path(name)) & CLI_MODULES)
    assert not cli, f"{name} imports {cli}; take a `reporter: Reporter | None = None` argument instead"


def test_data_stages_run_without_loading_the_cli(tmp_path: Path) -> None:
    """Write a phantom and prepare it in a fresh interpreter: the CLI is never loaded, warnings go to logging."""
    script = textwrap.dedent(
        f"""
        import dataclasses, logging, sys
        from pathlib import Path

        import toolkit.data.dicom, toolkit.data.labels, toolkit.data.split
        from toolkit.config import Config, DataConfig, PhantomConfig
        from toolkit.data.phantom import write_phantom
        from toolkit.data.prepare import prepare_store

        messages = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())
        logging.getLogger("toolkit").addHandler(handler)

        out = Path({str(tmp_path)!r})
        write_phantom(out / "data", dataclasses.replace(PhantomConfig(), patients=8, slices=4, size=32), seed=0)
        (out / "data" / "train_series_meta.csv").unlink()
        data = dataclasses.replace(DataConfig(), size=16, folds=2, test_fraction=0.25, workers=1)
        store = prepare_store(out / "data", out / "store", dataclasses.replace(Config(), data=data))
        assert len(store) > 0
        loaded = sorted(m for m in sys.modules if m.startswith(("toolkit.cli", "typer")))
        assert not loaded, loaded
        assert any("train_series_meta.csv not found" in m for m in messages), messages
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
