"""Pictures of runs: each run's training loss, and the report's metric-vs-density and loss curves.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, no display
needed) and written atomically like every other file sparta writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sparta_cli.fileio import write_with
from sparta_cli.runs import TRAINER_LOG, TRAINING_LOSS_PNG

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure



@dataclass
class LossLog:
    """trainer_log.jsonl split into training steps (records with `loss`) and evaluations (`eval_loss`)."""

    steps: list[int]
    loss: list[float]
    eval_steps: list[int]
    eval_loss: list[float]


def read_loss_log(run_dir: Path) -> LossLog:
    """The curves in a run's log; a damaged line (cut short by a kill, or not a record with a numeric
    step and loss) is skipped: the curve is a picture, and one bad line must not stop a report."""
    log = LossLog([], [], [], [])
    path = Path(run_dir) / TRAINER_LOG
    if not path.is_file():
        return log
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            continue
        if _is_number(record.get("loss")):
            log.steps.append(record["step"])
            log.loss.append(record["loss"])
        if _is_number(record.get("eval_loss")):
            log.eval_steps.append(record["step"])
            log.eval_loss.append(record["eval_loss"])
    return log


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _plot_losses(ax: Axes, log: LossLog, color, label: str) -> None:
    ax.plot(log.steps, log.loss, color=color, label=label, marker="." if len(log.steps) < 30 else None)
    if log.eval_steps:
        ax.plot(log.eval_steps, log.eval_loss, color=color, linestyle="none", marker="o", markeredgecolor="black")


def _loss_axes(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)


def write_training_loss_png(run_dir: str | Path) -> Path | None:
    """run_dir/training_loss.png: training loss per logged step, evaluation loss as dots.
    None (and no file) when the run logged no step."""
    run_dir = Path(run_dir)
    log = read_loss_log(run_dir)
    if not log.steps and not log.eval_steps:
        return None
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    _plot_losses(ax, log, "tab:blue", "training loss")
    if log.eval_steps:
        ax.plot([], [], color="tab:blue", linestyle="none", marker="o", markeredgecolor="black", label="evaluation loss")
    _loss_axes(ax)
    ax.set_title(run_dir.name)
    ax.legend()
    return _save(fig, run_dir / TRAINING_LOSS_PNG)


class PlottedGroup(Protocol):
    """What `metric_vs_x_png` reads of a group of seeds (report.Group)."""

    task: str
    model: str
    metric: str
    density: float | None
    runs: Sequence[Any]

    @property
    def mean(self) -> float: ...

    @property
    def std(self) -> float: ...

    @property
    def trainable_params(self) -> int | None: ...

    def label(self, with_model: bool = False) -> str: ...


def short_model_name(name: str) -> str:
    return name.removeprefix("pkg:").rstrip("/").removesuffix("/model").split("/")[-1]


def format_params(count: int | None) -> str:
    if count is None:
        return "?"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def loss_curves_png(runs: Sequence[tuple[str, Path]], path: Path) -> Path:
    """Every run's training loss (lines) and evaluation loss (dots) on one axes, one colour per run,
    each labelled (by the report: its settings that differ from the other runs' and its seed)."""
    from matplotlib import colormaps

    fig = _figure(9.0, 5.0)
    ax = fig.add_subplot()
    colors = colormaps["tab10" if len(runs) <= 10 else "tab20"].colors
    for i, (label, run_dir) in enumerate(runs):
        _plot_losses(ax, read_loss_log(run_dir), colors[i % len(colors)], label)
    _loss_axes(ax)
    ax.set_title("training loss (lines) and evaluation loss (dots)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    return _save(fig, path)


def metric_vs_x_png(groups: Sequence[PlottedGroup], path: Path, x: str = "density") -> Path:
    """One panel per task: SpaRTA's metric against density (or trainable parameters), log x, error
    bars = std over seeds. Against density, the other methods are horizontal reference lines
    (± std band) labelled with their trainable-parameter counts; against parameters, points."""
    tasks = list(dict.fromkeys(g.task for g in groups))
    many_models = len({g.model for g in groups}) > 1
    fig = _figure(6.4 * len(tasks) + (2.6 if x == "density" else 0), 4.6)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        mine = [g for g in groups if g.task == task]
        sparta_lines: dict[str, list[PlottedGroup]] = {}
        for g in mine:
            if g.density is not None or x == "trainable_params":
                sparta_lines.setdefault(g.label(with_model=many_models), []).append(g)
        refs = [g for g in mine if g.density is None] if x == "density" else []
        for label, line in sparta_lines.items():
            xs = [g.density if x == "density" else g.trainable_params for g in line]
            ys = [g.mean for g in line]
            errs = [0.0 if math.isnan(g.std) else g.std for g in line]
            if x == "trainable_params":
                label = f"{label} ({', '.join(f'd={g.density:g}' for g in line)})" if line[0].density else label
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4, label=label)
        for i, g in enumerate(refs):
            style = {"color": f"C{len(sparta_lines) + i}", "linestyle": ("--", ":", "-.")[i % 3]}
            ax.axhline(g.mean, label=f"{g.label(with_model=many_models)} ({format_params(g.trainable_params)} params)", **style)
            if not math.isnan(g.std):
                ax.axhspan(g.mean - g.std, g.mean + g.std, color=style["color"], alpha=0.12)
        ax.set_xscale("log")
        if x == "density":  # label the densities swept, not just the powers of ten
            densities = sorted({g.density for g in mine if g.density is not None})
            ax.set_xticks(densities, labels=[f"{d:g}" for d in densities])
            ax.xaxis.set_minor_formatter("")
        ax.set_xlabel("density (fraction of each target matrix trained)" if x == "density" else "trainable parameters")
        ax.set_ylabel(f"{mine[0].metric} (mean ± std over seeds)")
        n_seeds = sorted({len(g.runs) for g in mine})
        seeds = f"{n_seeds[0]}" if len(n_seeds) == 1 else f"{n_seeds[0]}-{n_seeds[-1]}"
        ax.set_title(f"{task} ({short_model_name(mine[0].model)}): {seeds} seed{'s' if n_seeds[-1] > 1 else ''} per point")
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        first = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("SpaRTA"))  # SpaRTA, then references
        where = {"loc": "center left", "bbox_to_anchor": (1.01, 0.5), "frameon": False} if x == "density" else {}
        ax.legend([handles[i] for i in first], [labels[i] for i in first], fontsize="small", **where)
    return _save(fig, path)
