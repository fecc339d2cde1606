"""`sparta report`: many runs in, one comparison out (table, CSV, Markdown, plots).

A run is a folder with config.yaml; it is finished when all_results.json exists. Runs are
grouped by every recipe setting except the seed (so 20-step and 125-step runs never share a
mean), and each group's metric is averaged over its seeds: only different seeds make a ±. The
settings that differ between groups are named in the table, the CSV and the plots' legends.
Unfinished runs are listed, never dropped silently.
"""

from __future__ import annotations

import csv
import glob
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sparta_cli.config import TaskConfig, read_by_another_method
from sparta_cli.console import console
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import make_dir, write_text
from sparta_cli.outputs import REPORT_TAG, check_not_an_input, check_report_folder
from sparta_cli.plots import short_model_name
from sparta_cli.runs import ALL_RESULTS, CHECKPOINT_DIR, CONFIG_YAML, Run, read_started_run
from sparta_cli.tuners import METHODS, method_config
from sparta_cli.tuners.config import MethodConfig

METHOD_ORDER = tuple(METHODS)
CSV_COLUMNS = ("task", "model", "method", "density", "lora_r", "settings", "trainable_params", "n_seeds", "seeds", "metric",
               "mean", "std")
# Recipe keys that may differ between the seeds of one group; every other setting splits groups.
PER_SEED_KEYS = ("seed", "adapter.seed", "output_dir")
# Settings the table shows in columns of their own (not again under `settings`).
SHOWN_KEYS = ("task.name", "model.name_or_path", "adapter.method", "adapter.density", "adapter.r")


class ReportedRun(Run):
    """A run as the report groups it: runs.Run (read by runs.read_started_run) and the settings it is grouped by."""

    @property
    def task(self) -> str:
        return task_key(self.recipe["task"].get("name"))

    @property
    def adapter(self) -> MethodConfig:
        """The run's adapter settings as it ran (SpaRTA's budget beside its density): the keys its method
        reads (older runs recorded every method's)."""
        settings = method_config(self.method)
        return settings.model_validate(settings.own_keys(self.recipe["adapter"]), context={"recorded": True})

    @property
    def density(self) -> float | None:
        return self.adapter.sizes().get("density")

    @property
    def lora_r(self) -> int | None:
        r = self.adapter.sizes().get("r")
        return None if r is None else int(r)

    @property
    def settings(self) -> dict[str, str]:
        """Every recipe setting but the per-seed ones, as dotted key -> YAML text, the task's name
        written one way (SST2, SST-2 and sst2 are one task), adapter keys its method does not read
        left out (older runs recorded them all)."""
        from sparta_cli.sweep import flatten

        recipe = {key: value for key, value in self.recipe.items() if key != "run"}
        flat = flatten(recipe)
        flat["task.name"] = self.task
        return {key: _text(value) for key, value in sorted(flat.items())
                if not key.startswith(PER_SEED_KEYS) and not (key.startswith("adapter.") and read_by_another_method(key[8:], self.method))}


def task_key(name: str | None) -> str:
    """One spelling per task: a known task by its canonical name (SST2, SST-2 -> sst2)."""
    from sparta_cli.tasks import KNOWN_TASKS, normalise

    if not name:
        return "custom"
    return normalise(str(name)) if normalise(str(name)) in KNOWN_TASKS else str(name)


def _text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


