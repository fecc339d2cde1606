"""A worker: asks the study for trials and trains them, one after another, until the budget is spent.

`sparta tune` starts one worker process per `--workers` slot (`python -m sparta_cli.tune.worker
STUDY_DIR INDEX`, one GPU each): training prints its own progress, so it runs away from the study's
display, each trial's output going to `logs/trial-NNNN.log`. A trial is an ordinary `sparta train`
run in `trials/trial-NNNN/`; every validation evaluation is reported to the study, which may prune it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sparta_cli.errors import Diverged, Interrupted, RunFailure, SpartaError
from sparta_cli.fileio import make_dir, read_json
from sparta_cli.runs import ALL_RESULTS
from sparta_cli.tune.study import HEARTBEAT_SECONDS, Plan, ask_lock, open_study, owner_attrs, read_plan, retire, trials_left


def suggest(trial, plan: Plan) -> dict[str, Any]:
    """The trial's point of the space, as Optuna stores it (enqueued trials come with theirs)."""
    values = {}
    for key, param in plan.params.items():
        if param.choices is not None:
            values[key] = trial.suggest_categorical(key, param.distribution().choices)
        elif param.integer:
            values[key] = trial.suggest_int(key, int(param.low), int(param.high), log=param.log)
        else:
            values[key] = trial.suggest_float(key, float(param.low), float(param.high), log=param.log)
    return values


def next_trial(study, plan: Plan):
    """A new (or enqueued) trial, or None once the budget is spent."""
    with ask_lock(plan.study_dir):
        if trials_left(study, plan.trials) <= 0:
            return None
        trial = study.ask()
        for key, value in owner_attrs().items():
            trial.set_user_attr(key, value)
        return trial


class Heartbeat:
    """Tells the storage every HEARTBEAT_SECONDS that this trial's process is alive (see study.is_stale)."""

    def __init__(self, trial) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(trial,), daemon=True)

    def _beat(self, trial) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a finished trial refuses attributes: nothing left to do
                trial.set_user_attr("heartbeat", time.time())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def retried_folder(study, trial) -> Path | None:
    """For a retry, the run folder of the trial it replaces, when it is on this machine: the retry
    continues there from the newest checkpoint (a trial stopped by Ctrl-C or SIGTERM wrote one;
    one killed outright starts over unless training.save_every left one)."""
    number = trial.user_attrs.get("retry_of")
    origin = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None) if number is not None else None
    if origin is None or origin.user_attrs.get("host") != socket.gethostname() or "run_dir" not in origin.user_attrs:
        return None
    return Path(origin.user_attrs["run_dir"])


def reporter(trial, key: str):
    """train()'s on_evaluate: report the validation metric, stop the run when the pruner says so."""
    import optuna

    def on_evaluate(step: int, metrics: dict[str, float]) -> None:
        if key not in metrics:
            found = ", ".join(sorted(k for k in metrics if k.startswith("eval_")))
            raise SpartaError(f"the tuned metric {key} is not among the validation metrics ({found}): set training.best_metric to one of them")
        trial.report(float(metrics[key]), step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_step", step)
            raise optuna.TrialPruned(f"pruned at step {step}")

    return on_evaluate


def run_trial(study, trial, plan: Plan) -> str:
    """Train one trial and tell the study how it went; returns the trial's final state name."""
    import optuna

    from sparta_cli.train import train

    stored = suggest(trial, plan)
    origin = retried_folder(study, trial)
    recipe = plan.trial_recipe(trial.number, stored, origin)
    log_path = Path(plan.study_dir) / "logs" / f"trial-{trial.number:04d}.log"
    make_dir(log_path.parent)
    trial.set_user_attr("run_dir", str(Path(recipe.output_dir).resolve()))
    started = time.time()
    with Heartbeat(trial), open(log_path, "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            if not (origin and (origin / ALL_RESULTS).is_file()):  # a process that died between finishing and telling
                train(recipe, resume=origin is not None, on_evaluate=reporter(trial, f"eval_{plan.metric}"))
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", round(time.time() - started))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return "pruned"
        except Interrupted as exc:  # Ctrl-C / SIGTERM: the next `sparta tune` runs it again
            retire(study, trial, str(exc))
            raise
        except RunFailure as exc:
            exc = in_tune_terms(exc, trial.number, Path(recipe.output_dir))
            print(f"error: {exc}")
            trial.set_user_attr("failure", str(exc))
            trial.set_user_attr("seconds", round(time.time() - started))
            # a diverged loss condemns the configuration: pruned, TPE then ranks it below every finished
            # trial; any other failure (disk full, ...) says nothing about the point and is ignored by TPE
            diverged = isinstance(exc, Diverged)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED if diverged else optuna.trial.TrialState.FAIL)
            return "diverged" if diverged else "fail"
        except SpartaError as exc:  # the recipe cannot run at all: stop the study, say why
            told = in_tune_terms(exc, trial.number, Path(recipe.output_dir))
            trial.set_user_attr("failure", str(told))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise told from None
        except Exception as exc:  # noqa: BLE001 - one crashed trial (e.g. out of memory) must not end the study
            import traceback

            traceback.print_exc()
            trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return "fail"
        finally:
            gc.collect()
    results = read_json(Path(recipe.output_dir) / ALL_RESULTS)
    value = results.get(f"eval_{plan.metric}")
    if value is None:
        raise SpartaError(f"trial {trial.number} reported no eval_{plan.metric}: set training.best_metric to a validation metric it reports")
    for key, result in results.items():
        if key.startswith("test_") or key == "best_step":
            trial.set_user_attr(key, result)
    trial.set_user_attr("seconds", round(time.time() - started))
    if not math.isfinite(float(value)):  # Optuna would fail the trial without a word: say why
        trial.set_user_attr("failure", f"its validation {plan.metric} is {value} (a correlation of constant predictions is nan)")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return "fail"
    study.tell(trial, float(value))
    return "complete"


def in_tune_terms(exc: SpartaError, number: int, run_dir: Path) -> SpartaError:
    """A trial is trained by `sparta tune`, but train()'s errors give `sparta train`'s fixes (`pass --overwrite`):
    one naming an option tune does not take gets tune's fix instead."""
    from sparta_cli.cli import foreign_options

    text = str(exc)
    foreign = foreign_options(text, "tune")
    if not foreign:
        return exc
    cut = text.rfind(": ", 0, text.find(foreign[0]))
    problem = text[:cut] if cut > 0 else text
    return type(exc)(f"trial {number}: {problem}; sparta tune takes no {foreign[0]}: move {run_dir} aside and rerun it, "
                     "or give --output a new folder")


def run_worker(study_dir: str | Path, index: int, shared: bool) -> None:
    from sparta_cli.console import quiet_libraries

    quiet_libraries()
    print(f"pid {os.getpid()} worker {index}", flush=True)
    plan = read_plan(study_dir)
    study = open_study(plan, worker_index=index, shared=shared)
    while (trial := next_trial(study, plan)) is not None:
        state = run_trial(study, trial, plan)
        print(f"trial {trial.number}: {state}", flush=True)


def main(argv: list[str]) -> int:
    """Exit codes as the CLI's: 2 for a recipe the study cannot run, 1 for a failure, 130 when interrupted."""
    study_dir, index, shared = argv[0], int(argv[1]), "--shared" in argv
    try:
        run_worker(study_dir, index, shared)
    except SpartaError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    from sparta_cli.tune.study import require_optuna

    require_optuna()
    sys.exit(main(sys.argv[1:]))
