"""What a person watches and reads: progress lines as steps happen, then one table.

Progress goes to stderr, the table (or JSON) to stdout, so `--json` output stays clean.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from core.outcome import HostOutcome

_T = TypeVar("_T")
PROGRESS_EVERY = 30.0  # seconds between the "still waiting" notes of a long wait (it must not look hung)


class Progress:
    """When a long wait says again what it still waits for: PROGRESS_EVERY seconds after it began or
    last said so, by the wait's own clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock, self.every = clock, PROGRESS_EVERY
        self.start = clock()
        self._next = self.start + self.every

    def due(self) -> bool:
        return self.clock() >= self._next

    def waited(self) -> float:
        """Seconds since the wait began."""
        return self.clock() - self.start

    def said(self) -> None:
        """The wait said where it is: the next note is due PROGRESS_EVERY seconds from now."""
        self._next = self.clock() + self.every


def reading(read: Callable[[], _T], deadline: float, pause: Callable[[], None], note: Callable[[str], None],
            clock: Callable[[], float] = time.monotonic) -> _T:
    """`read()` for a wait that ends at `deadline`: while AWS is out of reach (AwsUnreachable, after
    its call's tries) it is tried again after `pause()` (which raises when the wait is interrupted),
    until the deadline, so a wait of minutes rides out a blip on the route to AWS; said once."""
    from awsapi.clients import AwsUnreachable

    said = False
    while True:
        try:
            return read()
        except AwsUnreachable as exc:
            if clock() > deadline:
                raise
            if not said:
                note(f"AWS is out of reach; trying again until the wait ends: {exc}")
                said = True
            pause()


class Reporter:
    def __init__(self, out=None, err=None, quiet: bool = False):
        # Not a terminal (CI, a pipe): wide enough that a table row stays one line.
        self.out = Console(file=out or sys.stdout, highlight=False, soft_wrap=True,
                           width=None if (out or sys.stdout).isatty() else 200)
        self.err = Console(file=err or sys.stderr, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self._lock = threading.RLock()  # re-entrant: a Ctrl-C handler may print while the main thread prints
        self._t0 = time.monotonic()

    def _line(self, *parts: str | tuple[str, str]) -> None:
        """One progress line of plain text and (text, style) parts, after the time since the start.
        Not a terminal (CI, a pipe, a log): the words alone, written at once (rich would drop the
        styles anyway, after rendering each line: a large fleet prints thousands)."""
        if self.quiet:
            return
        line = (f"{time.monotonic() - self._t0:6.2f}s", "dim"), " ", *parts
        with self._lock:
            if self.err.is_terminal:
                self.err.print(Text.assemble(*line))
            else:
                self.err.file.write("".join(p if isinstance(p, str) else p[0] for p in line) + "\n")
                self.err.file.flush()

    def step(self, o: HostOutcome) -> None:
        self._line(f"{o.host:<16} {o.step.value}")

    def done(self, o: HostOutcome) -> None:
        self._line(f"{o.host:<16} ", ("ready", "green"), f" {o.after[:12] if o.after else ''}")

    def failed(self, o: HostOutcome) -> None:
        self._line(f"{o.host:<16} ", (f"FAILED at {o.step.value}", "red"), f": {o.error}")

    def restored(self, o: HostOutcome) -> None:
        self._line(f"{o.host:<16} ", ("restored", "yellow"), f" {o.before[:12] if o.before else '(nothing before)'}")

    def note(self, text: str) -> None:
        self._line(text)

    def table(self, title: str, outcomes: list[HostOutcome]) -> None:
        t = Table(title=title, title_justify="left")
        for col in ("host", "instance", "step reached", "result", "time", "detail"):
            t.add_column(col, overflow="fold")
        for o in outcomes:
            style = "green" if o.ok else "red" if o.ok is False else "yellow"
            detail = o.error or (f"{(o.before or '-')[:12]} -> {(o.after or '-')[:12]}" if o.changed
                                 else (o.after or o.before or "")[:12])
            t.add_row(escape(o.host), o.instance or "-", o.step.value, f"[{style}]{o.result}[/]", f"{o.elapsed:.2f}s",
                      escape(detail))
        self.out.print(t)

    def json(self, payload: dict) -> None:
        self.out.print_json(json.dumps(payload, default=str))

    def message(self, text: str, error: bool = False, markup: bool = False) -> None:
        """Print `text` as it is (markup=True: it carries rich markup of ours)."""
        (self.err if error else self.out).print(text if markup else escape(text))
