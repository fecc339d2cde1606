"""`sparta train`: the one training loop, readable top to bottom (as torchtune's recipes are).

`train` is the run: setup steps, each a function that returns what it builds (the model and its
adapter, the accelerator, the placement, the data, the optimizer and schedule, the restored or
new state), then `Trainer.run`, a flat loop over micro-batches in which every optimizer step
takes the one path in `optimizer_step` (clip, step, schedule, log, evaluate, checkpoint). What a run
acquires, the run folder's lock and the trackers, `train` takes and releases itself (`with`
blocks). One signal guard covers the loop from its first step to the last file written: the
finished training is checkpointed before the final evaluation and the results files.
Accelerate handles devices, DDP, mixed precision and gradient accumulation; the `Placement`
(placement.py) whatever differs under FSDP. Only the main process writes files or prints.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.markup import escape

from sparta_cli.checkpoint import TrainerState, checkpoints, usable_checkpoint
from sparta_cli.config import Recipe, recipe_changes, user_path
from sparta_cli.console import TrainingProgress, console
from sparta_cli.data import task_loader, tokenize_split, validation_indices
from sparta_cli.dtensors import local_tensor
from sparta_cli.errors import Diverged, Interrupted, SpartaError
from sparta_cli.evaluation import evaluate_split
from sparta_cli.fileio import append_jsonl, read_json, read_text, write_json, write_text
from sparta_cli.generation import generation_sets
from sparta_cli.metrics import lower_is_better, selectable_metrics
from sparta_cli.models import LoadedModel, fit_max_length, lm_heads
from sparta_cli.optim import build_optimizer, resolve_optimizer
from sparta_cli.outputs import check_not_an_input, check_output_dir, prepare_output_dir, recipe_inputs, release_run_dir
from sparta_cli.placement import Placement, load_trained_model, mixed_precision, place
from sparta_cli.plots import write_training_loss_png
from sparta_cli.runs import (
    ALL_RESULTS,
    CHAT_TEMPLATE_FILE,
    EVAL_RESULTS,
    RECIPE_FILE,
    TRAIN_RESULTS,
    TRAINER_LOG,
    kept_template_copy,
    truncate_log,
    write_run_config,
)
from sparta_cli.tasks import Task, resolve_task
from sparta_cli.trackers import accelerator_kwargs, log_record, start_trackers
from sparta_cli.tuners import apply_adapter

if TYPE_CHECKING:
    from sparta_cli.sft import Rendering
    from sparta_cli.tuners.base import Adapter


def total_steps(recipe: Recipe, batches_per_epoch: int) -> int:
    """Optimizer steps in the run. Accelerate steps at the end of every epoch's batches, a short group of
    fewer than grad_accum included, so an epoch is ceil(batches / grad_accum) steps, not a share of a total."""
    cfg = recipe.training
    if cfg.max_steps is not None:
        return cfg.max_steps
    whole = math.floor(cfg.epochs)
    rest = math.ceil((cfg.epochs - whole) * batches_per_epoch / cfg.grad_accum)
    return max(1, whole * math.ceil(batches_per_epoch / cfg.grad_accum) + rest)


class _StopNow(KeyboardInterrupt):
    """What a signal raises in the middle of library code: like KeyboardInterrupt, no `except
    Exception` catches it (transformers wraps any Exception while it builds tensors in a ValueError,
    which read as a damaged tokenizer); StopFlag turns it into Interrupted on the way out."""


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step and exits cleanly. After
    `raise_from_now(message)` (a message with `{signal}`) they raise Interrupted at once instead:
    for the final evaluation, which starts only once a checkpoint holds the finished training."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.raise_now: str | None = None
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
            raise _StopNow(self.raise_now.format(signal=self.signal))

    def raise_from_now(self, message: str | None) -> None:
        """From now on a signal raises Interrupted(message) at once (None: it only sets the flag
        again); one that came before raises now, so none falls between the two modes."""
        self.raise_now = message
        if message is not None and self.signal is not None:
            raise Interrupted(message.format(signal=self.signal))

    def __exit__(self, kind, exc, traceback) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if isinstance(exc, _StopNow):
            raise Interrupted(str(exc)) from None


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
    changed = recipe_changes(read_json(usable / RECIPE_FILE), recipe.to_dict())
    if changed:
        raise SpartaError(f"the recipe differs from the one that wrote {usable} ({'; '.join(changed)}): --resume stops; "
                          "resume with the same recipe, or retrain with --overwrite")
    given = recipe.task.chat_template  # the same path, read from another folder, may name another template
    kept = kept_template_copy(run_dir, given)
    if kept is not None and read_text(user_path(given, "task.chat_template")) != read_text(kept):
        raise SpartaError(f"task.chat_template {given} is not the template {usable} trained with (kept as {kept}): --resume "
                          "stops; resume from the folder the run started in, where that path names its template")
    say(f"resuming from {usable}")
    return usable


# ------------------------------------------------------------ the run


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
    from accelerate.utils import set_seed

    run_dir, cfg = Path(recipe.output_dir), recipe.training
    task = resolve_task(recipe.task)
    metric = selection_metric(recipe, task) if recipe.data.validation_size is not None else None
    check_output_dir(run_dir, overwrite=overwrite, resume=resume)
    check_not_an_input(run_dir, recipe_inputs(recipe), option="output_dir", fix="set output_dir to a new folder")
    set_seed(recipe.seed)
    model = setup_model(recipe, task)  # before touching the output folder: a bad model name loses nothing
    accelerator = setup_accelerator(recipe, model.dtype, run_dir)
    placement = place(model.adapter, accelerator, cfg.sharding)  # FSDP2 under training.sharding=fsdp (docs/scaling.md)
    say = console.print if accelerator.is_main_process else _quiet
    with held_run_dir(run_dir, accelerator, overwrite=overwrite, resume=resume):
        resume_from = _resume_point(run_dir, recipe, say, accelerator.num_processes) if resume else None
        if resume and resume_from is None and accelerator.is_main_process:
            truncate_log(run_dir / TRAINER_LOG, 0)  # an unfinished run with no checkpoint starts over
        say(f"[bold]sparta train[/] {task.name} · {recipe.adapter.method} · {model.loaded.source}")
        say(model.adapter.summary_line())
        data = setup_data(recipe, task, model.loaded.tokenizer, accelerator, metric, say)
        if recipe.task.chat_template:  # kept in the run (runs.kept_chat_template); a full run's tokenizer saves it too
            model.loaded.tokenizer.chat_template = read_text(user_path(recipe.task.chat_template, "task.chat_template"))
            if accelerator.is_main_process:
                write_text(run_dir / CHAT_TEMPLATE_FILE, model.loaded.tokenizer.chat_template)
        optim, data = setup_optimizer(recipe, placement, data)
        trainable = dict(model.adapter.trainable())
        masks = model.adapter.mask_digests()  # resume checks the checkpoint trained these entries
        selection = ModelSelection(metric, cfg.early_stopping_patience, trainable) if metric else None
        state = restore_or_start(recipe, resume_from, placement, optim, trainable, masks, selection)
        describe_run(recipe, accelerator, data, optim, say)
        with tracking(accelerator, recipe, run_dir):
            Trainer(recipe, task, model, placement, data, optim, trainable, masks, selection, state, on_evaluate, say).run()
    return run_dir


@contextmanager
def held_run_dir(run_dir: Path, accelerator, *, overwrite: bool, resume: bool) -> Iterator[None]:
    """The run folder, prepared and locked by the main process for as long as the block runs,
    released however it ends."""
    try:
        if accelerator.is_main_process:
            prepare_output_dir(run_dir, overwrite=overwrite, resume=resume)
        accelerator.wait_for_everyone()
        yield
    finally:
        release_run_dir(run_dir)


@contextmanager
def tracking(accelerator, recipe: Recipe, run_dir: Path) -> Iterator[None]:
    """The recipe's trackers (TensorBoard, W&B), open for the block and closed however it ends."""
    start_trackers(accelerator, recipe, run_dir)
    try:
        yield
    finally:
        accelerator.end_training()