@dataclass
class Group:
    """Runs with the same settings (all of them but the seed) and distinct seeds."""

    task: str
    model: str
    method: str
    density: float | None
    lora_r: int | None
    metric: str
    runs: list[ReportedRun] = field(default_factory=list)
    differing: dict[str, str] = field(default_factory=dict)  # this group's values of the settings that differ between groups

    @property
    def values(self) -> list[float]:
        return [float(run.results[result_key(self.metric)]) for run in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds; NaN for a single seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    @property
    def trainable_params(self) -> int | None:
        counts = [run.trainable_params for run in self.runs if run.trainable_params is not None]
        return round(statistics.fmean(counts)) if counts else None

    @property
    def extra(self) -> str:
        """The differing settings the table has no column for, e.g. `max_steps=20 lr=0.002`."""
        return " ".join(f"{key.split('.')[-1]}={value}" for key, value in self.differing.items() if key not in SHOWN_KEYS)

    def label(self, with_model: bool = False) -> str:
        name = method_config(self.method).display_name
        name = f"{name} r={self.lora_r}" if self.lora_r else name
        name = f"{name} · {self.extra}" if self.extra else name
        return f"{name} · {short_model_name(self.model)}" if with_model else name

    def run_label(self, run: ReportedRun) -> str:
        """A loss curve's legend entry: the group's differing settings and the run's seed."""
        density = f" d={self.density:g}" if self.density is not None else ""
        return f"{self.label()}{density} · seed {run.seed}"


def result_key(metric: str) -> str:
    """The all_results.json key of a metric: `accuracy` is the evaluation's (`eval_accuracy`);
    `test_accuracy` is the evaluation split's score of a run that selected on held-out rows."""
    return metric if metric.startswith("test_") else f"eval_{metric}"


# ---------------------------------------------------------------- reading runs


def find_run_dirs(patterns: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Run folders named by paths or globs; a folder that is not a run is searched for runs inside.

    Also returns folders that hold no run at all, with why (a run that died before writing config.yaml).
    """
    runs: list[Path] = []
    empty: list[tuple[Path, str]] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise SpartaError(f"`{pattern}` matches nothing: give run directories or a glob such as 'runs/sst2/*'")
        for match in map(Path, matches):
            if not match.is_dir():
                if not glob.has_magic(pattern):
                    raise SpartaError(f"{match} is not a directory: give run directories or folders holding them")
                continue  # e.g. the sweep's <run>.log files next to the runs
            if (match / CONFIG_YAML).is_file():
                runs.append(match)
                continue
            inside = sorted(p.parent for p in match.rglob(CONFIG_YAML)
                            if not any(CHECKPOINT_DIR.match(part) for part in p.relative_to(match).parts))
            runs.extend(inside)
            if not inside:
                empty.append((match, f"no {CONFIG_YAML}: the run stopped before it started training (see its log)"))
    unique = list(dict.fromkeys(p.resolve() for p in runs))
    return unique, empty


def main_metric(run: ReportedRun) -> str:
    """The task's main metric (accuracy, matthews_correlation, ...), as `sparta train` reports it."""
    from sparta_cli.tasks import resolve_task

    try:
        return resolve_task(TaskConfig(**run.recipe["task"])).main_metric
    except ValidationError as exc:  # a damaged config.yaml's task
        error = exc.errors()[0]
        why = f"task.{'.'.join(map(str, error['loc']))}: {error['msg']}" if error["loc"] else error["msg"]
    except SpartaError as exc:  # a task this sparta does not know, or a custom task's files gone
        why = str(exc)
    raise SpartaError(f"cannot tell the main metric of {run.path} ({why}): pass --metric, e.g. --metric accuracy")


# ---------------------------------------------------------------- grouping


def group_runs(runs: list[ReportedRun], metric: str | None = None) -> tuple[list[Group], list[tuple[Path, str]]]:
    """Groups of finished runs (sorted by task, model, method, setting) and the runs left out, with why.

    Runs that share every setting *and* the seed are repeats, not a spread over seeds: each
    becomes a group of its own (no ±), and `repeated_seeds` names them."""
    groups: dict[tuple, Group] = {}
    left_out: list[tuple[Path, str]] = []
    metric_of_task: dict[str, str] = {}
    for run in runs:
        if run.results is None:
            left_out.append((run.path, f"unfinished: no {ALL_RESULTS} (failed or still running)"))
            continue
        name = (metric or metric_of_task.get(run.task) or main_metric(run)).removeprefix("eval_")
        metric_of_task.setdefault(run.task, name)
        if result_key(name) not in run.results:
            found = ", ".join(k.removeprefix("eval_") for k in run.results if k.startswith(("eval_", "test_"))) or "none"
            left_out.append((run.path, f"no {result_key(name)} in {ALL_RESULTS} (it has: {found})"))
            continue
        value = run.results[result_key(name)]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            left_out.append((run.path, f"its {result_key(name)} is {value} (a correlation of constant predictions is nan)"))
            continue
        key = (run.task, run.model, run.method, run.density, run.lora_r, name)
        settings = tuple(run.settings.items())
        group = groups.setdefault((*key, settings), Group(*key))
        group.runs.append(run)
    split: list[Group] = []
    for group in groups.values():
        group.runs.sort(key=lambda run: (run.seed, str(run.path)))
        seeds = group.seeds
        if len(set(seeds)) == len(seeds):
            split.append(group)
        else:  # repeats of one seed: one row each
            split += [Group(group.task, group.model, group.method, group.density, group.lora_r, group.metric, [run])
                      for run in group.runs]
    differing = differing_settings(split)
    for group in split:
        mine = group.runs[0].settings
        group.differing = {key: mine[key] for key in differing if key in mine}
    ordered = sorted(split, key=lambda g: (g.task, g.model, _method_rank(g.method), g.density or 0.0, g.lora_r or 0,
                                           g.extra, str(g.runs[0].path)))
    return ordered, left_out


def differing_settings(groups: list[Group]) -> list[str]:
    """Settings with more than one value among the groups that have them (all of them, in key order;
    a key only some methods read, like adapter.r, differs only between groups of those methods)."""
    keys = sorted({key for g in groups for key in g.runs[0].settings})
    return [key for key in keys if len({g.runs[0].settings[key] for g in groups if key in g.runs[0].settings}) > 1]


def repeated_seeds(groups: list[Group]) -> list[str]:
    """Lines naming runs that share every setting and the seed: they are shown one per row, never averaged."""
    repeats: dict[tuple, list[ReportedRun]] = {}
    for g in groups:
        for run in g.runs:
            repeats.setdefault((g.task, g.metric, run.seed, tuple(run.settings.items())), []).append(run)
    return [f"{len(runs)} runs share every setting and seed {runs[0].seed} ({', '.join(r.path.name for r in runs)}): "
            "shown one per row without ± (only different seeds make a spread); give them different seeds to average them"
            for runs in repeats.values() if len(runs) > 1]


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


# ---------------------------------------------------------------- writing


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def to_csv(groups: list[Group]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for g in groups:
        writer.writerow([g.task, g.model, g.method, "" if g.density is None else repr(g.density), g.lora_r or "",
                         " ".join(f"{key}={value}" for key, value in g.differing.items() if key not in SHOWN_KEYS),
                         g.trainable_params or "", len(g.runs), " ".join(map(str, g.seeds)), g.metric,
                         repr(g.mean), "" if math.isnan(g.std) else repr(g.std)])
    return buffer.getvalue()


def _rows(groups: list[Group]) -> list[list[str]]:
    return [[g.task, short_model_name(g.model), g.label(), "" if g.density is None else f"{g.density:g}",
             f"{g.trainable_params:,}" if g.trainable_params else "?", " ".join(map(str, g.seeds)),
             g.metric, _number(g.mean), _number(g.std)] for g in groups]


HEADER = ["task", "model", "method", "density", "trainable params", "seeds", "metric", "mean", "std"]


def notes(groups: list[Group]) -> list[str]:
    """What the reader must know to compare the rows: the settings that differ, and repeated seeds."""
    differ = differing_settings(groups)
    lines = [f"settings that differ between rows: {', '.join(differ)}"] if differ else []
    return lines + repeated_seeds(groups)


def to_markdown(groups: list[Group], left_out: list[tuple[Path, str]], images: list[str]) -> str:
    lines = [REPORT_TAG, "", "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(groups)]
    lines += [f"\nNote: {line}" for line in notes(groups)]
    lines += [""] + [f"![{Path(image).stem}]({image})" for image in images]
    if left_out:
        lines += ["", f"Left out ({len(left_out)}):", ""] + [f"- `{path}`: {why}" for path, why in left_out]
    return "\n".join(lines) + "\n"


def print_table(groups: list[Group], left_out: list[tuple[Path, str]]) -> None:
    from rich.table import Table

    rows = _rows(groups)
    # columns that hold one value throughout (task, model, metric) move into the title to save width
    shared = [i for i, name in enumerate(HEADER) if name in ("task", "model", "metric") and len({r[i] for r in rows}) == 1]
    keep = [i for i in range(len(HEADER)) if i not in shared]
    table = Table(*(HEADER[i] for i in keep), title=" · ".join(["sparta report", *(rows[0][i] for i in shared)]))
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    console.print(table)
    for line in notes(groups):
        console.print(f"[yellow]note[/]: {line}", markup=True, highlight=False)
    for path, why in left_out:
        console.print(f"[yellow]left out[/] {path}: {why}")


def write_report(patterns: list[str], output: Path, metric: str | None = None, x: str = "density") -> Path:
    """Read the runs, print the table, and write report.csv, report.md and the two plots into `output`."""
    from sparta_cli.plots import loss_curves_png, metric_vs_x_png

    if x not in ("density", "trainable_params"):
        raise SpartaError(f"--x {x} is not a choice: use density or trainable_params")
    run_dirs, left_out = find_run_dirs(patterns)
    runs = [ReportedRun(**vars(read_started_run(path))) for path in run_dirs]
    groups, unfinished = group_runs(runs, metric)
    left_out += unfinished
    if not groups:
        finished = [run for run in runs if run.results is not None]
        if finished and metric:
            have = sorted({key.removeprefix("eval_") for run in finished for key in run.results
                           if key.startswith("eval_") and key != "eval_num_examples"})
            raise SpartaError(f"none of the {len(finished)} finished runs among {', '.join(patterns)} has metric {metric}: "
                              f"they have {', '.join(have) or 'no evaluation metrics'}; pass e.g. --metric {have[0] if have else 'accuracy'}")
        raise SpartaError(f"no finished runs among {', '.join(patterns)} ({len(left_out)} unfinished): "
                          "point `sparta report` at run directories holding all_results.json")
    images = [f"metric_vs_{x}.png", "loss_curves.png"]
    check_not_an_input(output, run_dirs, fix="choose a new folder for --output")
    check_report_folder(output, ["report.csv", "report.md", *images])
    make_dir(output)
    # report.md first: its REPORT_TAG marks the folder as a report's, so one that fails midway never blocks its rerun
    write_text(output / "report.md", to_markdown(groups, left_out, images))
    write_text(output / "report.csv", to_csv(groups))
    metric_vs_x_png(groups, output / images[0], x=x)
    loss_curves_png([(g.run_label(run), run.path) for g in groups for run in g.runs], output / images[1])
    print_table(groups, left_out)
    console.print(f"[green]wrote[/] {output}/report.csv, report.md, {images[0]}, {images[1]}")
    return output
