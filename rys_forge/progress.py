"""Progress display for long commands (rank, sweep): a rich bar on a terminal, plain lines elsewhere.

On a terminal (stderr is a TTY) a rich progress bar with ETA is drawn on stderr. When stderr is not a
terminal (a log file, a pipe, a CI job) a bar cannot redraw, so one plain line is written instead every
`PLAIN_INTERVAL_S` seconds while items finish, plus one at the start and one at the end:

    [rys-forge] probing windows: 40/153 (26%), 0.52/s, elapsed 1m17s, eta 3m37s

Disabled (`--no-progress`), nothing is written at all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

#: Seconds between two plain progress lines (non-terminal output).
PLAIN_INTERVAL_S = 10.0


def _duration(seconds: float) -> str:
    """`75` -> `1m15s`, `3725` -> `1h02m05s`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PlainProgress:
    """Progress as plain lines on a stream that is not a terminal: `advance()` after each item.

    Args:
        stream: where the lines go.
        total: items in the whole run.
        completed: items already done before this session (a resumed run); the rate counts this
            session's items only.
        label: what is being counted, e.g. "probing windows".
        interval: seconds between lines.
        clock: a monotonic clock (injectable for tests).
    """

    def __init__(self, stream: TextIO, total: int, completed: int, label: str, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.total, self.label, self.clock = stream, total, label, clock
        self.interval = PLAIN_INTERVAL_S if interval is None else interval
        self.done = self.first = self.written = completed
        self.started = self.last = clock()
        self.write()

    def line(self) -> str:
        """The current state: done/total, share, this session's rate, elapsed and (once known) the ETA."""
        elapsed = self.clock() - self.started
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"[rys-forge] {self.label}: {self.done}/{self.total}{share}"
        finished = self.done - self.first
        if finished > 0 and elapsed > 0:
            rate = finished / elapsed
            text += f", {rate:.2f}/s, elapsed {_duration(elapsed)}"
            if self.done < self.total:
                text += f", eta {_duration((self.total - self.done) / rate)}"
        else:
            text += f", elapsed {_duration(elapsed)}"
        return text

    def write(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last, self.written = self.clock(), self.done

    def advance(self) -> None:
        """One more item done; writes a line if `interval` seconds passed since the last one."""
        self.done += 1
        if self.clock() - self.last >= self.interval:
            self.write()

    def close(self) -> None:
        """The final line (unless the last line already showed this state)."""
        if self.done != self.written:
            self.write()


class progress_bar:
    """A progress display with ETA (or nothing), used as `with progress_bar(...) as advance:`.

    A rich bar when `stream` (default: stderr) is a terminal, `PlainProgress` lines otherwise, nothing when
    not `enabled`.
    """

    def __init__(self, enabled: bool, total: int, completed: int, label: str, stream: TextIO | None = None):
        self.enabled, self.total, self.completed, self.label = enabled, total, completed, label
        self.stream = stream
        self.bar: Any = None
        self.plain: PlainProgress | None = None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        stream = self.stream if self.stream is not None else sys.stderr
        if not _is_terminal(stream):
            self.plain = PlainProgress(stream, self.total, self.completed, self.label)
            return self.plain.advance
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), transient=False, console=Console(file=stream),
        )
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total, completed=self.completed)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.plain is not None:
            self.plain.close()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
