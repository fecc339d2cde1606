"""`sparta train`: the one training loop, readable top to bottom (as torchtune's recipes are).

`Trainer.__init__` is the setup, one method per step; `Trainer.run` is a flat loop over
micro-batches, and every optimizer step takes the one path in `optimizer_step` (clip, step,
schedule, log, evaluate, checkpoint); `finish` checkpoints the finished training before the
final evaluation and the results files. Accelerate handles devices, DDP, mixed precision and
gradient accumulation. Only the main process writes files or prints.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.markup import escape

from sparta_cli.checkpoint import TrainerState, checkpoints, load_best, load_checkpoint, save_checkpoint, usable_checkpoint
from sparta_cli.config import Recipe
from sparta_cli.console import TrainingProgress, console
from sparta_cli.data import make_loader, tokenize_split, validation_indices
from sparta_cli.errors import Diverged, RunFailure, SpartaError
from sparta_cli.evaluation import classifier_scorer, evaluate_split
from sparta_cli.fileio import append_jsonl, read_json, write_json
from sparta_cli.metrics import lower_is_better, selectable_metrics
from sparta_cli.models import fit_max_length, load_for_classification, load_skeleton
from sparta_cli.optim import build_optimizer, resolve_optimizer
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
from sparta_cli.sharding import GatheredOptimizer, broadcast_json, check_launch, clip_grad_norm_, shard_adapter, start_process_group
from sparta_cli.tasks import Task, resolve_task
from sparta_cli.trackers import accelerator_kwargs, log_record, start_trackers
from sparta_cli.tuners import apply_adapter


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


def total_steps(recipe: Recipe, batches_per_epoch: int) -> int:
    cfg = recipe.training
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step and exits cleanly.
    With `raise_now` (a message with `{signal}`), they raise Interrupted at once instead: for the
    final evaluation, which starts only once a checkpoint holds the finished training."""

    def __init__(self, raise_now: str | None = None) -> None:
        self.signal: str | None = None
        self.raise_now = raise_now
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
        if self.raise_now is not None:
            raise Interrupted(self.raise_now.format(signal=self.signal))

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
        self.evaluated_step: int | None = None

    def update(self, step: int, results: dict[str, float]) -> None:
        self.evaluated_step = step
        if self._improves(results[self.key]):
            self.best_step, self.best_metrics, self.evals_since_best = step, dict(results), 0
            # a CPU copy; FSDP's DTensor shards are cloned where they live (their mesh's device)
            self.best_tensors = {name: t.detach().clone() if hasattr(t, "to_local") else t.detach().to("cpu", copy=True)
                                 for name, t in self.trainable.items()}
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
        return {"best_step": self.best_step, "best_metrics": self.best_metrics, "evals_since_best": self.evals_since_best,
                "evaluated_step": self.evaluated_step}

    def load(self, state: dict | None, tensors: dict[str, torch.Tensor] | None) -> None:
        if state and state.get("best_step") is not None:
            self.best_step, self.best_metrics = state["best_step"], state["best_metrics"]
            self.evals_since_best, self.best_tensors = state["evals_since_best"], tensors
            self.evaluated_step = state.get("evaluated_step")


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
    if (run_dir / ALL_RESULTS).is_file():
        raise SpartaError(f"{run_dir} already holds a finished run: nothing to resume (use --overwrite to retrain)")
    found = checkpoints(run_dir) if run_dir.is_dir() else []
    if not found:
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
    return Trainer(recipe, overwrite=overwrite, resume=resume, on_evaluate=on_evaluate).run()


