"""`sparta train`: the one training loop, readable top to bottom (nanoGPT-style).

Accelerate handles devices, DDP, mixed precision and gradient accumulation; this file
handles the recipe: data, adapter, optimizer, schedule, evaluation and the run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from sparta_cli.adapters import apply_adapter
from sparta_cli.config import Recipe
from sparta_cli.console import Progress, console
from sparta_cli.data import make_loader, tokenize_split
from sparta_cli.errors import RunFailure
from sparta_cli.evaluation import classifier_scorer, evaluate_split
from sparta_cli.fileio import append_jsonl, write_json
from sparta_cli.models import load_for_classification
from sparta_cli.runs import ALL_RESULTS, EVAL_RESULTS, TRAIN_RESULTS, TRAINER_LOG, prepare_output_dir, write_run_config
from sparta_cli.tasks import resolve_task


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


def train(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg = recipe.training
    run_dir = Path(recipe.output_dir)
    task = resolve_task(recipe.task)
    set_seed(recipe.seed)

    # model and adapter (before touching the output folder: a bad model name loses nothing)
    loaded = load_for_classification(
        recipe.model, task.num_labels, list(task.label_names or []) or None,
        problem_type="regression" if task.is_regression else "single_label_classification",
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    model_dtype = next(model.parameters()).dtype
    for name in loaded.head_modules:  # the head trains in fp32 whatever the body's dtype
        model.get_submodule(name).float()
    adapter = apply_adapter(model, recipe.adapter, recipe.adapter_seed, loaded.head_modules)
    if cfg.gradient_checkpointing:
        adapter.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    accelerator = Accelerator(
        mixed_precision=mixed_precision(recipe, model_dtype),
        gradient_accumulation_steps=cfg.grad_accum,
    )
    main = accelerator.is_main_process
    if main:
        prepare_output_dir(run_dir, overwrite=overwrite, resume=resume)
    accelerator.wait_for_everyone()
    say = console.print if main else (lambda *a, **k: None)
    say(f"[bold]sparta train[/] {task.name} · {recipe.adapter.method} · {loaded.source}")
    say(adapter.summary_line())

    # data
    with accelerator.main_process_first():
        train_split = tokenize_split(task, "train", tokenizer, recipe, recipe.data.max_train_samples, recipe.seed)
        eval_splits = {split: tokenize_split(task, split, tokenizer, recipe, recipe.data.max_eval_samples) for split in task.eval_splits}
    train_data = train_split.dataset
    for split in [train_split, *eval_splits.values()]:
        if split.truncated or split.dropped:
            say(f"{task.name}/{split.split}: {split.truncated} examples truncated, {split.dropped} dropped at max_length={recipe.data.max_length}")
    train_loader = make_loader(train_data, tokenizer, cfg.batch_size, shuffle=True, seed=recipe.seed)
    eval_loaders = {s: make_loader(t.dataset, tokenizer, cfg.eval_batch_size, shuffle=False, seed=recipe.seed) for s, t in eval_splits.items()}

    optimizer = build_optimizer(adapter, recipe)
    run_model, optimizer, train_loader = accelerator.prepare(adapter.model, optimizer, train_loader)
    eval_loaders = {s: accelerator.prepare(loader) for s, loader in eval_loaders.items()}
    steps = total_steps(recipe, len(train_loader))
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    world = accelerator.num_processes
    effective_batch = cfg.batch_size * cfg.grad_accum * world
    if main:
        write_run_config(run_dir, recipe, {"world_size": world, "effective_batch_size": effective_batch, "total_steps": steps,
                                           "trainable_params": adapter.num_trainable(), "base_params": adapter.base_params,
                                           "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)})
    say(f"{len(train_data):,} training examples · {steps} steps · effective batch {effective_batch} ({world} process{'es' if world > 1 else ''})")

    scorer = classifier_scorer(task.is_regression)

    def run_evaluation(step: int) -> dict[str, float]:
        results: dict[str, float] = {}
        for split, loader in eval_loaders.items():
            results.update(evaluate_split(run_model, loader, accelerator, task, split, scorer))
        results = {f"eval_{k}": v for k, v in results.items()}
        if main:
            append_jsonl(run_dir / TRAINER_LOG, {"step": step, **results})
            shown = ", ".join(f"{k}={v:.4f}" for k, v in results.items() if "num_examples" not in k)
            say(f"step {step}: {shown}")
        return results

    # the loop
    step, epoch, seen, loss_sum, loss_count, log_loss = 0, 0, 0, 0.0, 0, 0.0
    start = time.perf_counter()
    eval_results: dict[str, float] = {}
    run_model.train()
    with Progress(disable=not main) as progress:
        bar = progress.add_task("training", total=steps, loss=float("nan"), lr=0.0, rate=0.0)
        while step < steps:
            for batch in train_loader:
                with accelerator.accumulate(run_model):
                    loss = run_model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_([p for _, p in adapter.trainable()], cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                seen += batch["input_ids"].shape[0] * world
                value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                if not math.isfinite(value):
                    raise RunFailure(f"the loss became {value} at step {step + 1}: lower training.lr or check the data; nothing after step {step} was kept")
                log_loss += value
                loss_count += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                loss_sum += log_loss / loss_count
                elapsed = time.perf_counter() - start
                record = {"step": step, "loss": log_loss / loss_count, "lr": scheduler.get_last_lr()[0],
                          "epoch": round(step * cfg.grad_accum / len(train_loader), 4),
                          "elapsed": round(elapsed, 3), "samples_per_s": round(seen / elapsed, 2)}
                log_loss, loss_count = 0.0, 0
                progress.update(bar, completed=step, loss=record["loss"], lr=record["lr"], rate=record["samples_per_s"])
                if main and (step % cfg.log_every == 0 or step == steps):
                    append_jsonl(run_dir / TRAINER_LOG, record)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < steps:
                    run_evaluation(step)
                if step >= steps:
                    break
            epoch += 1

    runtime = time.perf_counter() - start
    eval_results = run_evaluation(step)
    accelerator.wait_for_everyone()
    if main:
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
        train_results = {"train_loss": loss_sum / max(1, step), "train_runtime": round(runtime, 3), "train_samples": len(train_data),
                         "train_samples_per_second": round(seen / runtime, 3), "train_steps": step, "epoch": epoch}
        write_json(run_dir / TRAIN_RESULTS, train_results)
        write_json(run_dir / EVAL_RESULTS, eval_results)
        write_json(run_dir / ALL_RESULTS, {**train_results, **eval_results})
        say(f"[green]done[/] in {runtime:.1f}s → {run_dir}")
    accelerator.end_training()
    return run_dir
