"""`sparta eval TARGET`: score a run, a merged checkpoint or an untouched base model on a task.

TARGET is one of
  run        a folder with adapter_config.json (sparta_config.json for a full fine-tune): the base
             model from its config.yaml plus its adapter, on the run's own task;
  merged     a folder whose config.json is a `*ForSequenceClassification` model (what `sparta merge`
             writes), or a `*ForCausalLM` one that records a `finetuning_task` (a merged SFT run): the
             task from --task, else config.json's `finetuning_task` (as `task.type: sft` for a causal LM);
  base       any other model name or path (--task required). A base model has no trained
             classification head, so a classification task gets a random (seeded) one: that score
             is the chance baseline, and the output says so. MMLU with `task.head=lm` needs no new
             head: it is the model's real score.
Scores come from `evaluation.evaluate_split`, the code `sparta train` evaluates with.

Results go to --output, else `<run or checkpoint>/eval_results_<task>_<split>.json`, else (a base
model) `runs/eval/<model>/eval_results_<task>_<split>.json`. A run is scored on the whole evaluation
split, whatever subset (`data.max_eval_samples`) it evaluated on while training, unless an override
asks for one. A run's own eval_results.json, written by training,
is never overwritten: it records what training saw, and an eval may use other data or splits.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparta_cli.config import Recipe, build_recipe
from sparta_cli.console import console
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import read_json
from sparta_cli.runs import (
    CONFIG_YAML,
    STATE_FILE,
    causal_lm_architecture,
    eval_results_name,
    has_checkpoints,
    kept_chat_template,
    read_recipe_record,
    read_run,
    run_config_path,
)
from sparta_cli.tasks import Task, resolve_task

if TYPE_CHECKING:
    from sparta_cli.tuners.base import Adapter

RUN, MERGED, BASE = "run", "merged", "base"


def target_kind(target: str) -> str:
    """run, merged or base, from what the folder holds (a Hub name is a base model)."""
    path = Path(target).expanduser()
    if run_config_path(path) is not None:
        return RUN
    if (path / STATE_FILE).is_file():
        raise SpartaError(f"{target} is a training checkpoint (what --resume continues from), not an adapter: finish the run with "
                          f"`sparta train {path.parent}/config.yaml --resume`, then evaluate the run folder {path.parent}")
    if path.is_dir() and ((path / CONFIG_YAML).is_file() or has_checkpoints(path)):
        return RUN  # an unfinished run: loading its adapter says how to finish it
    if not path.exists() and _looks_local(target):
        raise SpartaError(f"{target} does not exist: give a run directory, a merged checkpoint or a base model (a Hub name is org/model)")
    config = path / "config.json"
    if config.is_file():
        recorded = read_model_config(path)
        architectures = recorded.get("architectures") or []
        if any(name.endswith("ForSequenceClassification") for name in architectures):
            return MERGED
        if recorded.get("finetuning_task") and causal_lm_architecture(architectures):
            return MERGED
    return BASE


def read_model_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json with the keys sparta reads checked (`architectures` a list of names,
    `id2label` a mapping): a damaged one is named, not a TypeError here or an AttributeError in transformers."""
    path = folder / "config.json"
    recorded = read_json(path)
    architectures = recorded.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise SpartaError(f"{path}: `architectures` is not a list of names: the file is damaged; re-merge it (or restore the model)")
    if not isinstance(recorded.get("id2label") or {}, dict):
        raise SpartaError(f"{path}: `id2label` is not a mapping: the file is damaged; re-merge it (or restore the model)")
    return recorded


def _looks_local(target: str) -> bool:
    """A path, not a Hub name (`org/model`): it starts like a path, has more than one `/`, ends in
    one, or its first part is a folder here (`runs/sst2-typo` when ./runs exists)."""
    if target.startswith((".", "/", "~")) or target.count("/") > 1 or target.endswith("/"):
        return True
    return "/" in target and Path(target.split("/")[0]).is_dir()


def eval_recipe(target: str, kind: str, task: str | None, overrides: list[str], trust_remote_code: bool = False) -> Recipe:
    """The recipe to score with: the run's own (config.yaml) or a minimal one, then the overrides."""
    path = Path(target).expanduser()
    if kind == RUN:
        raw = _run_recipe(path)
        if raw["task"].get("chat_template"):  # the copy the run kept, not the path's file in this folder
            raw["task"]["chat_template"] = kept_chat_template(path, raw["task"]["chat_template"])
        trained_on = raw["task"].get("name") or "custom"
        if task is not None and task != trained_on:
            if raw["task"].get("type") != "sft":
                raise SpartaError(
                    f"run {path} was trained on {trained_on}: its head scores that task only; "
                    f"drop --task, or evaluate its base model with --task {task}"
                )
            # an SFT run has no task head: it answers another task as chat, rendered with its own template
            raw["task"] = {"name": task, "type": "sft", "chat_template": raw["task"].get("chat_template")}
            (raw.get("training") or {}).pop("eval_generate_samples", None)  # the run's task's generation metrics
    else:
        task = task or (_recorded_task(path) if kind == MERGED else None)
        if task is None and not any(text.startswith("task.") for text in overrides):
            what = "checkpoint records no task (config.json finetuning_task)" if kind == MERGED else "is a base model"
            raise SpartaError(f"{target} {what}: pass --task, e.g. --task sst2")
        section = {"name": task} if task else {}
        if task and kind == MERGED and causal_lm_architecture(read_model_config(path).get("architectures") or []):
            section["type"] = "sft"  # a merged SFT run writes answers: scored by its loss on the task as chat
            if task == "custom" and not any(text.startswith(("task.validation_file=", "task.name=")) for text in overrides):
                raise SpartaError(f"{target} was merged from a run on your own files, which a checkpoint does not carry: "
                                  "pass task.validation_file=FILE (the run's or another), or --task NAME for a built-in task")
        raw = {"model": {"name_or_path": str(path) if kind == MERGED else target}, "task": section}
    return build_recipe(raw, overrides, trust_remote_code=trust_remote_code)


