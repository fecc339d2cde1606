"""The learning-rate sweep behind docs/learning_rates.md: the best SpaRTA rate per (task, density)
on a held-out part of the training set, and the power law fitted through the best rates.

    .venv/bin/python scripts/lr_sweep.py OUT [--tasks sst2 stsb] [--jobs 2] [--table-only]

Each (task, density) trains at every rate of its grid (`GRID`, log-spaced, shifted towards larger
rates at lower densities) with MiniLM, SpaRTA on v,o; data: `scripts/holdout_glue.py` keeps
`VAL` training rows apart as the validation set and trains on `TRAIN` others. A run whose
all_results.json exists is skipped, so rerunning continues an interrupted sweep. The best rate is
the one with the lowest validation loss (smoother than accuracy at these budgets; the table shows
both); `sparta_cli.lr_rule.fit_power_law` fits lr* = c * density^-a through them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sparta_cli.lr_rule import fit_power_law  # noqa: E402

TRAIN, VAL = 1000, 400
GRID = {  # density -> rates (factor ~3.16 apart)
    0.002: [1e-2, 3e-2, 1e-1, 3e-1],
    0.01: [3e-3, 1e-2, 3e-2, 1e-1],
    0.05: [1e-3, 3e-3, 1e-2, 3e-2],
}
MAX_LENGTH = {"sst2": 64, "stsb": 128, "mrpc": 128, "rte": 128}
MAIN = {"sst2": "accuracy", "stsb": "pearson", "mrpc": "accuracy", "rte": "accuracy"}
COMMON = ["training.batch_size=16", "training.epochs=1", "training.warmup_steps=6", "training.eval_every=null",
          "data.max_train_samples=null", "data.max_eval_samples=null", "adapter.method=sparta", "adapter.targets=[v,o]", "seed=1"]


def run_dir(out: Path, task: str, density: float, lr: float) -> Path:
    return out / "runs" / task / f"d{density:g}-lr{lr:g}"


def train(out: Path, task: str, density: float, lr: float) -> None:
    folder = run_dir(out, task, density, lr)
    if (folder / "all_results.json").is_file():
        return
    cmd = [sys.executable, "-m", "sparta_cli", "train", str(HERE.parent / "configs/quickstart.yaml"), *COMMON,
           f"task.name={task}", f"data.dir={out / 'data'}", f"data.max_length={MAX_LENGTH[task]}",
           f"adapter.density={density}", f"training.lr={lr}", f"output_dir={folder}", "--overwrite"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    print(f"{'done' if rc == 0 else f'FAILED ({rc})'} {folder}", flush=True)


def results(out: Path, tasks: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        for density, rates in GRID.items():
            for lr in rates:
                path = run_dir(out, task, density, lr) / "all_results.json"
                if path.is_file():
                    res = json.loads(path.read_text())
                    rows.append({"task": task, "density": density, "lr": lr, "loss": res["eval_loss"],
                                 "metric": res.get(f"eval_{MAIN[task]}", float("nan")), "train_s": res.get("train_runtime")})
    return rows


def report(rows: list[dict], tasks: list[str]) -> None:
    print("| task | density | " + " | ".join(f"lr {lr:g}" for lr in sorted({r["lr"] for r in rows})) + " |")
    lrs = sorted({r["lr"] for r in rows})
    print("|---|---|" + "---|" * len(lrs))
    best = []
    for task in tasks:
        for density in GRID:
            cell = {r["lr"]: r for r in rows if r["task"] == task and r["density"] == density}
            if not cell:
                continue
            top = min(cell.values(), key=lambda r: r["loss"])
            complete = len(cell) == len(GRID[density])
            edge = top["lr"] in (min(GRID[density]), max(GRID[density]))
            if complete:
                best.append((task, density, top["lr"], edge))
            shown = [f"**{cell[lr]['loss']:.3f} / {cell[lr]['metric']:.3f}**" if cell.get(lr) is top
                     else (f"{cell[lr]['loss']:.3f} / {cell[lr]['metric']:.3f}" if lr in cell else "") for lr in lrs]
            print(f"| {task} | {density:g} | " + " | ".join(shown) + " |")
    print("\ncells: validation loss / main metric (SST-2 accuracy, STS-B Pearson); bold: lowest loss\n")
    for task, density, lr, edge in best:
        print(f"best {task} d={density:g}: lr {lr:g}" + (" (at the grid's edge)" if edge else ""))
    if len({d for _, d, _, _ in best}) >= 2:
        c, a = fit_power_law([(d, lr) for _, d, lr, _ in best])
        print(f"fit over {len(best)} best rates: lr* = {c:.3g} * density^-{a:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "stsb"])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.table_only:
        if not (out / "data").is_dir():
            subprocess.check_call([sys.executable, str(HERE / "holdout_glue.py"), str(out / "data"), "--tasks", *args.tasks,
                                   "--val", str(VAL), "--train", str(TRAIN), "--seed", "0"], env=os.environ)
        # density by density, task by task: a sweep cut short holds whole rows
        plan = [(task, d, lr) for d in GRID for task in args.tasks for lr in GRID[d]]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda p: train(out, *p), plan))
    report(results(out, args.tasks), args.tasks)


if __name__ == "__main__":
    main()
