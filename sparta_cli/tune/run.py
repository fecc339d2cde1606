"""`sparta tune`: plan the study, start its workers, show progress, write the study folder.

This process never trains: it starts `--workers` worker processes (one GPU each via
CUDA_VISIBLE_DEVICES when there are GPUs, else CPU processes sharing the cores), watches the
storage, and prints a line per finished trial (plus a live status line on a terminal). Killed, it
takes its workers with it (they get SIGTERM and checkpoint); the next `sparta tune` with the same
recipe resumes the study.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from sparta_cli.config import build_recipe
from sparta_cli.console import console
from sparta_cli.errors import Interrupted, RunFailure, SpartaError
from sparta_cli.fileio import make_dir
from sparta_cli.outputs import check_not_an_input, recipe_inputs
from sparta_cli.tune.folder import check_study_folder, check_trial_folders
from sparta_cli.tune.results import best_trial, counts, state_name, write_outputs
from sparta_cli.tune.space import decode
from sparta_cli.tune.study import (
    JOURNAL_FILE,
    Plan,
    open_study,
    require_optuna,
    retire_stale,
    retries,
    shown_url,
    trials_left,
    write_plan,
)

POLL_SECONDS = 1.0


def _devices() -> list[str]:
    """GPUs a worker may be given: CUDA_VISIBLE_DEVICES's list when set, else every GPU torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_env(index: int, workers: int, devices: list[str]) -> dict[str, str]:
    """One GPU per worker (round robin when there are fewer GPUs than workers); without GPUs the
    cores are split so N workers do not each start a thread per core."""
    env = dict(os.environ)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
    elif "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when `sparta tune` dies, even by kill -9, and checkpoints its trial."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_workers(plan: Plan, workers: int, shared: bool) -> list[tuple[subprocess.Popen, Path]]:
    devices = _devices()
    if devices and workers > len(devices):
        console.print(f"[yellow]note[/]: {workers} workers share {len(devices)} GPU(s)")
    logs = Path(plan.study_dir) / "logs"
    make_dir(logs)
    started = []
    for index in range(workers):
        log_path = logs / f"worker-{index}.log"
        command = [sys.executable, "-m", "sparta_cli.tune.worker", plan.study_dir, str(index), *(["--shared"] if shared else [])]
        with open(log_path, "a", encoding="utf-8") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=worker_env(index, workers, devices), preexec_fn=_die_with_parent)
        started.append((process, log_path))
    return started


def _last_error(log_path: Path) -> str | None:
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.is_file() else []
    return next((line.removeprefix("error: ") for line in reversed(lines) if line.startswith("error: ")), None)


def _params_text(plan: Plan, trial) -> str:
    params = plan.params
    return " ".join(f"{k}={decode(params[k], v) if k in params else v:.4g}" if isinstance(v, float) else f"{k}={decode(params[k], v)}"
                    for k, v in trial.params.items() if k in params)