def _quiet(*args, **kwargs) -> None:
    """`say` on processes other than the main one."""


# ------------------------------------------------------------ setup steps


@dataclass
class Model:
    loaded: LoadedModel
    adapter: Adapter
    dtype: torch.dtype  # the base weights' dtype (the head trains in fp32 whatever it is)


def setup_model(recipe: Recipe, task: Task) -> Model:
    """The model (a classifier, or the causal LM for SFT) and its adapter (under FSDP only rank 0
    reads the weights: `load_trained_model`), the recipe's adapter settings resolved against the model
    (`Tuner.resolve_settings`). A causal LM has no new head: every method trains what it trains in the
    body, and a method that trains no body (`head`) trains the LM head."""
    loaded = load_trained_model(recipe, task)
    model = loaded.model
    fit_max_length(recipe, model)
    dtype = next(model.parameters()).dtype
    heads = loaded.head_modules
    if trained_lm_head := lm_heads(model, task, recipe.adapter.method):
        heads = sorted({*heads, *trained_lm_head})
    for name in heads:  # the head trains in fp32 whatever the body's dtype
        model.get_submodule(name).float()
    recipe.resolve_adapter(model)  # before config.yaml, checkpoints and the adapter record the settings
    adapter = apply_adapter(model, recipe.adapter, recipe.adapter_seed, heads)
    if recipe.training.gradient_checkpointing:
        adapter.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Model(loaded, adapter, dtype)


