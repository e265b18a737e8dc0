"""Progress of long work (model import, encrypt, shard install, testnet start-up) on stderr.

A ``Progress`` is any callable taking one line of text; library code calls it at each step.
``Reporter`` is one that prints each step as ``[  3.2s] text`` (seconds since the reporter was
made) and also draws bars for counted work::

    report = Reporter(prefix="veilnet: ", quiet=args.quiet)
    report("loading model.onnx")                 # a step line
    with report.bar("writing shards", total=4, unit="shards") as bar:
        for shard in shards:
            ...
            bar.advance()                         # or bar.advance(n_bytes) with unit="B"

On a terminal (stderr is a TTY) a bar is a rich progress bar, drawn below the step lines and
replaced by one summary line when it ends. On a pipe or a file there is no bar and no carriage
return: one line when counting starts, one at most every ``interval`` seconds, one at the end.
``quiet=True`` prints nothing at all. ``counted(progress, ...)`` opens a bar when ``progress`` is
a Reporter and does nothing for a plain callable, so code can count work without knowing who, if
anyone, is watching; results printed to stdout are never touched.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

Progress = Callable[[str], None]
INTERVAL = 5.0  # seconds between a bar's lines on a pipe
QUIET_HELP = ("print no progress on stderr (by default: step lines with elapsed seconds, and "
              "bars on a terminal; plain lines on a pipe); errors and the results on stdout "
              "are unchanged")


def no_progress(_: str) -> None:
    """The default progress callback: say nothing."""


class Counter(Protocol):
    """What ``Reporter.bar`` and ``counted`` yield: count work done."""

    def advance(self, amount: float = 1) -> None: ...

    def set(self, completed: float) -> None: ...


class _NoCounter:
    def advance(self, amount: float = 1) -> None:
        pass

    def set(self, completed: float) -> None:
        pass


def _amount(value: float, total: float | None, unit: str) -> str:
    if unit == "B":
        done = f"{value / 1e6:.1f}"
        return f"{done}/{total / 1e6:.1f} MB" if total is not None else f"{done} MB"
    done = f"{value:g}"
    text = f"{done}/{total:g}" if total is not None else done
    return f"{text} {unit}" if unit else text


class _LineCounter:
    """A bar on a pipe: a line at the start, at most one per interval, one at the end."""

    def __init__(self, reporter: Reporter, description: str, total: float | None,
                 unit: str) -> None:
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        self.completed = 0.0
        self.last = reporter.clock()

    def line(self, suffix: str = "") -> None:
        self.reporter(f"{self.description}: {_amount(self.completed, self.total, self.unit)}"
                      + suffix)
        self.last = self.reporter.clock()

    def advance(self, amount: float = 1) -> None:
        self.set(self.completed + amount)

    def set(self, completed: float) -> None:
        self.completed = completed
        if completed != self.total and self.reporter.clock() - self.last >= self.reporter.interval:
            self.line()  # (the total reached is said by the end line)


class _RichCounter:
    def __init__(self, progress: RichProgress, task: TaskID) -> None:
        self.progress, self.task = progress, task
        self.completed = 0.0

    def advance(self, amount: float = 1) -> None:
        self.set(self.completed + amount)

    def set(self, completed: float) -> None:
        self.completed = completed
        self.progress.update(self.task, completed=completed)


class _AmountColumn(ProgressColumn):
    """``2/4 shards`` or ``1.5/3.0 MB``, by the task's ``unit`` field."""

    def render(self, task: Task) -> Text:
        return Text(_amount(task.completed, task.total, task.fields.get("unit", "")),
                    style="progress.download")


def _is_tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
    except ValueError:  # a closed stream
        return False


class Reporter:
    """A ``Progress`` that prints ``[  3.2s] text`` step lines to ``file`` (default stderr) and
    draws bars for counted work (see the module docstring). ``console``: draw on this rich
    Console instead (its ``is_terminal`` decides bar or lines; tests use
    ``Console(force_terminal=True, file=StringIO())``)."""

    def __init__(self, *, prefix: str = "", quiet: bool = False, file: IO[str] | None = None,
                 console: Console | None = None, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.prefix, self.quiet, self.interval, self.clock = prefix, quiet, interval, clock
        if console is not None:
            self.console, self.terminal = console, console.is_terminal
        else:
            stream = file if file is not None else sys.stderr
            self.terminal = _is_tty(stream)
            self.console = Console(file=stream, force_terminal=self.terminal or None,
                                   highlight=False, soft_wrap=True)
        self.started = clock()
        self._live: RichProgress | None = None

    def elapsed(self) -> float:
        return self.clock() - self.started

    def __call__(self, message: str) -> None:
        """Print one step line (nothing when quiet)."""
        if self.quiet:
            return
        stamp = f"[{self.elapsed():5.1f}s] "
        if self.terminal:
            self.console.print(Text.assemble(self.prefix, (stamp, "dim"), message),
                               soft_wrap=True, highlight=False)
        else:  # plain text, never wrapped or styled
            self.console.file.write(f"{self.prefix}{stamp}{message}\n")
            self.console.file.flush()

    step = __call__

    @contextmanager
    def bar(self, description: str, total: float | None = None,
            unit: str = "") -> Iterator[Counter]:
        """Count work towards ``total`` (``unit`` "B": bytes, shown in MB). Ends with one line
        saying how much was done and how long it took."""
        if self.quiet:
            yield _NoCounter()
            return
        began = self.clock()
        counter: _LineCounter | _RichCounter
        if not self.terminal:
            counter = _LineCounter(self, description, total, unit)
            counter.line()
            yield counter
        else:
            owner = self._live is None
            if owner:
                self._live = self._rich_progress()
                self._live.start()
            assert self._live is not None
            task = self._live.add_task(description, total=total, unit=unit)
            counter = _RichCounter(self._live, task)
            try:
                yield counter
            finally:
                self._live.remove_task(task)
                if owner:
                    self._live.stop()
                    self._live = None
        self(f"{description}: {_amount(counter.completed, total, unit)} "
             f"in {self.clock() - began:.1f}s")

    def _rich_progress(self) -> RichProgress:
        return RichProgress(
            SpinnerColumn(), TextColumn(self.prefix + "{task.description}", markup=False),
            BarColumn(), _AmountColumn(), TimeElapsedColumn(),
            console=self.console, transient=True)


@contextmanager
def counted(progress: Progress, description: str, total: float | None = None,
            unit: str = "") -> Iterator[Counter]:
    """``progress.bar(...)`` when ``progress`` is a Reporter; otherwise a counter that does
    nothing (a plain callable gets only the step lines its caller sends)."""
    if isinstance(progress, Reporter):
        with progress.bar(description, total, unit) as counter:
            yield counter
    else:
        yield _NoCounter()


__all__ = ["INTERVAL", "QUIET_HELP", "Counter", "Progress", "Reporter", "counted", "no_progress"]
