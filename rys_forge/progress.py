"""Progress display for long commands (rank, sweep, heal)."""

from __future__ import annotations

from typing import Any


class progress_bar:
    """A rich progress bar with ETA (or nothing), used as `with progress_bar(...) as advance:`."""

    def __init__(self, enabled: bool, total: int, completed: int, label: str):
        self.enabled, self.total, self.completed, self.label = enabled, total, completed, label
        self.bar: Any = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), transient=False,
        )
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total, completed=self.completed)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
