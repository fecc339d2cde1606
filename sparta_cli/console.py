"""Terminal output: one rich console, and the training progress bar."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


def Progress(disable: bool = False) -> _RichProgress:  # noqa: N802 - reads like the class it builds
    """A bar with step count, loss, learning rate, samples/s and ETA."""
    return _RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f} · lr {task.fields[lr]:.2e} · {task.fields[rate]:.1f} samples/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )
