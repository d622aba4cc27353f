"""How library code tells a person what it is doing, without owning the console.

Library functions (prepare, phantom, gen, train, ...) take a ``reporter`` argument and
call ``reporter.info``, ``reporter.warn`` and ``reporter.progress()``; they never import the
CLI. The base :class:`Reporter` sends messages to :mod:`logging` and shows no progress bar,
which suits a notebook or another program. The CLI passes
:class:`toolkit.cli_common.ConsoleReporter`, which prints to stderr with rich progress bars.

Progress objects follow the subset of :class:`rich.progress.Progress` the stages use::

    with reporter.progress() as progress:
        task = progress.add_task("train liver", total=1000)
        progress.update(task, completed=10, info="loss 0.12")
        progress.advance(task)
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

logger = logging.getLogger("toolkit")


class SilentProgress(AbstractContextManager):
    """A progress display that shows nothing (same calls as ``rich.progress.Progress``)."""

    def __init__(self) -> None:
        self._next = 0

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self._next += 1
        return self._next

    def update(self, task: int, **kwargs: Any) -> None:
        return None

    def advance(self, task: int, advance: float = 1) -> None:
        return None


class Reporter:
    """Progress and messages from library code; this base logs and shows no bars.

    Subclass and override ``info``, ``warn`` and ``progress`` to show them elsewhere.
    """

    def info(self, message: str) -> None:
        """A one-line note on what is happening (resuming, counts, where outputs went)."""
        logger.info(message)

    def warn(self, message: str) -> None:
        """A one-line warning about the input that did not stop the stage."""
        logger.warning(message)

    def progress(self, transient: bool = False) -> AbstractContextManager:
        """A context manager yielding an object with ``add_task``, ``update``, ``advance``."""
        return SilentProgress()


def as_reporter(reporter: Reporter | None) -> Reporter:
    """``reporter``, or the logging :class:`Reporter` when None."""
    return reporter if reporter is not None else Reporter()
