"""Progress display while a run is going: a rich progress bar, or nothing (tests, --quiet)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class NullProgress:
    """Shows nothing."""

    def begin(self, description: str, num_requests: int | None, duration_s: float | None) -> None:
        """A run starts."""

    def update(self, elapsed_s: float) -> None:
        """A request finished."""

    def end(self) -> None:
        """The run is over."""

    def note(self, text: str) -> None:
        """Something the user should read (printed even without a progress bar)."""
        print(f"loadtest: {text}", file=sys.stderr)


class RichProgress(NullProgress):
    """A progress bar: requests done out of the count bound, or seconds out of the duration bound."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.task = None
        self.done = 0
        self.by_count = True

    def begin(self, description: str, num_requests: int | None, duration_s: float | None) -> None:
        """Start a bar for this run."""
        self.done = 0
        self.by_count = num_requests is not None
        total = num_requests if self.by_count else duration_s
        unit = TextColumn("{task.completed:.0f}/{task.total:.0f} s") if not self.by_count else MofNCompleteColumn()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), unit, TimeElapsedColumn(),
                                 TextColumn("{task.fields[done]} done"), console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, done=0)

    def update(self, elapsed_s: float) -> None:
        """Advance by one request (count bound) or to the elapsed time (duration bound)."""
        self.done += 1
        completed = self.done if self.by_count else elapsed_s
        self.progress.update(self.task, completed=completed, done=self.done)

    def end(self) -> None:
        """Remove the bar."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def note(self, text: str) -> None:
        """Print a warning line."""
        self.console.print(f"[yellow]{text}[/yellow]")
