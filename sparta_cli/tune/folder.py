"""The study folder's rule, as a run folder's: `sparta tune` replaces only what a sparta study wrote.

A folder is a study's when its study.json is a sparta plan (the folder's tag: `sparta tune` writes it
first); a study folder keeps one study. Every entry in it must be one a study writes (STUDY_ENTRIES),
and each file a study rewrites (its tables, best.yaml, summary.json, plots) must still carry that
file's own mark of sparta, so a user's file put in its place is never replaced. A folder holding
anything else is refused with the fix, before anything is written. Study folders of earlier sparta
versions pass as they are: the tags are what sparta always wrote.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import leftover_of
from sparta_cli.outputs import few_names
from sparta_cli.tune.plots import HISTORY_PNG, IMPORTANCES_PNG, PARAMS_PNG
from sparta_cli.tune.results import BEST_YAML, SUMMARY_JSON, TRIALS_CSV, TRIALS_MD
from sparta_cli.tune.study import JOURNAL_FILE, PLAN_FILE, Plan

TRIALS_DIR = "trials"
LOGS_DIR = "logs"
BEST_RUN = "best"  # `sparta train best.yaml` trains here: a run folder, written by sparta train
ASK_LOCK = ".ask.lock"
TRIAL_DIR = re.compile(r"^trial-(\d{4,})$")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _starts_with(*prefixes: bytes) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        with open(path, "rb") as handle:
            head = handle.read(64)
        return any(head.startswith(prefix) if prefix else head == b"" for prefix in prefixes)

    return check


def _is_summary(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return isinstance(data, dict) and {"study", "storage", "metric", "direction", "trials", "best"} <= set(data)


# What each file a study rewrites starts with (outputs.py writes them so); an empty trials.csv is a study's with no trial yet.
REWRITTEN: dict[str, Callable[[Path], bool]] = {
    TRIALS_CSV: _starts_with(b"", b"trial,state,"),
    TRIALS_MD: _starts_with(b"# study "),
    BEST_YAML: _starts_with(b"# best trial "),
    SUMMARY_JSON: _is_summary,
    HISTORY_PNG: _starts_with(PNG_SIGNATURE),
    PARAMS_PNG: _starts_with(PNG_SIGNATURE),
    IMPORTANCES_PNG: _starts_with(PNG_SIGNATURE),
}
STUDY_ENTRIES = {PLAN_FILE, JOURNAL_FILE, JOURNAL_FILE + ".lock", ASK_LOCK, TRIALS_DIR, LOGS_DIR, BEST_RUN, *REWRITTEN}


def _stored_plan(folder: Path) -> dict | None:
    """The plan in study.json when it is one (the folder's tag), else None."""
    path = folder / PLAN_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    required = {f.name for f in dataclasses.fields(Plan) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return data if isinstance(data, dict) and required <= set(data) else None


def _own_names(plan: Plan, folder: Path) -> set[str]:
    """STUDY_ENTRIES, plus a journal or sqlite file the storage keeps in the folder (with its lock or sqlite's side files)."""
    names = set(STUDY_ENTRIES)
    sqlite = plan.storage.startswith("sqlite:///")
    if "://" not in plan.storage or sqlite:
        path = Path(plan.storage.split(":///", 1)[1] if sqlite else plan.storage).expanduser()
        if path.resolve().parent == folder.resolve():
            names |= {path.name, *(path.name + side for side in ((".lock",) if not sqlite else ("-journal", "-wal", "-shm")))}
    return names


def _refuse(folder: Path, problem: str) -> SpartaError:
    return SpartaError(f"study folder {folder} {problem}: sparta tune replaces only what a sparta study wrote; "
                       "give --output a new (or empty) folder, or move those files aside")


def check_study_folder(plan: Plan) -> None:
    """Refuse a study folder that is not this study's, or holds what no study wrote (see module doc)."""
    folder = Path(plan.study_dir)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise SpartaError(f"study folder {folder} is a file or a link, not a folder: give --output a new folder")
    entries = sorted(e for e in folder.iterdir() if not leftover_of(e)) if folder.is_dir() else []
    if not entries:
        return
    stored = _stored_plan(folder)
    if stored is None:
        raise _refuse(folder, f"is not a sparta study folder (it holds {few_names([e.name for e in entries])}, and no study.json of sparta tune)")
    if stored["study"] != plan.study:
        raise SpartaError(f"study folder {folder} holds study {stored['study']}, not {plan.study}: a study folder keeps one "
                          f"study; resume that one with --study {stored['study']}, or give --output a new folder")
    own = _own_names(plan, folder)
    foreign = [e.name for e in entries if e.name not in own]
    if foreign:
        raise _refuse(folder, f"holds {few_names(foreign)}, which no sparta study writes")
    for entry in entries:
        if entry.is_symlink() and not entry.name.endswith(".lock"):  # Optuna's journal lock is a symlink while held
            raise _refuse(folder, f"holds `{entry.name}` as a link")
        check = REWRITTEN.get(entry.name)
        if check is not None and not (entry.is_file() and _readable_and(check, entry)):
            raise _refuse(folder, f"holds a `{entry.name}` that sparta tune did not write (edited, or replaced?)")
    for inside in (LOGS_DIR, TRIALS_DIR):  # a study appends to logs and trains into trials: a link there sends writes out
        linked = _first_link(folder / inside, depth=2)
        if linked is not None:
            raise _refuse(folder, f"holds `{linked.relative_to(folder)}` as a link")


def _first_link(folder: Path, depth: int) -> Path | None:
    """The first link among `folder`'s entries, down `depth` levels of real folders."""
    if depth == 0 or folder.is_symlink() or not folder.is_dir():
        return None
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            return entry
        found = _first_link(entry, depth - 1)
        if found is not None:
            return found
    return None


def _readable_and(check: Callable[[Path], bool], path: Path) -> bool:
    try:
        return check(path)
    except OSError:
        return False


def check_trial_folders(study, plan: Plan) -> None:
    """Each trials/trial-N must be trial N of this study: a folder left by another study (or by this one
    before its storage was removed) would be trained into when the new trial N starts."""
    trials_dir = Path(plan.study_dir) / TRIALS_DIR
    if not trials_dir.is_dir():
        return
    from optuna.trial import TrialState

    known = {t.number for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING}
    unknown = sorted(e.name for e in trials_dir.iterdir() if (m := TRIAL_DIR.match(e.name)) and int(m.group(1)) not in known)
    if unknown:
        raise SpartaError(f"{trials_dir / unknown[0]} is not a trial of study {plan.study} in its storage (the storage was "
                          f"removed or replaced, or another study ran here): sparta tune never trains into a trial folder it "
                          f"did not start; move {trials_dir} aside, or give --output a new folder")