class Trainer:
    """One run. `__init__` is the setup, one step per method in the order they run; `run` is the
    loop: micro-batches go forward and backward, and every optimizer step takes the one path in
    `optimizer_step` (clip, step, schedule, log, evaluate, checkpoint)."""

    def __init__(self, recipe: Recipe, *, overwrite: bool, resume: bool,
                 on_evaluate: Callable[[int, dict[str, float]], None] | None) -> None:
        from accelerate.utils import set_seed

        self.recipe, self.cfg, self.on_evaluate = recipe, recipe.training, on_evaluate
        self.run_dir = Path(recipe.output_dir)
        self.task = resolve_task(recipe.task)
        self.metric = selection_metric(recipe, self.task) if recipe.data.validation_size is not None else None
        check_output_dir(self.run_dir, overwrite=overwrite, resume=resume)
        set_seed(recipe.seed)
        self._load_model()  # before touching the output folder: a bad model name loses nothing
        self._start_accelerator(overwrite, resume)
        self._load_data()
        self._build_optimizer()
        self._restore_or_start(resume)

    # ------------------------------------------------------------ setup

    def _load_model(self) -> None:
        """The classifier and its adapter. Under FSDP with several processes only rank 0 reads the
        weights; the others build a skeleton that `shard_adapter` fills with their parts alone."""
        recipe, task = self.recipe, self.task
        head = dict(num_labels=task.num_labels, label_names=list(task.label_names or []) or None,
                    problem_type="regression" if task.is_regression else "single_label_classification")
        rank, world = start_process_group() if self.cfg.sharding == "fsdp" else (0, 1)
        if rank == 0:
            try:
                self.loaded = load_for_classification(recipe.model, head["num_labels"], head["label_names"], problem_type=head["problem_type"])
            except SpartaError as exc:
                if world > 1:  # the others wait for what rank 0 loaded: tell them why nothing comes
                    broadcast_json({"error": str(exc)})
                raise
        if world > 1:
            shape = broadcast_json({"dtype": str(next(self.loaded.model.parameters()).dtype).removeprefix("torch."),
                                    "head_modules": self.loaded.head_modules} if rank == 0 else None)
            if "error" in shape:
                raise SpartaError(shape["error"])
            if rank > 0:
                self.loaded = load_skeleton(recipe.model, head["num_labels"], head["label_names"], problem_type=head["problem_type"],
                                            dtype=getattr(torch, shape["dtype"]), head_modules=shape["head_modules"])
        model = self.loaded.model
        fit_max_length(recipe, model)
        self.model_dtype = next(model.parameters()).dtype
        for name in self.loaded.head_modules:  # the head trains in fp32 whatever the body's dtype
            model.get_submodule(name).float()
        self.adapter = apply_adapter(model, recipe.adapter, recipe.adapter_seed, self.loaded.head_modules)
        if self.cfg.gradient_checkpointing:
            self.adapter.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _start_accelerator(self, overwrite: bool, resume: bool) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        recipe = self.recipe
        # every rank already holds the same buffers (SpaRTA's indices and original values): broadcasting
        # them on every forward would move O(k) bytes per step for nothing
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        self.accelerator = accelerator = Accelerator(
            mixed_precision=mixed_precision(recipe, self.model_dtype), gradient_accumulation_steps=self.cfg.grad_accum,
            cpu=not torch.cuda.is_available(),  # lets torchrun/accelerate launch run gloo DDP on CPUs
            kwargs_handlers=[ddp], **accelerator_kwargs(recipe, self.run_dir))
        self.main = accelerator.is_main_process
        self.say = console.print if self.main else (lambda *a, **k: None)
        check_launch(self.adapter.tuner, self.cfg.sharding, accelerator.distributed_type.name, accelerator.mixed_precision)
        # training.sharding=fsdp: FSDP2 over the model, SpaRTA deltas sharded by the same rows (docs/scaling.md)
        self.sharded = shard_adapter(self.adapter, accelerator.mixed_precision) if self.cfg.sharding == "fsdp" else None
        if self.main:
            prepare_output_dir(self.run_dir, overwrite=overwrite, resume=resume)
        accelerator.wait_for_everyone()
        self.resume_from = _resume_point(self.run_dir, recipe, self.say, accelerator.num_processes) if resume else None
        if resume and self.resume_from is None and self.main:
            truncate_log(self.run_dir / TRAINER_LOG, 0)  # an unfinished run with no checkpoint starts over
        self.say(f"[bold]sparta train[/] {self.task.name} · {recipe.adapter.method} · {self.loaded.source}")
        self.say(self.adapter.summary_line())

    def _load_data(self) -> None:
        """The training rows, the evaluation loaders (held-out rows when selecting) and the test loaders."""
        recipe, task, tokenizer, cfg = self.recipe, self.task, self.loaded.tokenizer, self.cfg
        with self.accelerator.main_process_first():
            train_split = tokenize_split(task, "train", tokenizer, recipe, recipe.data.max_train_samples, recipe.seed)
            splits = {split: tokenize_split(task, split, tokenizer, recipe, recipe.data.max_eval_samples) for split in task.eval_splits}
        for split in [train_split, *splits.values()]:
            if split.truncated or split.dropped:
                self.say(f"{task.name}/{split.split}: {split.truncated} examples truncated, {split.dropped} dropped "
                         f"at max_length={recipe.data.max_length}")
        train_data = train_split.dataset
        eval_data, test_data = {s: t.dataset for s, t in splits.items()}, {}
        if self.metric is not None:  # evaluations score held-out training rows; the evaluation splits are scored once, at the end
            kept, held_out = validation_indices(len(train_data), recipe.data.validation_size, recipe.seed)
            train_data, test_data, eval_data = train_data.select(kept), eval_data, {"heldout": train_data.select(held_out)}
            self.say(f"model selection: {len(held_out):,} training rows held out as the validation set, best by {self.metric}")
        self.train_rows = len(train_data)
        self.train_loader = make_loader(train_data, tokenizer, cfg.batch_size, shuffle=True, seed=recipe.seed)
        self.eval_loaders, self.test_loaders = (
            {s: make_loader(d, tokenizer, cfg.eval_batch_size, shuffle=False, seed=recipe.seed) for s, d in data.items()}
            for data in (eval_data, test_data))

    def _build_optimizer(self) -> None:
        from transformers import get_scheduler

        accelerator, cfg = self.accelerator, self.cfg
        optimizer = build_optimizer(self.adapter, resolve_optimizer(cfg.optimizer, accelerator.device), cfg.lr, cfg.head_lr,
                                    cfg.weight_decay)
        if self.sharded is not None:  # FSDP2 already wraps the model; Accelerate must not add DDP
            self.model = self.adapter.model
            self.optimizer, self.train_loader = accelerator.prepare(optimizer, self.train_loader)
        else:
            self.model, self.optimizer, self.train_loader = accelerator.prepare(self.adapter.model, optimizer, self.train_loader)
        self.eval_loaders = {s: accelerator.prepare(loader) for s, loader in self.eval_loaders.items()}
        self.test_loaders = {s: accelerator.prepare(loader) for s, loader in self.test_loaders.items()}
        self.steps = total_steps(self.recipe, len(self.train_loader))
        # stepped once per optimizer step, by this loop (Accelerate is not given it, so it never steps it per process)
        self.scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup", self.optimizer,
                                       num_warmup_steps=cfg.warmup_steps, num_training_steps=self.steps)
        self.trainable = dict(self.adapter.trainable())
        sparta = self.adapter.sparta
        self.masks = sparta.mask_digests() if sparta else {}  # resume checks the checkpoint trained these entries
        self.selection = ModelSelection(self.metric, cfg.early_stopping_patience, self.trainable) if self.metric else None

    def _write_weights(self) -> None:
        """After trainable tensors were loaded in place (resume, best adapter): SpaRTA's weights follow
        its deltas, and a sharded model gathers the loaded shards at its next forward."""
        if self.sharded is not None:
            self.sharded.write_weights()
        elif self.adapter.sparta is not None:
            self.adapter.sparta.write_weights()

    def _restore_or_start(self, resume: bool) -> None:
        accelerator, cfg, recipe = self.accelerator, self.cfg, self.recipe
        world = accelerator.num_processes
        effective_batch = cfg.batch_size * cfg.grad_accum * world
        self.state = TrainerState(world_size=world)
        if self.resume_from is not None:
            if self.sharded is not None:  # checkpoints hold the whole adapter; each rank keeps its part
                full = self.sharded.whole_like(self.trainable)
                self.state = load_checkpoint(self.resume_from, full, GatheredOptimizer(self.sharded, self.optimizer), self.scheduler,
                                             accelerator, self.masks)
                self.sharded.load_full(self.trainable, full)
            else:
                self.state = load_checkpoint(self.resume_from, self.trainable, self.optimizer, self.scheduler, accelerator, self.masks)
            self._write_weights()
            if self.selection is not None:
                best = load_best(self.resume_from)
                if best is not None and self.sharded is not None:  # saved whole; each rank keeps its parts
                    best = self.sharded.local_parts(self.trainable, best)
                self.selection.load(self.state.selection, best)
            if self.main:
                truncate_log(self.run_dir / TRAINER_LOG, self.state.step, drop=self._after_final_checkpoint)
        elif self.main:
            write_run_config(self.run_dir, recipe, {
                "world_size": world, "effective_batch_size": effective_batch, "total_steps": self.steps,
                "trainable_params": self.adapter.num_trainable(), "base_params": self.adapter.base_params,
                "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)})
        if world > 1:
            self.say(f"[yellow]note[/]: {world} processes make the effective batch {effective_batch}; the same recipe on another "
                     "number of processes trains with another batch, so its results will differ")
        start_trackers(accelerator, recipe, self.run_dir)
        self.say(f"{self.train_rows:,} training examples · {self.steps} steps · effective batch {effective_batch} "
                 f"= {cfg.batch_size} x {cfg.grad_accum} accumulation x {world} process{'es' if world > 1 else ''}")
        if recipe.lr_from_rule:
            self.say(f"training.lr: auto = {cfg.lr:.3g} (docs/learning_rates.md's rule for {recipe.adapter.method})")
        self.scorer = classifier_scorer(self.task.is_regression)
        self.window = LossWindow(accelerator.device)
        self.logged = LogWindow()
        self.stopped_early = self.selection is not None and self.selection.should_stop  # resumed after it stopped
        self.session_start, self.start_elapsed = time.perf_counter(), self.state.elapsed
        self.session_seen = self.session_tokens = 0

    def _after_final_checkpoint(self, record: dict) -> bool:
        """A log record that a finished training's checkpoint does not cover: the final evaluation,
        test scores and summary of a run killed after that checkpoint; its resume writes them again."""
        step, selection = self.state.step, self.selection
        finished = step >= self.steps or (selection is not None and selection.should_stop)
        evaluated_before = selection is not None and selection.evaluated_step == step and any(k.startswith("eval_") for k in record)
        return finished and record.get("step") == step and "loss" not in record and not evaluated_before

    # ------------------------------------------------------------ the loop

    def run(self) -> Path:
        try:
            self.model.train()
            with TrainingProgress(self.steps, self.state.step, enabled=self.main) as progress, StopFlag() as stop:
                self.progress, self.stop = progress, stop
                for batch in self.micro_batches() if self.state.step < self.steps and not self.stopped_early else ():
                    with self.accelerator.accumulate(self.model):
                        loss = self.model(**batch).loss
                        self.accelerator.backward(loss)
                    self.window.add(loss, batch)
                    examples = batch["input_ids"].shape[0] * self.accelerator.num_processes
                    self.state.seen += examples
                    self.session_seen += examples
                    if self.accelerator.sync_gradients:
                        self.optimizer_step()
                        if self.state.step >= self.steps or self.stopped_early:
                            break
            self.finish()
        finally:
            self.accelerator.end_training()
            release_run_dir(self.run_dir)
        return self.run_dir

    def micro_batches(self):
        """The training batches from where the state says, epoch after epoch (the caller stops)."""
        while True:
            self.train_loader.set_epoch(self.state.epoch)  # Accelerate passes it on to the EpochShuffleSampler
            for index, batch in enumerate(self.train_loader):
                if index < self.state.batches_in_epoch:
                    continue  # resumed mid-epoch: these batches were already trained on
                self.state.batches_in_epoch = index + 1
                yield batch
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    def optimizer_step(self) -> None:
        """The one path every optimizer step takes."""
        cfg, state = self.cfg, self.state
        if cfg.max_grad_norm and self.sharded is not None:
            clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm, self.sharded.group)
        elif cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        self.window.end_step()
        last = state.step == self.steps
        loss = self.log() if state.step % cfg.log_every == 0 or last else None
        self.progress.update(state.step, lr=self.lr, rate=self.samples_per_s, loss=loss)
        if cfg.eval_every and state.step % cfg.eval_every == 0 and not last:
            self.evaluate()
            if self.selection is not None and self.selection.should_stop:
                self.say(f"early stopping at step {state.step}: no better {self.selection.key} in {self.selection.patience} evaluations")
                self.stopped_early = True
                if loss is None:  # the last steps' losses still get their log record
                    self.log()
        if cfg.save_every and state.step % cfg.save_every == 0 and not last:
            self.checkpoint()
        if _agree(self.stop.signal is not None, self.accelerator):
            self.checkpoint()
            raise Interrupted(f"stopped by {self.stop.signal or 'a signal'} at step {state.step}; checkpoint saved: "
                              f"continue with `sparta train RECIPE --resume` (output_dir={self.run_dir})")

    def log(self) -> float:
        """A trainer_log record of the steps since the last one; returns their mean loss."""
        state = self.state
        self.sync_losses()
        loss = self.logged.mean()
        record = {"step": state.step, "loss": loss, "lr": self.lr,
                  "epoch": round(state.epoch + state.batches_in_epoch / len(self.train_loader), 4),
                  "elapsed": round(self.elapsed(), 3), **self.throughput()}
        log_record(self.accelerator, record)
        if self.main:
            append_jsonl(self.run_dir / TRAINER_LOG, record)
        return loss

    def throughput(self) -> dict[str, float]:
        """This session's samples and non-pad tokens per second, and the peak GPU memory so far."""
        seconds = max(1e-9, time.perf_counter() - self.session_start)
        numbers = {"samples_per_s": round(self.session_seen / seconds, 2), "tokens_per_s": round(self.session_tokens / seconds, 1)}
        peak = peak_gpu_memory_gib(self.accelerator.device)
        return {**numbers, "peak_gpu_memory_gib": peak} if peak is not None else numbers

    def sync_losses(self) -> None:
        """Read the device-side loss window: the loop's one host sync, at log steps and before an
        evaluation or checkpoint; a non-finite loss fails the run before anything is saved from it."""
        if not self.window.steps:
            return
        first = self.state.step - self.window.steps + 1
        loss_sum, tokens, nonfinite = self.window.read(self.accelerator)
        if nonfinite:
            kept = checkpoints(self.run_dir)
            where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was kept"
            steps = f"step {first}" if first == self.state.step else f"steps {first}-{self.state.step}"
            shown = loss_sum if not math.isfinite(loss_sum) else float("nan")
            raise Diverged(f"the loss became {shown} at {steps}: lower training.lr or check the data; {where}")
        self.state.loss_sum += loss_sum
        self.state.tokens += tokens
        self.session_tokens += tokens
        self.logged.add(loss_sum, self.window.steps)
        self.window.reset()

    def evaluate(self) -> dict[str, float]:
        """Score the evaluation set (held-out rows when selecting), track the best, tell the caller."""
        self.sync_losses()
        step = self.state.step
        results = self.score(self.eval_loaders, "eval_")
        if self.selection is not None:
            self.selection.update(step, results)
        if self.main and self.on_evaluate is not None:
            self.on_evaluate(step, results)
        return results

    def score(self, loaders: dict, prefix: str, extra: dict | None = None) -> dict[str, float]:
        results: dict[str, float] = {}
        for split, loader in loaders.items():
            results.update(evaluate_split(self.model, loader, self.accelerator, self.task, split, self.scorer))
        results = {f"{prefix}{k}": v for k, v in results.items()}
        step = self.state.step
        log_record(self.accelerator, {"step": step, **results})
        if self.main:
            append_jsonl(self.run_dir / TRAINER_LOG, {"step": step, **(extra or {}), **results})
            self.say(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items() if "num_examples" not in k))
        return results

    def checkpoint(self) -> Path:
        self.sync_losses()
        state, selection = self.state, self.selection
        state.elapsed = self.elapsed()
        state.selection = selection.state() if selection is not None else None
        # sharded: the whole adapter and optimizer, as one process would save them (every rank gathers, rank 0 keeps)
        best = selection.best_tensors if selection is not None else None
        tensors, optimizer = self.trainable, self.optimizer
        if self.sharded is not None:
            tensors, optimizer = self.sharded.gather_all(self.trainable), GatheredOptimizer.for_saving(self.sharded, self.optimizer)
            best = self.sharded.gather_all(self.trainable, best) if best is not None else None
        return save_checkpoint(self.run_dir, state, tensors, optimizer, self.scheduler, self.accelerator,
                               self.cfg.keep_checkpoints, self.recipe.to_dict(), best=best, masks=self.masks)

    def elapsed(self) -> float:
        return self.start_elapsed + time.perf_counter() - self.session_start

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def samples_per_s(self) -> float:
        return self.session_seen / max(1e-9, time.perf_counter() - self.session_start)

    # ------------------------------------------------------------ the end

    def finish(self) -> None:
        """A checkpoint of the finished training first, so that an interruption from here on loses
        nothing (`--resume` only evaluates); then the final evaluation, the best adapter's test scores
        when selecting, and the results files."""
        final = self.checkpoint()
        interrupted = (f"stopped by {{signal}} after training: {final} holds it; `sparta train RECIPE --resume` "
                       f"evaluates it and writes the results without training again (output_dir={self.run_dir})")
        with StopFlag(raise_now=interrupted):
            self._evaluate_and_write()
        if self.main and not self.cfg.save_every:  # no checkpoints were asked for: this one only guarded the end
            shutil.rmtree(final, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _evaluate_and_write(self) -> None:
        state, selection = self.state, self.selection
        if selection is None:
            eval_results = self.evaluate()
        else:  # the best evaluation's adapter is the run's result; the evaluation splits score it once
            if selection.evaluated_step != state.step:
                self.evaluate()
            selection.restore_best()
            self._write_weights()
            test_results = self.score(self.test_loaders, "test_", {"best_step": selection.best_step})
            eval_results = {"best_step": selection.best_step, **selection.best_metrics, **test_results}
        if self.sharded is None:  # under FSDP each rank holds other parts, and gathered tensors agree by construction
            _check_in_sync(self.trainable, self.accelerator)
        # sharded: what the method writes, gathered whole (every rank takes part)
        gathered = self.adapter.tuner.gathered_for_save(self.adapter, self.sharded) if self.sharded is not None else None
        if self.main:
            runtime = self.elapsed()
            train_results = {"train_loss": state.loss_sum / max(1, state.step), "train_runtime": round(runtime, 3),
                             "train_samples": self.train_rows,
                             "train_samples_per_second": round(state.seen / max(runtime, 1e-9), 3),
                             "train_tokens_per_second": round(state.tokens / max(runtime, 1e-9), 1),
                             "train_steps": state.step,
                             "epoch": round(state.epoch + state.batches_in_epoch / len(self.train_loader), 4),
                             "peak_gpu_memory_gib": peak_gpu_memory_gib(self.accelerator.device),
                             "device": device_name(self.accelerator.device)}
            self._save_adapter(gathered)
            append_jsonl(self.run_dir / TRAINER_LOG, {"step": state.step, **train_results})
            write_json(self.run_dir / TRAIN_RESULTS, train_results)
            write_json(self.run_dir / EVAL_RESULTS, eval_results)
            write_json(self.run_dir / ALL_RESULTS, {**train_results, **eval_results})
            write_training_loss_png(self.run_dir)
            peak = train_results["peak_gpu_memory_gib"]
            memory = f" · peak GPU memory {peak:.2f} GiB" if peak is not None else ""
            self.say(f"[green]done[/] in {runtime:.1f}s · {train_results['train_samples_per_second']:.1f} samples/s · "
                     f"{train_results['train_tokens_per_second']:,.0f} tokens/s{memory} on {train_results['device']} → {self.run_dir}")

    def _save_adapter(self, gathered: dict[str, torch.Tensor] | None) -> None:
        recipe, task, adapter, loaded = self.recipe, self.task, self.adapter, self.loaded
        metadata = {
            "base_model": {"name_or_path": recipe.model.name_or_path, "resolved_path": loaded.source,
                           "gguf_file": recipe.model.gguf_file, "revision": recipe.model.revision,
                           "model_type": adapter.base.config.model_type, "architecture": type(adapter.base).__name__,
                           "dtype": str(self.model_dtype).removeprefix("torch.")},
            **recipe.adapter.recorded(),  # density, targets
            "seed": recipe.adapter_seed,
            "task": {"name": task.name, "label_names": list(task.label_names) if task.label_names else None,
                     "num_labels": task.num_labels, "is_regression": task.is_regression},
            "pad_token_id": adapter.base.config.pad_token_id,
            "tokenizer": {"pad_token": loaded.tokenizer.pad_token},
        }
        adapter.save(self.run_dir, metadata, loaded.tokenizer, gathered)


class LossWindow:
    """The training loss of the optimizer steps since the last read, kept on the device so the loop
    never waits for it; read (reduced across processes) every log_every steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()
        self._micro_sum = torch.zeros((), device=device)
        self._micro_batches = 0

    def reset(self) -> None:
        self.steps = 0
        self._step_sum = torch.zeros((), device=self.device)
        self._tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def add(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        loss = loss.detach().float()
        self._micro_sum += loss
        self._micro_batches += 1
        self._nonfinite |= ~torch.isfinite(loss)
        mask = batch.get("attention_mask")
        self._tokens += mask.sum() if mask is not None else batch["input_ids"].numel()

    def end_step(self) -> None:
        """A step's loss is the mean over its micro-batches."""
        self._step_sum += self._micro_sum / max(1, self._micro_batches)
        self._micro_sum.zero_()
        self._micro_batches = 0
        self.steps += 1

    def read(self, accelerator) -> tuple[float, int, bool]:
        """(sum of the steps' losses averaged over processes, non-pad tokens of all processes, any non-finite loss)."""
        packed = torch.stack([self._step_sum.double(), self._tokens.double(), self._nonfinite.double()])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        loss_sum, tokens, nonfinite = packed.tolist()
        return loss_sum / accelerator.num_processes, int(tokens), nonfinite > 0


class LogWindow:
    """The mean loss over the steps since the last log line (the host side of LossWindow)."""

    def __init__(self) -> None:
        self.loss_sum, self.steps = 0.0, 0

    def add(self, loss_sum: float, steps: int) -> None:
        self.loss_sum += loss_sum
        self.steps += steps

    def mean(self) -> float:
        mean = self.loss_sum / max(1, self.steps)
        self.loss_sum, self.steps = 0.0, 0
        return mean


def peak_gpu_memory_gib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated in GiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


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