class Display:
    """A line per finished trial; on a terminal also a live status line (done / running / pruned, best)."""

    def __init__(self, study, plan: Plan) -> None:
        self.study, self.plan = study, plan
        self.reported: set[int] = set()
        self.started = time.time()
        self.live = None

    def status(self) -> str:
        found = counts(self.study)
        best = best_trial(self.study)
        best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no trial finished yet"
        done = found["complete"] + found["pruned"] + found["fail"]
        return (f"{self.plan.study}: {done}/{self.plan.trials} done ({found['complete']} complete, {found['pruned']} pruned, "
                f"{found['fail']} failed) · {found['running']} running · {best_text} · {time.time() - self.started:.0f}s")

    def __enter__(self):
        if console.is_terminal:
            from rich.live import Live

            self.live = Live(self.status(), console=console, refresh_per_second=2, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        replaced = retries(trials)
        for trial in trials:
            if trial.state.is_finished() and trial.number not in self.reported:
                self.reported.add(trial.number)
                retry = replaced.get(trial.number)
                # why it failed: as its worker recorded, or as the retirement that replaced it did
                why = trial.user_attrs.get("failure") or (retry.user_attrs.get("retry_reason", "") if retry else "")
                value = f"validation {self.plan.metric} {trial.value:.4f}" if trial.value is not None else why
                console.print(f"trial {trial.number} {state_name(trial, retry)}: {value} · {_params_text(self.plan, trial)} · {self.status()}",
                              markup=False)
        if self.live is not None:
            self.live.update(self.status())


def supervise(study, plan: Plan, processes: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for the workers, printing as trials finish; a worker that stops on a recipe error stops them all."""
    with Display(study, plan) as display:
        display.reported.update(t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished())
        try:
            while any(p.poll() is None for p, _ in processes):
                time.sleep(POLL_SECONDS)
                display.update()
                failed = [(p, log) for p, log in processes if p.poll() not in (None, 0)]
                if failed:
                    break
        except KeyboardInterrupt:
            _stop(processes)
            display.update()
            raise Interrupted("interrupted: the running trials were checkpointed and will run again; "
                              "rerun the same command to resume the study") from None
        display.update()
    for process, log in processes:
        if process.poll() not in (None, 0):
            _stop(processes)
            message = _last_error(log) or f"a worker exited with code {process.returncode}: see {log}"
            raise (SpartaError if process.returncode == 2 else RunFailure)(message)


def _stop(processes: list[tuple[subprocess.Popen, Path]], grace: float = 120.0) -> None:
    """SIGTERM (each trial checkpoints and is retried by the next run), then wait."""
    for process, _ in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    for process, _ in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()


def _test_text(test: dict[str, Any]) -> str:
    shown = {k: v for k, v in test.items() if isinstance(v, float) and not k.endswith(("_runtime", "_per_second"))}
    return ", ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in shown.items()) or "none recorded"


def no_trial_completed(study, plan: Plan) -> str:
    """Why a study that spent its budget has no best trial: the first failed trial's error, where it is logged."""
    trials = study.get_trials(deepcopy=False)
    replaced = retries(trials)
    for trial in sorted(trials, key=lambda t: t.number):
        retry = replaced.get(trial.number)
        why = trial.user_attrs.get("failure") or (retry.user_attrs.get("retry_reason") if retry else None)
        if why:
            log = Path(plan.study_dir) / "logs" / f"trial-{trial.number:04d}.log"
            found = counts(study)
            return (f"no trial of study {plan.study} completed ({found['fail']} failed, {found['pruned']} pruned); the first "
                    f"failure, trial {trial.number} ({state_name(trial, retry)}): {why}; its log: {log}")
    return (f"no trial of study {plan.study} completed: see trials.md and the trials' logs in {Path(plan.study_dir) / 'logs'}")


def tune(recipe: str | Path, overrides: list[str] | tuple[str, ...] = (), *, flags: dict[str, Any] | None = None,
         space: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or resume) a study to its budget of trials; returns the summary written to summary.json."""
    from sparta_cli.tune.settings import plan_study

    require_optuna()
    plan, workers = plan_study(recipe, overrides, flags, space)
    shared = plan.storage != str(Path(plan.study_dir) / JOURNAL_FILE)
    check_not_an_input(Path(plan.study_dir), [Path(recipe), *recipe_inputs(build_recipe(plan.base))], option="the study folder",
                       replaces_whole=True, fix="pass --output with a new folder")
    check_study_folder(plan)
    study = open_study(plan, shared=shared, create=True)
    check_trial_folders(study, plan)
    write_plan(plan)  # after the refusals: a refused rerun leaves the study's plan as its workers read it
    for values in plan.enqueue:
        study.enqueue_trial(values, skip_if_exists=True)
    for old, new in retire_stale(study):
        console.print(f"trial {old} was left running by a process that died: marked failed, its parameters run again as trial {new}")
    left = trials_left(study, plan.trials)
    space_text = "; ".join(f"{k}: {p.describe()}" for k, p in plan.params.items())
    console.print(f"[bold]sparta tune[/] {escape(plan.study)}: {plan.trials} trials ({left} to run) · {plan.sampler} sampler · "
                  f"{plan.pruner} pruner · {plan.direction} validation {plan.metric} · {escape(space_text)}")  # [v, o] is no markup
    console.print(f"study folder {plan.study_dir} · storage {shown_url(plan.storage)}")
    try:
        if left > 0:
            supervise(study, plan, start_workers(plan, min(workers, left), shared))
    finally:  # interrupted or failed, the folder still shows the trials so far
        summary = write_outputs(study, plan)
    best = summary["best"]
    if best is None:
        running = counts(study)["running"]
        if running:  # a shared storage's trials of other machines may still complete
            console.print(f"[yellow]no trial completed yet[/]: {running} still running elsewhere; see trials.md when they finish")
            return summary
        raise RunFailure(no_trial_completed(study, plan))
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    console.print(f"[bold]best[/] trial {best['trial']}: validation {plan.metric} {best[f'validation_{plan.metric}']:.4f} "
                  f"at step {best['best_step']} · {params}")
    console.print(f"[bold]TEST[/], reported once for the best trial only (the official evaluation split, never used to choose): "
                  f"{_test_text(best['test'])}")
    console.print(f"{plan.study_dir}: trials.csv, trials.md, best.yaml (`sparta train` reruns the best trial), summary.json, plots")
    return summary
