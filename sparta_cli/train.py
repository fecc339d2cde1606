"""`sparta train`: the one training loop, readable top to bottom (nanoGPT-style).

Accelerate handles devices, DDP, mixed precision and gradient accumulation; this file
handles the recipe: data, adapter, optimizer, schedule, evaluation, checkpoints and
the run directory. Only the main process writes files or prints.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.markup import escape

from sparta_cli.adapters import apply_adapter
from sparta_cli.checkpoint import TrainerState, checkpoints, load_best, load_checkpoint, save_checkpoint, usable_checkpoint
from sparta_cli.config import Recipe
from sparta_cli.console import Progress, console
from sparta_cli.data import make_loader, tokenize_split, validation_indices
from sparta_cli.errors import RunFailure, SpartaError
from sparta_cli.evaluation import classifier_scorer, evaluate_split
from sparta_cli.fileio import append_jsonl, read_json, write_json
from sparta_cli.metrics import lower_is_better, selectable_metrics
from sparta_cli.models import check_max_length, load_for_classification
from sparta_cli.outputs import release_run_dir
from sparta_cli.plots import write_training_loss_png
from sparta_cli.runs import (
    ALL_RESULTS,
    EVAL_RESULTS,
    TRAIN_RESULTS,
    TRAINER_LOG,
    check_output_dir,
    prepare_output_dir,
    truncate_log,
    write_run_config,
)
from sparta_cli.tasks import Task, resolve_task
from sparta_cli.trackers import accelerator_kwargs, log_record, start_trackers


class Interrupted(RunFailure):
    """Ctrl-C or SIGTERM: a checkpoint was written; exit 130 like a shell."""

    exit_code = 130


def mixed_precision(recipe: Recipe, model_dtype: torch.dtype) -> str:
    """bf16 autocast where the hardware has it, and always when the weights are half precision
    (the fp32 head then needs autocast to meet the body's activations)."""
    choice = recipe.training.mixed_precision
    if choice != "auto":
        return choice
    if model_dtype == torch.float16:
        return "fp16"
    if model_dtype == torch.bfloat16 or (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return "bf16"
    return "no"


def build_optimizer(adapter, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only: optimizer state is O(trainable)."""
    cfg = recipe.training
    head, body = [], []
    for name, param in adapter.trainable():
        (head if any(f"{m}." in f"{name}." for m in adapter.head_modules) else body).append(param)
    groups = [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr or cfg.lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


def total_steps(recipe: Recipe, batches_per_epoch: int) -> int:
    cfg = recipe.training
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step and exits cleanly."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ModelSelection:
    """Validation-based model selection: the best evaluation so far, its trainable tensors (a CPU
    copy, so the run can end with the best adapter rather than the last) and the evaluations since."""

    def __init__(self, metric: str, patience: int | None, trainable: dict[str, torch.Tensor]) -> None:
        self.key, self.lower, self.patience, self.trainable = f"eval_{metric}", lower_is_better(metric), patience, trainable
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.evals_since_best = 0
        self.best_tensors: dict[str, torch.Tensor] | None = None

    def update(self, step: int, results: dict[str, float]) -> None:
        if self._improves(results[self.key]):
            self.best_step, self.best_metrics, self.evals_since_best = step, dict(results), 0
            self.best_tensors = {name: t.detach().to("cpu", copy=True) for name, t in self.trainable.items()}
        else:
            self.evals_since_best += 1

    def _improves(self, value: float) -> bool:
        best = self.best_metrics.get(self.key)
        if best is None or (math.isnan(best) and not math.isnan(value)):
            return True
        return value < best if self.lower else value > best

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def restore_best(self) -> None:
        with torch.no_grad():
            for name, tensor in self.trainable.items():
                tensor.copy_(self.best_tensors[name])

    def state(self) -> dict:
        return {"best_step": self.best_step, "best_metrics": self.best_metrics, "evals_since_best": self.evals_since_best}

    def load(self, state: dict | None, tensors: dict[str, torch.Tensor] | None) -> None:
        if state and state.get("best_step") is not None:
            self.best_step, self.best_metrics = state["best_step"], state["best_metrics"]
            self.evals_since_best, self.best_tensors = state["evals_since_best"], tensors


def selection_metric(recipe: Recipe, task: Task) -> str:
    """The metric `training.best_metric` names (default: the task's main metric), checked against what the task reports."""
    metric = recipe.training.best_metric or task.main_metric
    choices = selectable_metrics(task)
    if metric.removeprefix("eval_") not in choices:
        raise SpartaError(f"training.best_metric = {metric}: {task.name} reports {', '.join(choices)}: choose one of them")
    return metric.removeprefix("eval_")


def _resume_point(run_dir: Path, recipe: Recipe, say, world_size: int = 1) -> Path | None:
    """The newest checkpoint that reads back whole (a damaged newer one is skipped with a warning),
    after checking it belongs to this recipe."""
    found = checkpoints(run_dir) if run_dir.is_dir() else []
    if not found:
        if (run_dir / ALL_RESULTS).is_file():
            raise SpartaError(f"{run_dir} already holds a finished run: nothing to resume (use --overwrite to retrain)")
        return None
    usable = usable_checkpoint(run_dir, world_size, lambda text: say(f"[yellow]warning[/]: {escape(text)}"))
    saved = read_json(usable / "recipe.json")
    now = recipe.to_dict()
    changed = sorted(f"{section}.{key}" for section in now if isinstance(now[section], dict)
                     for key in now[section] if saved.get(section, {}).get(key) != now[section][key])
    changed += [key for key in ("seed",) if saved.get(key) != now.get(key)]
    if changed:
        raise SpartaError(f"the recipe differs from the one that wrote {usable.name} ({', '.join(changed)}): resume with the same recipe")
    say(f"resuming from {usable}")
    return usable


def train(recipe: Recipe, *, overwrite: bool = False, resume: bool = False,
          on_evaluate: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train `recipe` into its output_dir and return that folder.

    With `data.validation_size`, every evaluation scores the held-out rows, the run ends with the
    best evaluation's adapter (`training.best_metric`), stops early after
    `training.early_stopping_patience` evaluations without improvement, and scores the task's
    evaluation split(s) once with that adapter (`test_` metrics, plus `best_step`).

    `on_evaluate(step, metrics)` is called on the main process after every evaluation during
    training, including the one at the last step (metrics keyed `eval_...`), never for the final
    `test_` scoring. If it raises, training stops at once and the exception propagates unchanged
    (trackers are released; the run folder is left unfinished, resumable from its checkpoints).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg = recipe.training
    run_dir = Path(recipe.output_dir)
    task = resolve_task(recipe.task)
    selecting = recipe.data.validation_size is not None
    metric = selection_metric(recipe, task) if selecting else None
    check_output_dir(run_dir, overwrite=overwrite, resume=resume)
    set_seed(recipe.seed)

    # model and adapter, before touching the output folder: a bad model name loses nothing
    loaded = load_for_classification(
        recipe.model, task.num_labels, list(task.label_names or []) or None,
        problem_type="regression" if task.is_regression else "single_label_classification",
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    check_max_length(model, recipe.data.max_length)
    model_dtype = next(model.parameters()).dtype
    for name in loaded.head_modules:  # the head trains in fp32 whatever the body's dtype
        model.get_submodule(name).float()
    adapter = apply_adapter(model, recipe.adapter, recipe.adapter_seed, loaded.head_modules)
    if cfg.gradient_checkpointing:
        adapter.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    accelerator = Accelerator(mixed_precision=mixed_precision(recipe, model_dtype), gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available(),  # lets torchrun/accelerate launch run gloo DDP on CPUs
                              **accelerator_kwargs(recipe, run_dir))
    main = accelerator.is_main_process
    say = console.print if main else (lambda *a, **k: None)
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED") and recipe.adapter.method == "sparta":
        raise SpartaError("FSDP / DeepSpeed ZeRO-3 sharding is not supported yet (see docs/scaling.md): use DDP with a model "
                          "that fits one GPU, or gradient_checkpointing and bf16 to fit it")
    if main:
        prepare_output_dir(run_dir, overwrite=overwrite, resume=resume)
    accelerator.wait_for_everyone()
    resume_from = _resume_point(run_dir, recipe, say, accelerator.num_processes) if resume else None
    if resume and resume_from is None and main:
        truncate_log(run_dir / TRAINER_LOG, 0)  # an unfinished run with no checkpoint starts over
    say(f"[bold]sparta train[/] {task.name} · {recipe.adapter.method} · {loaded.source}")
    say(adapter.summary_line())

    # data
    with accelerator.main_process_first():
        train_split = tokenize_split(task, "train", tokenizer, recipe, recipe.data.max_train_samples, recipe.seed)
        test_splits = {split: tokenize_split(task, split, tokenizer, recipe, recipe.data.max_eval_samples) for split in task.eval_splits}
    for split in [train_split, *test_splits.values()]:
        if split.truncated or split.dropped:
            say(f"{task.name}/{split.split}: {split.truncated} examples truncated, {split.dropped} dropped at max_length={recipe.data.max_length}")
    train_data = train_split.dataset
    eval_data = {s: t.dataset for s, t in test_splits.items()}
    if selecting:  # evaluations score held-out training rows; the evaluation splits are scored once, at the end
        kept, held_out = validation_indices(len(train_data), recipe.data.validation_size, recipe.seed)
        train_data, test_data, eval_data = train_data.select(kept), eval_data, {"heldout": train_data.select(held_out)}
        say(f"model selection: {len(held_out):,} training rows held out as the validation set, best by {metric}")
    train_loader = make_loader(train_data, tokenizer, cfg.batch_size, shuffle=True, seed=recipe.seed)

    def loaders(datasets: dict) -> dict:
        return {s: make_loader(d, tokenizer, cfg.eval_batch_size, shuffle=False, seed=recipe.seed) for s, d in datasets.items()}

    eval_loaders = loaders(eval_data)

    optimizer = build_optimizer(adapter, recipe)
    run_model, optimizer, train_loader = accelerator.prepare(adapter.model, optimizer, train_loader)
    eval_loaders = {s: accelerator.prepare(loader) for s, loader in eval_loaders.items()}
    test_loaders = {s: accelerator.prepare(loader) for s, loader in loaders(test_data).items()} if selecting else {}
    steps = total_steps(recipe, len(train_loader))
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    trainable = dict(adapter.trainable())
    masks = adapter.sparta.mask_digests() if adapter.sparta else {}  # resume checks the checkpoint trained these entries
    selection = ModelSelection(metric, cfg.early_stopping_patience, trainable) if selecting else None
    world = accelerator.num_processes
    effective_batch = cfg.batch_size * cfg.grad_accum * world

    state = TrainerState(world_size=world)
    if resume_from is not None:
        state = load_checkpoint(resume_from, trainable, optimizer, scheduler, accelerator, masks)
        if selection is not None:
            selection.load(state.selection, load_best(resume_from))
        if main:
            truncate_log(run_dir / TRAINER_LOG, state.step)
    elif main:
        write_run_config(run_dir, recipe, {"world_size": world, "effective_batch_size": effective_batch, "total_steps": steps,
                                           "trainable_params": adapter.num_trainable(), "base_params": adapter.base_params,
                                           "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)})
    if world > 1:
        say(f"[yellow]note[/]: {world} processes make the effective batch {effective_batch}; the same recipe on another "
            "number of processes trains with another batch, so its results will differ")
    start_trackers(accelerator, recipe, run_dir)
    say(f"{len(train_data):,} training examples · {steps} steps · effective batch {effective_batch} "
        f"= {cfg.batch_size} x {cfg.grad_accum} accumulation x {world} process{'es' if world > 1 else ''}")

    scorer = classifier_scorer(task.is_regression)

    def score(split_loaders: dict, prefix: str, step: int, extra: dict | None = None) -> dict[str, float]:
        results: dict[str, float] = {}
        for split, loader in split_loaders.items():
            results.update(evaluate_split(run_model, loader, accelerator, task, split, scorer))
        results = {f"{prefix}{k}": v for k, v in results.items()}
        log_record(accelerator, {"step": step, **results})
        if main:
            append_jsonl(run_dir / TRAINER_LOG, {"step": step, **(extra or {}), **results})
            say(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items() if "num_examples" not in k))
        return results

    last_evaluation: dict = {"step": None, "results": {}}

    def run_evaluation(step: int) -> dict[str, float]:
        """Score the evaluation set (held-out rows when selecting), track the best, tell the caller."""
        results = score(eval_loaders, "eval_", step)
        last_evaluation.update(step=step, results=results)
        if selection is not None:
            selection.update(step, results)
        if main and on_evaluate is not None:
            on_evaluate(step, results)
        return results

    def checkpoint() -> None:
        state.elapsed = elapsed()
        state.selection = selection.state() if selection is not None else None
        save_checkpoint(run_dir, state, trainable, optimizer, scheduler, accelerator, cfg.keep_checkpoints, recipe.to_dict(),
                        best=selection.best_tensors if selection is not None else None, masks=masks)

    session_start = time.perf_counter()
    start_elapsed = state.elapsed

    def elapsed() -> float:
        return start_elapsed + time.perf_counter() - session_start

    try:
        # the loop
        session_seen = 0
        stopped_early = False
        window_loss, window_batches = 0.0, 0
        run_model.train()
        with Progress(disable=not main) as progress, StopFlag() as stop:
            bar = progress.add_task("training", total=steps, completed=state.step, loss=float("nan"), lr=0.0, rate=0.0)
            while state.step < steps and not stopped_early:
                train_loader.set_epoch(state.epoch)  # Accelerate passes it on to the EpochShuffleSampler
                for batch_index, batch in enumerate(train_loader):
                    if batch_index < state.batches_in_epoch:
                        continue  # resumed mid-epoch: these batches were already trained on
                    with accelerator.accumulate(run_model):
                        loss = run_model(**batch).loss
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm:
                            accelerator.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    state.batches_in_epoch = batch_index + 1
                    examples = batch["input_ids"].shape[0] * world
                    state.seen += examples
                    session_seen += examples
                    value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                    if not math.isfinite(value):
                        kept = checkpoints(run_dir)
                        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was kept"
                        raise RunFailure(f"the loss became {value} at step {state.step + 1}: lower training.lr or check the data; {where}")
                    window_loss += value
                    window_batches += 1
                    if not accelerator.sync_gradients:
                        continue
                    state.step += 1
                    step_loss = window_loss / window_batches
                    state.loss_sum += step_loss
                    window_loss, window_batches = 0.0, 0
                    rate = session_seen / max(1e-9, time.perf_counter() - session_start)
                    record = {"step": state.step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                              "epoch": round(state.epoch + state.batches_in_epoch / len(train_loader), 4),
                              "elapsed": round(elapsed(), 3), "samples_per_s": round(rate, 2)}
                    progress.update(bar, completed=state.step, loss=step_loss, lr=record["lr"], rate=rate)
                    if state.step % cfg.log_every == 0 or state.step == steps:
                        log_record(accelerator, record)
                        if main:
                            append_jsonl(run_dir / TRAINER_LOG, record)
                    if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < steps:
                        run_evaluation(state.step)
                        if selection is not None and selection.should_stop:
                            say(f"early stopping at step {state.step}: no better {selection.key} in {selection.patience} evaluations")
                            stopped_early = True
                    if cfg.save_every and state.step % cfg.save_every == 0 and state.step < steps:
                        checkpoint()
                    if _agree(stop.signal is not None, accelerator):
                        checkpoint()
                        raise Interrupted(f"stopped by {stop.signal or 'a signal'} at step {state.step}; checkpoint saved: "
                                          f"continue with `sparta train RECIPE --resume` (output_dir={run_dir})")
                    if state.step >= steps or stopped_early:
                        break
                else:
                    state.epoch += 1
                    state.batches_in_epoch = 0

        eval_results = run_evaluation(state.step) if last_evaluation["step"] != state.step else last_evaluation["results"]
        if selection is not None:  # the best evaluation's adapter is the run's result; the evaluation splits score it once
            selection.restore_best()
            test_results = score(test_loaders, "test_", state.step, {"best_step": selection.best_step})
            eval_results = {"best_step": selection.best_step, **selection.best_metrics, **test_results}
        _check_in_sync(trainable, accelerator)
        if main:
            epochs_done = state.epoch + state.batches_in_epoch / len(train_loader)
            _write_final(run_dir, recipe, adapter, loaded, tokenizer, task, model_dtype, state, epochs_done, elapsed(),
                         len(train_data), eval_results)
            write_training_loss_png(run_dir)
            say(f"[green]done[/] in {elapsed():.1f}s → {run_dir}")
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()
        release_run_dir(run_dir)
    return run_dir


def _agree(flag: bool, accelerator) -> bool:
    """True on every rank when any rank saw the flag, so all ranks checkpoint together."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0)


def _check_in_sync(trainable: dict[str, torch.Tensor], accelerator) -> None:
    """Every rank must end with the same deltas; a mismatch means a broken setup, not a result."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([t.detach().double().sum() for t in trainable.values()]).sum().to(accelerator.device)
    gathered = accelerator.gather(checksum.reshape(1))
    if not torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=0):
        raise RunFailure("trainable parameters differ across processes: check that every rank runs the same recipe and sparta version")


def _write_final(run_dir, recipe, adapter, loaded, tokenizer, task, model_dtype, state, epochs_done, runtime, train_samples,
                 eval_results) -> None:
    metadata = {
        "base_model": {"name_or_path": recipe.model.name_or_path, "resolved_path": loaded.source,
                       "gguf_file": recipe.model.gguf_file, "revision": recipe.model.revision,
                       "model_type": adapter.base.config.model_type, "architecture": type(adapter.base).__name__,
                       "dtype": str(model_dtype).removeprefix("torch.")},
        "density": recipe.adapter.density if recipe.adapter.method == "sparta" else None,
        "targets": recipe.adapter.targets,
        "seed": recipe.adapter_seed,
        "task": {"name": task.name, "label_names": list(task.label_names) if task.label_names else None,
                 "num_labels": task.num_labels, "is_regression": task.is_regression},
        "pad_token_id": adapter.base.config.pad_token_id,
        "tokenizer": {"pad_token": tokenizer.pad_token},
    }
    adapter.save(run_dir, metadata)
    train_results = {"train_loss": state.loss_sum / max(1, state.step), "train_runtime": round(runtime, 3),
                     "train_samples": train_samples, "train_samples_per_second": round(state.seen / max(runtime, 1e-9), 3),
                     "train_steps": state.step, "epoch": round(epochs_done, 4)}
    write_json(run_dir / TRAIN_RESULTS, train_results)
    write_json(run_dir / EVAL_RESULTS, eval_results)
    write_json(run_dir / ALL_RESULTS, {**train_results, **eval_results})
