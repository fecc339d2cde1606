"""Terminal output: one rich console, and the training progress bar."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    """Keep transformers' load reports, datasets' per-map bars and libraries' Python warnings
    (FutureWarning, DeprecationWarning, UserWarning: notes to developers, not users) out of
    sparta's output; `--debug` shows them all."""
    import warnings

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()  # offline: a line for every retry before the one-line error
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


class TrainingProgress:
    """Training progress for people and for log files: rich's bar on a terminal; elsewhere (nohup,
    `| tee`, CI) one plain line every ~5% of the steps or every `every_s` seconds, whichever comes
    first, so a log always says how far a run is (a rich bar there prints nothing until the end)."""

    def __init__(self, total: int, completed: int, *, enabled: bool = True, every_s: float = 30.0, out: Console | None = None) -> None:
        self.out = out or console
        self.total, self.start_step, self.step = total, completed, completed
        self.enabled, self.every_s = enabled, every_s
        self.every_steps = max(1, math.ceil(total / 20))
        self.loss: float | None = None  # none read yet: shown as `loss –`, not as a number
        self.lr, self.rate = 0.0, 0.0
        self.started = self.last_line = time.perf_counter()
        self.last_line_step = completed
        self._bar: _RichProgress | None = None

    def __enter__(self) -> TrainingProgress:
        if self.enabled and self.out.is_terminal:
            self._bar = _RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} · lr {task.fields[lr]:.2e} · {task.fields[rate]:.1f} samples/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.out, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("training", total=self.total, completed=self.step, loss=self.loss_text, lr=0.0, rate=0.0)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, step: int, *, lr: float, rate: float, loss: float | None = None) -> None:
        self.step, self.lr, self.rate = step, lr, rate
        if loss is not None:
            self.loss = loss
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=self.loss_text, lr=lr, rate=rate)
            return
        now = time.perf_counter()
        due = step == self.total or step - self.last_line_step >= self.every_steps or now - self.last_line >= self.every_s
        if self.enabled and due:
            self.out.print(self.line(now))
            self.last_line, self.last_line_step = now, step

    @property
    def loss_text(self) -> str:
        """The last loss read, or a dash before the first (a `nan` there would read as divergence)."""
        return "–" if self.loss is None else f"{self.loss:.4f}"

    def line(self, now: float) -> str:
        elapsed = now - self.started
        done = self.step - self.start_step
        eta = elapsed / done * (self.total - self.step) if done else math.nan
        return (f"step {self.step}/{self.total} · loss {self.loss_text} · lr {self.lr:.2e} · {self.rate:.1f} samples/s · "
                f"elapsed {_clock(elapsed)} · ETA {_clock(eta)}")


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
