"""The learning-rate sweep behind docs/learning_rates.md: the best SpaRTA rate per (task, density)
on a held-out part of the training set, and the power law fitted through the best rates.

    .venv/bin/python scripts/lr_sweep.py OUT [--tasks sst2 stsb] [--jobs 2] [--table-only]

Every run: MiniLM, SpaRTA on v,o, one epoch; data: `scripts/holdout_glue.py` keeps
`VAL` training rows apart as the validation set and trains on `TRAIN` others. A run whose
all_results.json exists is skipped, so rerunning continues an interrupted sweep. The best rate is
the one with the lowest validation loss (smoother than accuracy at these budgets; the table shows
both); the parabola through the best rate's and its neighbours' (log lr, loss) refines it between
grid points (`interpolated_optimum`). Each (task, density) starts at two rates of `START` and walks the half-decade `LADDER` outwards
until the best rate has a worse neighbour on both sides (or the ladder ends), so the grid follows
the optimum instead of being fixed in advance. `sparta_cli.lr_rule.fit_power_law` fits
lr* = c * density^-a through the best rates.
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
sys.path.insert(0, str(HERE))
from holdout_glue import FOLDERS  # noqa: E402

from sparta_cli.lr_rule import fit_power_law, interpolated_optimum  # noqa: E402

TRAIN, VAL = 1000, 400
LADDER = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # half-decade steps
START = {0.002: (3e-2, 1e-1), 0.01: (1e-2, 3e-2), 0.05: (3e-3, 1e-2)}  # density -> first two rates tried
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


def bracketed(cell: dict[float, dict], lr: float) -> bool:
    """The best rate has been beaten by nothing and has a measured neighbour on each side (or is at the ladder's end)."""
    i = LADDER.index(lr)
    return all(j < 0 or j >= len(LADDER) or LADDER[j] in cell for j in (i - 1, i + 1))


def sweep_cell(out: Path, task: str, density: float) -> None:
    """Walk the ladder from START until the lowest validation loss is bracketed."""
    for lr in START[density]:
        train(out, task, density, lr)
    while True:
        cell = {r["lr"]: r for r in results(out, [task]) if r["density"] == density}
        if not cell:
            return  # every run failed: the log says why
        top = min(cell.values(), key=lambda r: r["loss"])["lr"]
        if bracketed(cell, top):
            return
        i = LADDER.index(top)
        train(out, task, density, next(LADDER[j] for j in (i - 1, i + 1) if 0 <= j < len(LADDER) and LADDER[j] not in cell))


def results(out: Path, tasks: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        for density in START:
            for lr in LADDER:
                path = run_dir(out, task, density, lr) / "all_results.json"
                if path.is_file():
                    res = json.loads(path.read_text())
                    rows.append({"task": task, "density": density, "lr": lr, "loss": res["eval_loss"],
                                 "metric": res.get(f"eval_{MAIN[task]}", float("nan")), "train_s": res.get("train_runtime")})
    return rows


def report(rows: list[dict], tasks: list[str]) -> None:
    lrs = sorted({r["lr"] for r in rows})
    print("| task | density | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    print("|---|---|" + "---|" * len(lrs))
    best = []
    for task in tasks:
        for density in START:
            cell = {r["lr"]: r for r in rows if r["task"] == task and r["density"] == density}
            if not cell:
                continue
            top = min(cell.values(), key=lambda r: r["loss"])
            if bracketed(cell, top["lr"]):
                refined = interpolated_optimum([(lr, r["loss"]) for lr, r in cell.items()])
                best.append((task, density, top["lr"], refined))
            shown = [f"**{cell[lr]['loss']:.3f} / {cell[lr]['metric']:.3f}**" if cell.get(lr) is top
                     else (f"{cell[lr]['loss']:.3f} / {cell[lr]['metric']:.3f}" if lr in cell else "") for lr in lrs]
            print(f"| {task} | {density:g} | " + " | ".join(shown) + " |")
    print("\ncells: validation loss / main metric (SST-2 accuracy, STS-B Pearson); bold: lowest loss\n")
    for task, density, lr, refined in best:
        print(f"best {task} d={density:g}: lr {lr:g} on the grid, {refined:.3g} at the vertex of the parabola through its neighbours")
    if len({d for _, d, _, _ in best}) >= 2:
        for which, index in (("grid", 2), ("vertex", 3)):
            c, a = fit_power_law([(row[1], row[index]) for row in best])
            print(f"fit over {len(best)} best rates ({which}): lr* = {c:.3g} * density^-{a:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "stsb"])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.table_only:
        missing = [task for task in args.tasks if not (out / "data" / "glue" / FOLDERS[task] / "dev.tsv").is_file()]
        if missing:  # a task added to an existing sweep gets its own held-out copy; the others keep theirs
            subprocess.check_call([sys.executable, str(HERE / "holdout_glue.py"), str(out / "data"), "--tasks", *missing,
                                   "--val", str(VAL), "--train", str(TRAIN), "--seed", "0"], env=os.environ)
        cells = [(task, d) for d in sorted(START, reverse=True) for task in args.tasks]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda c: sweep_cell(out, *c), cells))
    report(results(out, args.tasks), args.tasks)


if __name__ == "__main__":
    main()