def setup_accelerator(recipe: Recipe, model_dtype: torch.dtype, run_dir: Path):
    """Accelerate's devices, processes, mixed precision, gradient accumulation and trackers."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # every rank already holds the same buffers (SpaRTA's indices and original values): broadcasting
    # them on every forward would move O(k) bytes per step for nothing
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    precision = mixed_precision(recipe, model_dtype)
    if precision == "fp16" and not torch.cuda.is_available():  # Accelerate autocasts fp16 on GPUs only
        why = "training.mixed_precision: fp16" if recipe.training.mixed_precision == "fp16" else "a float16 model"
        raise SpartaError(f"{why} trains on a GPU only (on a CPU it trained in fp32 without a word, or failed on mixed "
                          "dtypes): use training.mixed_precision bf16 or no, and model.dtype float32 or bfloat16, on this machine")
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=recipe.training.grad_accum,
                       cpu=not torch.cuda.is_available(),  # lets torchrun/accelerate launch run gloo DDP on CPUs
                       kwargs_handlers=[ddp], **accelerator_kwargs(recipe, run_dir))


@dataclass
class Data:
    train_loader: Any
    eval_loaders: dict[str, Any]  # scored at every evaluation (the held-out rows when selecting)
    test_loaders: dict[str, Any]  # scored once with the best adapter (when selecting)
    train_rows: int
    rendering: Rendering | None = None  # SFT: how the training rows became text, which the adapter records


def setup_data(recipe: Recipe, task: Task, tokenizer, accelerator, metric: str | None, say) -> Data:
    """The training rows, the evaluation loaders (held-out rows when selecting) and the test loaders."""
    cfg = recipe.training
    with accelerator.main_process_first():
        train_split = tokenize_split(task, "train", tokenizer, recipe, recipe.data.max_train_samples, recipe.seed)
        splits = {split: tokenize_split(task, split, tokenizer, recipe, recipe.data.max_eval_samples) for split in task.eval_splits}
    for split in [train_split, *splits.values()]:
        note = split.note(task, recipe.data.max_length)
        if note:
            say(note)
    train_data = train_split.dataset
    eval_data, test_data = {s: t.dataset for s, t in splits.items()}, {}
    if metric is not None:  # evaluations score held-out training rows; the evaluation splits are scored once, at the end
        kept, held_out = validation_indices(len(train_data), recipe.data.validation_size, recipe.seed)
        train_data, test_data, eval_data = train_data.select(kept), eval_data, {"heldout": train_data.select(held_out)}
        say(f"model selection: {len(held_out):,} training rows held out as the validation set, best by {metric}")
    eval_loaders, test_loaders = (
        {s: task_loader(task, d, tokenizer, cfg.eval_batch_size, shuffle=False, seed=recipe.seed) for s, d in data.items()}
        for data in (eval_data, test_data))
    train_loader = task_loader(task, train_data, tokenizer, cfg.batch_size, shuffle=True, seed=recipe.seed,
                               packing=recipe.data.packing, max_length=recipe.data.max_length)
    if recipe.data.packing:
        say(f"data.packing: {len(train_data):,} training rows packed into {len(train_loader.dataset):,} sequences "
            f"of up to {recipe.data.max_length} tokens")
    return Data(train_loader, eval_loaders, test_loaders, len(train_data), train_split.rendering)


@dataclass
class Optimization:
    model: torch.nn.Module  # the model to run, as the placement prepared it
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: int  # optimizer steps of the whole run


def setup_optimizer(recipe: Recipe, placement: Placement, data: Data) -> tuple[Optimization, Data]:
    """The optimizer and schedule, with the model and loaders prepared by the placement."""
    from transformers import get_scheduler

    accelerator, cfg = placement.accelerator, recipe.training
    optimizer = build_optimizer(placement.adapter, resolve_optimizer(cfg.optimizer, accelerator.device), cfg.lr, cfg.head_lr,
                                cfg.weight_decay)
    model, optimizer, train_loader = placement.prepare(optimizer, data.train_loader)
    data = replace(data, train_loader=train_loader, eval_loaders={s: accelerator.prepare(loader) for s, loader in data.eval_loaders.items()},
                   test_loaders={s: accelerator.prepare(loader) for s, loader in data.test_loaders.items()})
    steps = total_steps(recipe, len(train_loader))
    # stepped once per optimizer step, by this loop (Accelerate is not given it, so it never steps it per process)
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    return Optimization(model, optimizer, scheduler, steps), data


def restore_or_start(recipe: Recipe, resume_from: Path | None, placement: Placement, optim: Optimization,
                     trainable: dict[str, torch.Tensor], masks: dict[str, str], selection: ModelSelection | None) -> TrainerState:
    """The loop position: a checkpoint's, with its tensors, optimizer, scheduler, RNG and best adapter
    loaded and the log cut back to it; or step 0 of a new run, whose config.yaml is written."""
    accelerator, adapter, run_dir = placement.accelerator, placement.adapter, Path(recipe.output_dir)
    if resume_from is None:
        if accelerator.is_main_process:
            write_run_config(run_dir, recipe, {
                "world_size": accelerator.num_processes, "effective_batch_size": effective_batch(recipe, accelerator),
                "total_steps": optim.steps, "trainable_params": adapter.num_trainable(), "base_params": adapter.base_params,
                "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)})
        return TrainerState(world_size=accelerator.num_processes)
    state = placement.load_checkpoint(resume_from, trainable, optim.optimizer, optim.scheduler, masks)
    if selection is not None:
        selection.load(state.selection, placement.load_best(resume_from, trainable))
    if accelerator.is_main_process:
        truncate_log(run_dir / TRAINER_LOG, state.step, drop=after_final_checkpoint(state.step, optim.steps, selection))
    return state


def after_final_checkpoint(step: int, steps: int, selection: ModelSelection | None) -> Callable[[dict], bool]:
    """Which log records a finished training's checkpoint does not cover: the final evaluation,
    test scores and summary of a run killed after that checkpoint; its resume writes them again."""
    finished = step >= steps or (selection is not None and selection.should_stop)

    def drop(record: dict) -> bool:
        evaluated_before = selection is not None and selection.evaluated_step == step and any(k.startswith("eval_") for k in record)
        return finished and record.get("step") == step and "loss" not in record and not evaluated_before

    return drop


def effective_batch(recipe: Recipe, accelerator) -> int:
    return recipe.training.batch_size * recipe.training.grad_accum * accelerator.num_processes


def describe_run(recipe: Recipe, accelerator, data: Data, optim: Optimization, say) -> None:
    cfg, world = recipe.training, accelerator.num_processes
    batch = effective_batch(recipe, accelerator)
    if world > 1:
        say(f"[yellow]note[/]: {world} processes make the effective batch {batch}; the same recipe on another "
            "number of processes trains with another batch, so its results will differ")
    say(f"{data.train_rows:,} training examples · {optim.steps} steps · effective batch {batch} "
        f"= {cfg.batch_size} x {cfg.grad_accum} accumulation x {world} process{'es' if world > 1 else ''}")
    if recipe.lr_from_rule:
        say(f"training.lr: auto = {cfg.lr:.3g} (docs/learning_rates.md's rule for {recipe.adapter.method})")


# ------------------------------------------------------------ the loop


class Trainer:
    """One run's loop over what the setup steps built: micro-batches go forward and backward, and
    every optimizer step takes the one path in `optimizer_step` (clip, step, schedule, log,
    evaluate, checkpoint); `finish` ends it."""

    def __init__(self, recipe: Recipe, task: Task, model: Model, placement: Placement, data: Data, optim: Optimization,
                 trainable: dict[str, torch.Tensor], masks: dict[str, str], selection: ModelSelection | None,
                 state: TrainerState, on_evaluate: Callable[[int, dict[str, float]], None] | None, say) -> None:
        self.recipe, self.cfg, self.task, self.run_dir = recipe, recipe.training, task, Path(recipe.output_dir)
        self.loaded, self.adapter, self.model_dtype = model.loaded, model.adapter, model.dtype
        self.placement, self.accelerator = placement, placement.accelerator
        self.main, self.say = self.accelerator.is_main_process, say
        self.train_loader, self.eval_loaders, self.test_loaders, self.train_rows, self.rendering = (
            data.train_loader, data.eval_loaders, data.test_loaders, data.train_rows, data.rendering)
        self.model, self.optimizer, self.scheduler, self.steps = optim.model, optim.optimizer, optim.scheduler, optim.steps
        self.trainable, self.masks, self.selection, self.state = trainable, masks, selection, state
        self.on_evaluate = on_evaluate
        self.scorer = task.kind.scorer(task, model.loaded.tokenizer)
        self.generation = generation_sets(task, recipe, model.loaded.tokenizer, task.eval_splits)  # task.generation_metrics
        self.window = LossWindow(self.accelerator.device)
        self.logged = LogWindow()
        self.stopped_early = selection is not None and selection.should_stop  # resumed after it stopped
        self.session_start, self.start_elapsed = time.perf_counter(), state.elapsed
        self.session_seen = self.session_tokens = 0

    def run(self) -> None:
        """The loop, then `finish`, under one signal guard from the first step to the last file written."""
        with StopFlag() as self.stop:
            self.model.train()
            with TrainingProgress(self.steps, self.state.step, enabled=self.main) as self.progress:
                for batch in self.micro_batches() if self.state.step < self.steps and not self.stopped_early else ():
                    rows, examples = self.real_rows(batch)
                    with self.accelerator.accumulate(self.model):
                        loss, weight = self.task.kind.train_loss(self.model, batch, rows)
                        if not self.task.kind.token_level:
                            # rows: a full micro-batch's loss stays its mean and its weight 1, so its gradients
                            # keep the size they had (what fp16's loss scale is tuned to)
                            loss, weight = loss / self.cfg.batch_size, weight / self.cfg.batch_size
                        self.accelerator.backward(loss)
                    self.window.add(loss, batch, weight, rows)
                    self.state.seen += examples
                    self.session_seen += examples
                    if self.accelerator.sync_gradients:
                        self.optimizer_step()
                        if self.state.step >= self.steps or self.stopped_early:
                            break
            self.finish()

    def real_rows(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(how many of this process's rows in `batch` are the epoch's own, how many are of all processes).

        With several processes Accelerate's loader gives every process the same number of full batches
        (even_batches, which keeps them in step): the rows of an epoch's last global batch that the data do
        not fill are the epoch's first rows again, after the real ones, process by process. Its `remainder`
        is how many real rows that last global batch holds (0: all). Repeated rows go forward and backward
        with no weight (`TaskKind.train_loss`) and are not counted as seen."""
        loader, accelerator = self.train_loader, self.accelerator
        size = batch["input_ids"].shape[0]
        remainder = getattr(loader, "remainder", -1)
        if not getattr(loader, "end_of_dataloader", False) or remainder is None or remainder <= 0:
            return size, size * accelerator.num_processes
        per_process = loader.total_batch_size // accelerator.num_processes
        return max(0, min(size, remainder - accelerator.process_index * per_process)), remainder

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
        scale = self.window.gradient_scale(self.accelerator)
        if scale is not None:  # summed losses: the step's gradient becomes their mean over its rows or tokens
            for param in self.trainable.values():
                if param.grad is not None:
                    local_tensor(param.grad).mul_(scale.to(param.grad.dtype))
        if cfg.max_grad_norm:
            self.placement.clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16's loss scale found inf gradients: no update, no advance
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
        if prefix == "eval_":  # generation metrics: greedy answers to the first validation prompts, at every evaluation
            for prompts in self.generation:
                results.update(prompts.score(self.accelerator.unwrap_model(self.model), self.loaded.tokenizer, self.cfg.eval_batch_size))
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
        best = selection.best_tensors if selection is not None else None
        return self.placement.save_checkpoint(self.run_dir, state, self.trainable, self.optimizer, self.scheduler,
                                              self.cfg.keep_checkpoints, self.recipe.to_dict(), best, self.masks)

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
        nothing (`--resume` only evaluates): a signal while it is written, or just before, stops the
        run once it is complete; after it a signal stops the run at once. Then the final evaluation,
        the best adapter's test scores when selecting, and the results files."""
        final = self.checkpoint()
        interrupted = (f"stopped by {{signal}} after training: {final} holds it; `sparta train RECIPE --resume` "
                       f"evaluates it and writes the results without training again (output_dir={self.run_dir})")
        if _agree(self.stop.signal is not None, self.accelerator):
            raise Interrupted(interrupted.format(signal=self.stop.signal or "a signal"))
        self.stop.raise_from_now(interrupted)
        self._evaluate_and_write()
        self.stop.raise_from_now(None)  # the run is complete: what is left only tidies up
        if self.main and not self.cfg.save_every:  # no checkpoints were asked for: this one guarded the end, any other an interruption
            for folder in {final, *checkpoints(self.run_dir)}:
                shutil.rmtree(folder, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _evaluate_and_write(self) -> None:
        state, selection = self.state, self.selection
        if selection is None:
            eval_results = self.evaluate()
        else:  # the best evaluation's adapter is the run's result; the evaluation splits score it once
            if selection.evaluated_step != state.step:
                self.evaluate()
            selection.restore_best()
            self.placement.write_weights()
            test_results = self.score(self.test_loaders, "test_", {"best_step": selection.best_step})
            eval_results = {"best_step": selection.best_step, **selection.best_metrics, **test_results}
        self.placement.check_in_sync(self.trainable)
        gathered = self.placement.adapter_tensors()  # under FSDP every rank takes part in gathering it
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
            "task": task.kind.recorded(task, recipe.task, self.rendering),
            "pad_token_id": adapter.base.config.pad_token_id,
            "tokenizer": {"pad_token": loaded.tokenizer.pad_token},
        }
        adapter.save(self.run_dir, metadata, loaded.tokenizer, gathered)


