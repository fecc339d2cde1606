"""The study: what it searches (the plan), where it lives (the storage), how many trials it has left,
and what happens to trials whose process died.

Every `sparta tune` process (and every worker it starts) opens the same storage by URL, so a study
resumes after a kill and several machines share one. A trial counts against the budget once it is
asked for; a trial whose process died (a kill -9, a lost machine, Ctrl-C) is marked FAIL and its
parameters are enqueued again as a retry (`retry_of` names the trial it replaces, `retry_reason` why),
so the retry takes its place in the budget (and continues in its run folder) and finished trials are
never rerun. Only Optuna's public API is used: a trial of another process can be told FAIL, not given
attributes, so what a retirement records lives on the retry.
"""

from __future__ import annotations

import json
import os
import socket
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparta_cli.config import Recipe, build_recipe, changed_keys
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import exclusive, make_dir, read_json, write_json
from sparta_cli.tune.space import Param, as_override, decode, parse_space

PLAN_FILE = "study.json"
JOURNAL_FILE = "study.journal"
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 600  # a RUNNING trial of another machine silent this long is taken as dead
INSTALL_HINT = "pip install 'sparta[tune]' (or: python -m pip install optuna)"


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise SpartaError(f"sparta tune needs Optuna, which is not installed: {INSTALL_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class Plan:
    """Everything a worker needs to run trials of a study, written to the study folder as study.json."""

    study: str
    study_dir: str
    storage: str  # an SQLAlchemy URL (RDB) or the path of a journal file
    base: dict[str, Any]  # the recipe without `tune:`, overrides applied
    space: dict[str, Any]  # key -> spec, as given
    metric: str  # the validation metric, without the eval_ prefix
    direction: str  # maximize or minimize
    trials: int
    sampler: str
    pruner: str
    sampler_startup_trials: int
    pruner_startup_trials: int
    seed: int
    enqueue: list[dict[str, Any]] = field(default_factory=list)

    @property
    def params(self) -> dict[str, Param]:
        return parse_space(self.space)

    def trial_dir(self, number: int) -> Path:
        return Path(self.study_dir) / "trials" / f"trial-{number:04d}"

    def recipe(self, values: dict[str, Any], output_dir: str | Path) -> Recipe:
        """The recipe of one point of the space: the base with `values` (recipe values) set."""
        return build_recipe(self.base, [*(as_override(k, v) for k, v in values.items()), as_override("output_dir", str(output_dir))])

    def trial_recipe(self, number: int, stored: dict[str, Any], output_dir: str | Path | None = None) -> Recipe:
        """A trial's recipe from its stored parameters, in its own folder unless told another."""
        params = self.params
        return self.recipe({k: decode(params[k], v) for k, v in stored.items()}, output_dir or self.trial_dir(number))

    def identity(self) -> dict[str, Any]:
        """What must match for a stored study to be this one: same recipe, space and objective."""
        base = {k: v for k, v in self.base.items() if k != "output_dir"}
        return {"recipe": base, "space": self.space, "metric": self.metric, "direction": self.direction}


def write_plan(plan: Plan) -> None:
    make_dir(plan.study_dir)
    write_json(Path(plan.study_dir) / PLAN_FILE, plan.__dict__)


def read_plan(study_dir: str | Path) -> Plan:
    return Plan(**read_json(Path(study_dir) / PLAN_FILE))


# The pip package of each database driver SQLAlchemy may ask for, by the module it imports.
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000", "asyncpg": "asyncpg",
                   "MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "oracledb": "oracledb",
                   "pyodbc": "pyodbc", "pymssql": "pymssql"}


def open_storage(url: str):
    """An RDB for URLs (`sqlite:///…`, `postgresql://…`, `mysql://…`), else Optuna's journal file,
    which it recommends for several processes on one machine and which works on NFS (symlink lock).
    A storage that cannot be opened (damaged journal, unknown scheme, missing driver, no server) is
    one line saying which, and what to do."""
    optuna = require_optuna()
    if "://" in url:
        return _open_rdb(optuna, url)
    from optuna.storages.journal import JournalFileBackend

    path = Path(url)
    make_dir(path.parent)
    check_journal(path)
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    except OSError as exc:
        raise SpartaError(f"cannot open the study journal {path}: {exc.strerror or exc}; give --storage a journal file you can "
                          "read and write") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, AssertionError) as exc:  # records Optuna cannot replay
        raise _damaged_journal(path, f"Optuna cannot replay it: {type(exc).__name__} {str(exc)[:60]}") from None


