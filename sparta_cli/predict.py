"""`sparta predict TARGET`: one prediction per row of a split, or of your own file, in GLUE's submission format.

The format of transformers' run_glue.py `predict_results_<task>.txt`: a header `index<TAB>prediction`,
then one line per input row in input order, with the label name (the score with 3 decimals for
regression, STS-B). One split per call, so MNLI's matched and mismatched sets go to files of their
own (`--split test_matched`, `--split test_mismatched`), as GLUE wants them.

TARGET is a run or a merged checkpoint, loaded as `sparta eval` loads it; predictions come from the
one evaluation path (`evaluation.predict`) over the same tokenized data. Every row gets a prediction:
rows longer than `data.max_length` are truncated, never dropped, and no sample limit applies.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sparta_cli.console import console
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import input_file
from sparta_cli.tasks import Task

DEFAULT_SPLIT = "test"


def format_predictions(preds: np.ndarray, label_names: tuple[str, ...] | None) -> str:
    """`index<TAB>prediction` lines: label names, or scores with 3 decimals when there are none (regression)."""
    if label_names is None:
        rows = [f"{index}\t{float(value):.3f}" for index, value in enumerate(preds)]
    else:
        rows = [f"{index}\t{label_names[int(value)]}" for index, value in enumerate(preds)]
    return "\n".join(["index\tprediction", *rows]) + "\n"


def file_task(task: Task, path: Path) -> Task:
    """The run's task reading `path` (CSV, TSV or JSONL with the task's text fields) as its test split.
    The label column may be left out; where present, it holds the task's label names."""
    if task.source == "mmlu":
        raise SpartaError("--file reads rows of text fields; MMLU rows are prompts built from questions: predict --split instead")
    fix = f"give a CSV, TSV or JSONL file with the columns {', '.join(task.text_fields)}"
    input_file(path, f"--file {path} does not exist: {fix}", fix, setting="--file ")
    return replace(task, source="custom", files={"test": str(path)}, splits=("test",), eval_splits=(), aliases={})


def run_predict(target: str, *, split: str | None = None, file: Path | None = None, output: Path, overwrite: bool = False,
                task: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Write TARGET's predictions for `split` (default: test) or for the rows of `file` to `output`."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from sparta_cli.data import make_loader, tokenize_split
    from sparta_cli.evaluate_cmd import BASE, eval_recipe, load_scored_model, target_kind
    from sparta_cli.evaluation import predict
    from sparta_cli.fileio import write_text
    from sparta_cli.models import check_model_source
    from sparta_cli.outputs import check_not_an_input, check_overwritable_file, recipe_inputs
    from sparta_cli.placement import mixed_precision
    from sparta_cli.preflight import preflight
    from sparta_cli.tasks import resolve_task

    if split is not None and file is not None:
        raise SpartaError("--split and --file name two inputs: pass one")
    output = Path(output)
    kind = target_kind(target)
    if kind == BASE:
        raise SpartaError(f"{target} is a base model with no trained head: its predictions would be random; predict with a run or a merged checkpoint")
    recipe = eval_recipe(target, kind, task, list(overrides or []))
    inputs = [Path(target).expanduser(), *([Path(file).expanduser()] if file is not None else []), *recipe_inputs(recipe)]
    check_not_an_input(output, inputs, fix="choose another file for --output")  # before --overwrite is even asked about
    check_overwritable_file(output, command="predict", overwrite=overwrite, example="predictions.tsv")
    recipe.data.overlong = "truncate"  # one prediction per row: nothing dropped
    run_task = resolve_task(recipe.task)
    if not run_task.kind.trainable:
        raise SpartaError("predict writes a classifier's predictions; task.head=lm scores a base model: use sparta eval")
    if run_task.kind.token_level:
        raise SpartaError(f"predict writes a classifier's labels; {target} was fine-tuned to write answers (task.type: sft): "
                          "use sparta generate for its answers, or sparta eval for its loss")
    scored_task = file_task(run_task, Path(file).expanduser()) if file is not None else run_task
    where = "test" if file is not None else (split or DEFAULT_SPLIT)
    if file is None:
        preflight(recipe, targets=False, splits=[where])  # paths and the split's files before the model loads
    else:
        check_model_source(recipe.model)  # the run's data folder plays no part
    set_seed(recipe.seed)
    model, tokenizer, scorer, _ = load_scored_model(kind, target, recipe, run_task)

    accelerator = Accelerator(mixed_precision=mixed_precision(recipe, next(model.parameters()).dtype), cpu=not torch.cuda.is_available())
    model.to(accelerator.device).eval()
    with accelerator.main_process_first():
        data = tokenize_split(scored_task, where, tokenizer, recipe)
    loader = accelerator.prepare(make_loader(data.dataset, tokenizer, recipe.training.eval_batch_size, shuffle=False, seed=recipe.seed))
    preds, _, _ = predict(model, loader, accelerator, scorer)
    source = str(file) if file is not None else f"{run_task.name}/{where}"
    result = {"target": target, "task": run_task.name, "input": source, "rows": int(len(preds)), "truncated": data.truncated,
              "output": str(output)}
    if accelerator.is_main_process:
        write_text(output, format_predictions(preds, run_task.label_names))
        note = f" ({data.truncated} truncated at max_length={recipe.data.max_length})" if data.truncated else ""
        console.print(f"[green]wrote[/] {len(preds):,} predictions for {source}{note} to {output}")
    accelerator.wait_for_everyone()
    return result