class LossWindow:
    """The training loss of the optimizer steps since the last read, kept on the device so the loop
    never waits for it; read (reduced across processes) every log_every steps.

    A step's loss is the mean of its micro-batches' losses, or where micro-batches give summed losses and
    what they sum over (every trained kind: rows, or SFT's supervised tokens) the summed loss over the
    step's rows or tokens, of every process (`gradient_scale`, which also makes the gradient that mean)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()
        self._micro_sum = torch.zeros((), device=device)
        self._micro_weight = torch.zeros((), device=device)
        self._weighted = False

    def reset(self) -> None:
        self.steps = 0
        self._step_sum = torch.zeros((), device=self.device)
        self._tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def add(self, loss: torch.Tensor, batch: dict[str, torch.Tensor], weight: torch.Tensor | None = None,
            rows: int | None = None) -> None:
        """One micro-batch's loss: a mean (`weight` None), or a sum over `weight` rows or tokens; the
        tokens of its first `rows` rows (None: all; the others repeat rows, `Trainer.real_rows`)."""
        loss = loss.detach().float()
        self._micro_sum += loss
        self._micro_weight += 1 if weight is None else weight.detach()
        self._weighted = weight is not None
        self._nonfinite |= ~torch.isfinite(loss)
        self._tokens += _real_tokens(batch, rows)

    def gradient_scale(self, accelerator) -> torch.Tensor | None:
        """For summed losses (None otherwise), the factor that turns the step's accumulated gradient into
        that of the mean loss over all its rows or tokens, of all its micro-batches and processes:
        Accelerate divided each micro-batch's by the accumulation steps (a short last group's too) and
        DDP / FSDP average over processes, so it is accumulation x processes / weight. The step's (loss,
        weight) are summed across processes here, so every process logs the same step loss."""
        if not self._weighted:
            return None
        totals = torch.stack([self._micro_sum.double(), self._micro_weight.double()])
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        self._micro_sum, self._micro_weight = totals[0].float(), totals[1].float()
        return accelerator.gradient_accumulation_steps * accelerator.num_processes / _nonzero(totals[1])

    def end_step(self) -> None:
        """The step's loss: its micro-batches' mean, or its summed loss over its rows or tokens."""
        self._step_sum += self._micro_sum / _nonzero(self._micro_weight)
        self._micro_sum = torch.zeros((), device=self.device)
        self._micro_weight = torch.zeros((), device=self.device)
        self.steps += 1

    def read(self, accelerator) -> tuple[float, int, bool]:
        """(sum of the steps' losses averaged over processes, non-pad tokens of all processes, any non-finite loss)."""
        packed = torch.stack([self._step_sum.double(), self._tokens.double(), self._nonfinite.double()])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        loss_sum, tokens, nonfinite = packed.tolist()
        return loss_sum / accelerator.num_processes, int(tokens), nonfinite > 0


def _nonzero(weight: torch.Tensor) -> torch.Tensor:
    """A step's weight to divide by: a row-level kind's is in batches (a short batch's a fraction), and
    one with nothing to weigh (SFT rows with no supervised token) sums to 0, as its loss and gradient do."""
    return torch.where(weight > 0, weight, torch.ones_like(weight))


def _real_tokens(batch: dict[str, torch.Tensor], rows: int | None = None) -> torch.Tensor:
    """The non-pad tokens of a batch's first `rows` rows (None: all): SFT's loaders count each row's
    (`num_tokens`; a packed batch has no attention mask)."""
    if "num_tokens" in batch:
        return batch["num_tokens"][:rows].sum()
    mask = batch.get("attention_mask")
    ids = batch["input_ids"][:rows]
    return mask[:rows].sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)


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