def _damaged_journal(path: Path, why: str) -> SpartaError:
    return SpartaError(f"the study journal {path} is damaged ({why}): start a fresh study with another --study (and --output), "
                       f"or move {path} and the study folder's trials/ aside to run this study again; the finished trials' "
                       "run folders are never touched")


def check_journal(path: Path) -> None:
    """Refuse a journal Optuna would misread: it skips a last line that is cut off or not JSON, then
    appends after it, which turns the damage into a line it cannot read at all."""
    if not path.exists():
        return
    if not path.is_file():
        raise SpartaError(f"the study journal {path} is not a file: give --storage a journal file path, or move {path} aside")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpartaError(f"cannot read the study journal {path}: {exc.strerror or exc}; give --storage a journal file you can "
                          "read and write") from None
    if data and not data.endswith(b"\n"):
        raise _damaged_journal(path, "its last line is cut off")
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise _damaged_journal(path, f"line {number} is not JSON") from None
        if not isinstance(record, dict) or "op_code" not in record:
            raise _damaged_journal(path, f"line {number} is not an Optuna journal record")


def shown_url(url: str) -> str:
    """A storage as it may be printed: a URL without its password, a journal file's path as it is."""
    from sqlalchemy.engine import make_url

    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse: show its scheme only
        return url.split("://")[0] + "://…"


def _open_rdb(optuna, url: str):
    import sqlalchemy.exc

    shown = shown_url(url)
    try:
        if url.startswith("sqlite"):  # several writers wait for each other instead of failing at once
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
        return optuna.storages.RDBStorage(url)
    except sqlalchemy.exc.NoSuchModuleError:
        raise SpartaError(f"--storage {shown}: `{url.split('://')[0]}` is not a database SQLAlchemy knows: write e.g. "
                          "sqlite:///study.db, postgresql://user@host/db, mysql+pymysql://user@host/db, or give a journal "
                          "file path") from None
    except ImportError as exc:
        module = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None) or "its driver"
        package = DRIVER_PACKAGES.get(str(module).split(".")[0], module)
        raise SpartaError(f"--storage {shown} needs the database driver `{module}`, which is not installed: "
                          f"pip install {package}") from None
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:  # e.g. a port that is not a number
        raise SpartaError(f"--storage {shown} is not a database URL SQLAlchemy can read ({str(exc).splitlines()[0][:80]}): "
                          "write e.g. postgresql://user:password@host:5432/db") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:120]
        raise SpartaError(f"cannot open the study storage {shown} ({reason}): check that its server runs and that the URL's "
                          "host, port, user, password and database (for sqlite, the file's folder) are right") from None


def make_sampler(plan: Plan, worker_index: int, shared: bool, trials_so_far: int):
    """TPE (or random, or grid) seeded by the recipe's seed and the study's length: one worker draws the
    same trials every time, a resumed study does not redraw its first trials, parallel workers get
    distinct seeds, and TPE's constant liar keeps them off each other's running points."""
    optuna = require_optuna()
    seed = plan.seed + 1000 * worker_index + trials_so_far
    if shared:  # other machines run workers with the same indices
        seed += zlib.crc32(socket.gethostname().encode()) % 1_000_000
    if plan.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if plan.sampler == "grid":

        class GridSampler(optuna.samplers.GridSampler):
            """Optuna's grid, minus its end-of-grid `study.stop()`: that works only inside `study.optimize`,
            and sparta's workers ask and tell (telling the grid's last point raised, after storing it).
            The study's budget ends the workers instead."""

            def after_trial(self, study, trial, state, values) -> None:
                return None

        return GridSampler({k: list(p.distribution().choices) for k, p in plan.params.items()}, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.sampler_startup_trials, constant_liar=True)