def _run_recipe(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml, its shapes checked (build_recipe drops its `run` record); without one, adapter_config.json."""
    recorded = read_recipe_record(run_dir)
    if recorded is not None:
        return recorded
    config = read_run(run_dir, tensors=False).config
    base = config.get("base_model", {})
    model = {key: base[key] for key in ("name_or_path", "gguf_file", "revision") if base.get(key)}
    return {"model": model, "task": {"name": config.get("task", {}).get("name")}}


def _recorded_task(path: Path) -> str | None:
    return read_model_config(path).get("finetuning_task")


def eval_splits(task: Task, split: str | None) -> list[str]:
    if split is not None:
        return [split]
    if not task.eval_splits:
        raise SpartaError(f"task {task.name} has no validation split: pass --split (one of {', '.join(task.splits)})")
    return list(task.eval_splits)


def load_scored_model(kind: str, target: str, recipe: Recipe, task: Task):
    """(model, tokenizer, scorer, head) where head says what makes the predictions."""
    from sparta_cli.models import load_for_causal_lm, load_for_classification

    if task.kind.head == "lm":
        if kind != BASE and not causal_target(kind, target):
            raise SpartaError(f"{target} has a trained classification head: score it with task.head=classifier (task.head=lm is for base models)")
        loaded = load_for_causal_lm(recipe.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        if kind == RUN:  # the body with the adapter in it (PEFT injects its layers in place), as the scorers call it
            model = _with_adapter(target, model).base
        if not task.kind.token_level:  # letters scored at a prompt's last token
            tokenizer.padding_side = "right"  # positions stay 0.. for every prompt
            tokenizer.truncation_side = "left"  # a long prompt loses its first shots, never "Answer:"
        return model, tokenizer, task.kind.scorer(task, tokenizer), "lm" if kind == BASE else "trained"
    if kind != BASE and causal_target(kind, target):
        raise SpartaError(f"{target} is a causal LM fine-tuned to write answers: score it on its task as chat (task.type=sft), "
                          "or on MMLU's letters (task.type=null task.head=lm)")

    if kind == MERGED:
        have = len(read_model_config(Path(target).expanduser()).get("id2label") or {})
        if have != task.num_labels:
            raise SpartaError(f"{target} has {have} outputs but {task.name} needs {task.num_labels}: pass the --task it was trained on")
    loaded = load_for_classification(
        recipe.model, task.num_labels, list(task.label_names or []) or None,
        problem_type=task.kind.problem_type,
    )
    model = loaded.model
    if kind == RUN:
        config = read_run(Path(target).expanduser(), tensors=False).config
        trained = config.get("task", {}).get("num_labels")
        if trained is not None and trained != task.num_labels:
            raise SpartaError(f"run {target} has {trained} outputs but its task now has {task.num_labels}: check its task files")
        model = _with_adapter(target, model).model
    return model, loaded.tokenizer, task.kind.scorer(task, loaded.tokenizer), "untrained" if kind == BASE else "trained"


def causal_target(kind: str, target: str) -> bool:
    """Whether a run or merged checkpoint is a causal LM (an SFT run), from the architecture it records."""
    path = Path(target).expanduser()
    if kind == RUN:
        return read_run(path, tensors=False).causal_lm
    return causal_lm_architecture(read_model_config(path).get("architectures") or [])


def _with_adapter(target: str, model) -> Adapter:
    """The run's adapter on its freshly loaded base (heads in fp32, as train.py trains and saves them)."""
    from sparta_cli.tuners import load_adapter

    config = read_run(Path(target).expanduser(), tensors=False).config
    for name in config.get("head_modules", []):
        model.get_submodule(name).float()
    return load_adapter(Path(target).expanduser(), model, config)


def run_eval(target: str, *, task: str | None, split: str | None, output: Path | None, overrides: list[str],
             trust_remote_code: bool = False) -> dict[str, Any]:
    """Score TARGET on the task's evaluation splits (or `split`), print a table, write the results."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.progress import Progress

    from sparta_cli.data import task_loader, tokenize_split
    from sparta_cli.evaluation import evaluate_split
    from sparta_cli.fileio import write_json
    from sparta_cli.generation import generation_sets
    from sparta_cli.models import fit_max_length
    from sparta_cli.placement import mixed_precision
    from sparta_cli.preflight import preflight

    kind = target_kind(target)
    recipe = eval_recipe(target, kind, task, overrides, trust_remote_code)
    if output is not None:
        from sparta_cli.outputs import check_not_an_input, check_replaceable_file, recipe_inputs

        check_not_an_input(output, [Path(target).expanduser(), *recipe_inputs(recipe)], fix="choose another file for --output")
        check_replaceable_file(output, command="eval", example="eval_results.json")
    trained_limit = recipe.data.max_eval_samples
    if kind == RUN and trained_limit is not None and not any(o.startswith("data.max_eval_samples=") for o in overrides):
        recipe.data.max_eval_samples = None
    task_obj = resolve_task(recipe.task)
    splits = eval_splits(task_obj, split)
    preflight(recipe, targets=False, splits=splits)  # paths and data before the model loads; a run's adapter names its own layers
    set_seed(recipe.seed)  # a base model's untrained head is the same on every call
    model, tokenizer, scorer, head = load_scored_model(kind, target, recipe, task_obj)
    fit_max_length(recipe, model)

    accelerator = Accelerator(mixed_precision=mixed_precision(recipe, next(model.parameters()).dtype), cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    say = console.print if main else (lambda *a, **k: None)
    model.to(accelerator.device).eval()
    with accelerator.main_process_first():
        data = {s: tokenize_split(task_obj, s, tokenizer, recipe, recipe.data.max_eval_samples) for s in splits}
    for name, tokenized in data.items():
        if not task_obj.kind.token_level and all(label == -1 for label in tokenized.dataset["labels"]):
            instead = next((s for s in task_obj.eval_splits if s != name), "validation")
            raise SpartaError(f"split {name} has no labels: score {instead} instead")

    say(f"[bold]sparta eval[/] {target} ({kind}) · {task_obj.name} · {', '.join(splits)}")
    if recipe.data.max_eval_samples is None and trained_limit is not None and kind == RUN:
        say(f"scoring every row of {', '.join(splits)} (training evaluated on the first {trained_limit}: "
            f"pass data.max_eval_samples={trained_limit} for the same rows)")
    if head == "untrained":
        say(f"[yellow]note[/]: {target} has no trained head for {task_obj.name}: its head is random, so these scores are a chance baseline")
    metrics: dict[str, float] = {}
    with Progress(console=console, transient=True, disable=not main) as progress:
        for name, tokenized in data.items():
            note = tokenized.note(task_obj, recipe.data.max_length)
            if note:
                say(note)
            loader = accelerator.prepare(task_loader(task_obj, tokenized.dataset, tokenizer, recipe.training.eval_batch_size,
                                                     shuffle=False, seed=recipe.seed))
            bar = progress.add_task(f"{task_obj.name}/{name}", total=len(loader))
            scores = evaluate_split(model, loader, accelerator, task_obj, name, scorer, progress=partial(progress.advance, bar))
            metrics.update({f"eval_{key}": value for key, value in scores.items()})
        for prompts in generation_sets(task_obj, recipe, tokenizer, splits):  # task.generation_metrics
            scores = prompts.score(model, tokenizer, recipe.training.eval_batch_size)
            metrics.update({f"eval_{key}": value for key, value in scores.items()})

    label = split or "+".join(splits)
    results = {
        "target": target, "kind": kind, "task": task_obj.name, "split": label, "head": head,
        "num_examples": {name: len(tokenized.dataset) for name, tokenized in data.items()},
        "truncated": {name: tokenized.truncated for name, tokenized in data.items()},
        "dropped": {name: tokenized.dropped for name, tokenized in data.items()},
        "metrics": metrics,
    }
    if task_obj.source == "mmlu":
        results["shots"] = recipe.task.shots
    if main:
        where = output or _default_output(target, kind, task_obj.name, label)
        write_json(where, results)
        console.print(results_table(results))
        say(f"[green]wrote[/] {where}")
    accelerator.wait_for_everyone()
    return results


def _default_output(target: str, kind: str, task: str, label: str) -> Path:
    """Beside a run or checkpoint; a base model's under runs/eval/<model>/ (never into the current folder)."""
    if kind in (RUN, MERGED):
        folder = Path(target).expanduser()
    else:
        from sparta_cli.report import short_model_name

        folder = Path("runs") / "eval" / short_model_name(target)
    return folder / eval_results_name(task, label)


def results_table(results: dict[str, Any]):
    """Metrics as a rich table; MMLU's per-subject rows stay in the JSON file."""
    from rich.table import Table

    table = Table(title=f"{results['task']} · {results['split']} · {results['kind']} ({results['head']} head)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results["metrics"].items():
        if "_subject_" in key:
            continue
        table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
    subjects = sum("_subject_" in key for key in results["metrics"])
    if subjects:
        table.caption = f"accuracy for each of {subjects} subjects in the JSON file"
    return table
