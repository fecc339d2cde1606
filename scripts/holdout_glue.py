"""Write a GLUE-layout copy of some tasks whose dev.tsv is a held-out part of the training set.

    .venv/bin/python scripts/holdout_glue.py OUT_DIR --tasks sst2 mrpc --val 500 --train 2000 --seed 0

OUT_DIR/glue/<TASK>/train.tsv holds `--train` rows (all the rest when omitted) and dev.tsv `--val`
other rows, drawn with `--seed`, header kept: `sparta train ... data.dir=OUT_DIR` then selects on
data the official dev split never saw, so the official dev split stays a test set. (The learning-rate
sweep of docs/learning_rates.md uses it; `data.validation_size` does the same inside one run.)
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE", "qnli": "QNLI", "wnli": "WNLI"}
HEADERLESS = {"cola"}


def split_rows(rows: list[str], n_val: int, n_train: int | None, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): a seeded shuffle, val first, then train from what is left."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = [rows[i] for i in order[:n_val]]
    rest = order[n_val:]
    train = [rows[i] for i in (rest if n_train is None else rest[:n_train])]
    return train, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", nargs="+", required=True, choices=sorted(FOLDERS))
    parser.add_argument("--val", type=int, required=True)
    parser.add_argument("--train", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SPARTA_DATA_DIR", "")))
    args = parser.parse_args()
    for task in args.tasks:
        source = args.data / "glue" / FOLDERS[task] / "train.tsv"
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        header, rows = ([], lines) if task in HEADERLESS else (lines[:1], lines[1:])
        train, val = split_rows(rows, args.val, args.train, args.seed)
        folder = args.out / "glue" / FOLDERS[task]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.tsv").write_text("".join(header + train), encoding="utf-8")
        (folder / "dev.tsv").write_text("".join(header + val), encoding="utf-8")
        print(f"{task}: {len(train)} train, {len(val)} held-out validation rows -> {folder}")


if __name__ == "__main__":
    main()