def make_pruner(plan: Plan):
    """Decisions are made at each validation evaluation, indexed by optimizer step."""
    optuna = require_optuna()
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=plan.pruner_startup_trials, n_warmup_steps=0)
    if plan.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if plan.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(plan: Plan, *, worker_index: int = 0, shared: bool = False, create: bool = False):
    """The study in its storage; created (with its identity) by `sparta tune`, loaded by workers.
    A stored study of another recipe, space or objective is refused rather than mixed with this one."""
    optuna = require_optuna()
    storage = open_storage(plan.storage)
    pruner = make_pruner(plan)
    try:
        study = optuna.load_study(study_name=plan.study, storage=storage, pruner=pruner)
    except KeyError:
        if not create:
            raise SpartaError(f"study {plan.study} is not in storage {plan.storage}: start it with `sparta tune`") from None
        study = optuna.create_study(study_name=plan.study, storage=storage, pruner=pruner, direction=plan.direction,
                                    load_if_exists=True)
        if "sparta" not in study.user_attrs:
            study.set_user_attr("sparta", plan.identity())
    stored = study.user_attrs.get("sparta")
    differ = [] if stored is None else identity_differences(plan.identity(), stored)
    if differ:
        raise SpartaError(f"study {plan.study} in {plan.storage} was started with another recipe, space or objective "
                          f"({', '.join(differ[:3])} differ): give another --study, or rerun with the same recipe and overrides")
    study.sampler = make_sampler(plan, worker_index, shared, len(study.get_trials(deepcopy=False)))
    return study


def differences(ours: object, theirs: object, prefix: str = "") -> list[str]:
    """Dotted keys at which two nested mappings differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [d for key in sorted(set(ours) | set(theirs)) for d in differences(ours.get(key), theirs.get(key), f"{prefix}{key}.")]
    return [] if ours == theirs else [prefix.rstrip(".")]


def identity_differences(ours: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """Where a stored study's identity differs from this one's; a recipe key added to sparta since the
    study started counts as its default there, so a study outlives an upgrade, and a key left out of
    either recipe counts as its default (both ways: a key removed from the recipe changes it too)."""
    theirs = stored.get("recipe") or {}
    names = {name for name, _, _ in [*changed_keys(theirs, ours["recipe"]), *changed_keys(ours["recipe"], theirs)]}
    recipe = [f"recipe.{name}" for name in sorted(names)]
    return recipe + differences({k: v for k, v in ours.items() if k != "recipe"},
                                {k: v for k, v in stored.items() if k != "recipe"})


def retries(trials) -> dict[int, Any]:
    """Each retried trial's number -> its retry, which names the trial it replaces (`retry_of`)."""
    return {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}


def trials_left(study, budget: int) -> int:
    """Asked-for trials count once; a failed trial that was retried is replaced by its retry."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    replaced = retries(trials)
    return budget - sum(t.state != TrialState.WAITING and t.number not in replaced for t in trials)


@contextmanager
def ask_lock(study_dir: str | Path) -> Iterator[None]:
    """Local workers check the budget and ask for a trial one at a time, so they never overshoot it.
    (Machines sharing only the storage may overshoot by one trial each; see docs/tune.md.)"""
    with exclusive(Path(study_dir) / ".ask.lock"):
        yield


def owner_attrs() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}


def _alive(pid: int) -> bool:
    """Whether a process runs; a zombie (dead, not yet reaped: its parent was killed too) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # no /proc (macOS): trust kill
        return True


def is_stale(trial, now: float | None = None) -> bool:
    """A RUNNING trial nobody runs any more: its process on this host is gone, or (any host) its
    heartbeat stopped long ago. Trials of a live `sparta tune` elsewhere are left alone."""
    attrs = trial.user_attrs
    if attrs.get("host") == socket.gethostname() and isinstance(attrs.get("pid"), int) and not _alive(attrs["pid"]):
        return True
    beat = attrs.get("heartbeat", trial.datetime_start.timestamp() if trial.datetime_start else None)
    return beat is not None and (now or time.time()) - beat > STALE_AFTER_SECONDS


def retire(study, trial, reason: str) -> int | None:
    """Mark a trial that will not finish FAIL and enqueue its parameters again; returns the retry's
    number (None when the trial finished meanwhile). The retry continues in the old trial's run folder
    from its newest checkpoint, if any (worker.retried_folder)."""
    from optuna.trial import TrialState

    try:
        study.tell(trial.number, state=TrialState.FAIL)
    except ValueError:  # "Cannot tell a COMPLETE trial": it finished after all
        return None
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retry_reason": reason})
    return retries(study.get_trials(deepcopy=False))[trial.number].number


def retire_stale(study) -> list[tuple[int, int]]:
    """(old, retry) trial numbers for every stale RUNNING trial."""
    from optuna.trial import TrialState

    retired = [(t.number, retire(study, t, "its process died (killed, or the machine went away)"))
               for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if is_stale(t)]
    return [(old, new) for old, new in retired if new is not None]
