"""What sparta may delete, and where it may write: the one home for these rules.

- An output is never an input (check_not_an_input, for every command that writes): an output path
  that resolves, links followed, to a file the command reads or into a folder it reads (a run, a
  model) is refused, `--overwrite` or not; a folder replaced or cleared whole may not hold one either.

- A run folder (`sparta train`): `--overwrite` removes only the entries a sparta run writes
  (RUN_ENTRIES); a folder holding anything else is refused, never cleared, and a link in it is
  unlinked, never followed.
- An output file (eval, predict, generate `--output`) is replaced only when it is an earlier output of the
  same command (check_replaceable_file): a user's file is refused, `--overwrite` or not.
- A merge or export output is replaced whole (fileio.replace_dir), so `--overwrite` replaces only a
  previous output of that command that holds nothing but the files it recorded writing (OUTPUT_FILES),
  and never a folder that is or holds one of the command's inputs, the current folder, the home folder
  or a filesystem root.
- A report folder may hold anything; the report files already in it are replaced only when an
  earlier `sparta report` wrote them (its report.md starts with REPORT_TAG).
- One process at a time per output: an exclusive `flock` on a lock file, which the operating system
  releases when the process ends, however it ends (no stale lock after a kill -9).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import leftover_of, make_dir, sweep_leftovers
from sparta_cli.runs import RUN_MARKERS, has_checkpoints, run_entry_patterns
from sparta_cli.tasks.files import parse_json_text

if TYPE_CHECKING:
    from sparta_cli.config import Recipe

LOCK_FILE = ".sparta.lock"

# Everything `sparta train` (and `sparta eval` of a run) writes into a run folder: runs.py names them.
# tests/test_outputs.py checks a real run against this list.
RUN_ENTRIES = re.compile("^(" + "|".join([*run_entry_patterns(), re.escape(LOCK_FILE)]) + ")$")
MERGE_MARKER = "merge_report.json"
EXPORT_CARD_TAG = "tags: [sparta, sparse-fine-tuning]"  # the model card export writes (export.model_card)
# What merge (a key of MERGE_MARKER) and export (a line of its model card's front matter) wrote, as a JSON
# list of output_files: `--overwrite` replaces nothing else (eval results, a user's notes).
OUTPUT_FILES = "sparta_files"
REPORT_TAG = "<!-- written by sparta report: rerunning it with this --output replaces the report's files -->"


def few_names(names: Sequence[str], limit: int = 3) -> str:
    """The first few of `names`, for a one-line message."""
    shown = ", ".join(f"`{name}`" for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def run_dir_is_empty(path: Path) -> bool:
    """True for a missing or empty folder, or one holding only a lock file and leftovers."""
    return not path.is_dir() or all(entry.name == LOCK_FILE or leftover_of(entry) for entry in path.iterdir())


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (any((path / name).is_file() for name in RUN_MARKERS) or has_checkpoints(path))


def foreign_entries(path: Path) -> list[str]:
    """Entries of a run folder that no sparta run writes (the user's own files)."""
    return sorted(entry.name for entry in path.iterdir() if not RUN_ENTRIES.match(entry.name) and not leftover_of(entry))


def check_clearable_run_dir(path: Path, option: str = "--overwrite", does: str = "only replaces what a sparta run wrote") -> None:
    """Refuse `--overwrite` (or `--resume`) on a folder that is not a sparta run or holds files a run did not write."""
    if run_dir_is_empty(path):
        return
    foreign = foreign_entries(path)
    if not is_run_dir(path) or foreign:
        shown = few_names(foreign) if foreign else "no run files"
        raise SpartaError(f"output_dir {path} is not a sparta run folder (it holds {shown}): {option} {does}; "
                          "set output_dir to a new folder")


def clear_run_dir(path: Path) -> None:
    """Remove what a previous run wrote (after check_clearable_run_dir); the lock file stays (it is held)."""
    check_clearable_run_dir(path)
    sweep_leftovers(path)
    for entry in path.iterdir():
        if entry.name == LOCK_FILE or not RUN_ENTRIES.match(entry.name):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()  # a file, or a link: the link goes, never what it points to
        except FileNotFoundError:
            continue


def check_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty folder unless told to (`--overwrite`, `--resume`), a folder `--overwrite`
    may not clear, and one another process is training in; changes nothing, so it runs before the
    (slow) model load."""
    if path.exists() and not path.is_dir():
        raise SpartaError(f"output_dir {path} is a file: choose a folder name")
    check_not_locked(path)
    if resume:  # a run's files are written among whatever the folder holds: only into a run's own folder
        check_clearable_run_dir(path, "--resume", "continues only a sparta run")
    if resume or run_dir_is_empty(path):
        return
    if overwrite:
        check_clearable_run_dir(path)
        return
    extra = " or --resume to continue its checkpoints" if has_checkpoints(path) else ""
    raise SpartaError(f"output_dir {path} is not empty: pass --overwrite to replace it{extra}, or set output_dir=...")


def prepare_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """Create the folder and hold its lock for this process; sweep what killed writers left;
    with `--overwrite`, remove what the previous run wrote (and nothing else)."""
    check_output_dir(path, overwrite=overwrite, resume=resume)
    lock_run_dir(path)
    sweep_leftovers(path)
    if overwrite:
        clear_run_dir(path)


# ---------------------------------------------------------------- an output is never an input


def _same_or_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_an_input(output: Path, inputs: Sequence[Path], *, option: str = "--output", replaces_whole: bool = False,
                       fix: str = "choose a new path for --output") -> None:
    """The one rule for every command that writes: an output path that resolves (links followed) to
    an input file, or into an input folder (a run, a model), is refused, `--overwrite` or not; an
    output folder the command replaces or clears whole (`replaces_whole`) may not hold an input either."""
    output = Path(output)
    resolved = output.expanduser().resolve()
    for given in sorted(inputs, key=lambda given: Path(given).expanduser().resolve() != resolved):  # "is" first
        path = Path(given).expanduser().resolve()
        if path == resolved or (path.is_file() and resolved.is_file() and os.path.samefile(path, resolved)):  # a hard link too
            relation = "is"
        elif _same_or_inside(resolved, path):
            relation = "is inside"
        elif replaces_whole and _same_or_inside(path, resolved):
            relation = "holds"
        else:
            continue
        link = f" (a link to {resolved})" if resolved != Path(os.path.abspath(output.expanduser())) else ""
        raise SpartaError(f"{option} {output}{link} {relation} the input {given}: sparta never writes over what it reads; {fix}")


def model_inputs(name_or_path: str | None, *, strict: bool = False) -> list[Path]:
    """A model's folder on this machine, as an input no output may be written into; none for a Hub name.
    A `pkg:` model not installed here is left to the command that loads it, or, `strict`, said now."""
    from sparta_cli.models import resolve_model_path

    try:
        folder = Path(resolve_model_path(name_or_path)) if name_or_path else None
    except SpartaError:
        if strict:
            raise
        return []
    return [folder] if folder is not None and folder.exists() else []


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """What a recipe reads from this machine: the base model's folder and the task's own data files (and
    SFT's chat template file)."""
    files = [Path(name).expanduser() for name in (recipe.task.train_file, recipe.task.validation_file, recipe.task.test_file,
                                                  recipe.task.chat_template) if name]
    return [*model_inputs(recipe.model.name_or_path), *[path for path in files if path.exists()]]


# ---------------------------------------------------------------- merge and export outputs


def check_replaceable(output: Path, *, command: str, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an --output that would lose files: an existing one without --overwrite, and even with it
    a folder that is not a previous `sparta <command>` output, or that is, holds or is inside an input,
    the current folder, the home folder or a filesystem root."""
    output = Path(output)
    resolved = output.expanduser().resolve()
    for path, what in ((Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "your home folder")):
        if _same_or_inside(path, resolved):
            relation = "is" if path == resolved else "holds"
            raise SpartaError(f"--output {output} {relation} {what}: sparta {command} replaces its output folder whole; "
                              "choose a new folder for --output")
    if resolved.parent == resolved:
        raise SpartaError(f"--output {output} is a filesystem root: choose a new folder for --output")
    check_not_an_input(output, inputs, replaces_whole=True, fix="choose a new folder for --output")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise SpartaError(f"--output {output} is a file or a link, not a folder: choose a new folder for --output")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise SpartaError(f"--output {output} is not empty: pass --overwrite to replace it, or choose a new folder")
    written, recorded = _earlier_output(output, command)
    if not written:
        raise SpartaError(f"--output {output} is not the output of an earlier `sparta {command}`: --overwrite only replaces "
                          "what sparta wrote; choose a new folder for --output")
    foreign = [name for name in output_files(output) if name not in recorded] if recorded is not None else []
    if foreign:
        raise SpartaError(f"--output {output} holds {few_names(foreign)}, which the earlier `sparta {command}` did not write: "
                          "move them out, or choose a new folder for --output")


def output_files(folder: Path) -> list[str]:
    """Every entry under `folder` as a relative path: what merge and export record writing, and what
    `--overwrite` compares with that record. A link is an entry of its own, never followed out of the
    folder; an empty folder is `name/`."""
    found: list[str] = []
    for entry in sorted(folder.iterdir()):
        inner = output_files(entry) if entry.is_dir() and not entry.is_symlink() else None
        if inner is None:
            found.append(entry.name)
        else:
            found += [f"{entry.name}/{name}" for name in inner] or [f"{entry.name}/"]
    return found


def _earlier_output(folder: Path, command: str) -> tuple[bool, set[str] | None]:
    """Whether `folder` is an earlier output of `command` (merge's marker, export's card), and the files
    it recorded writing. None when it recorded none: outputs written before sparta kept this record are
    still replaced whole, as they were then."""
    try:
        if command == "merge":
            marker = folder / MERGE_MARKER
            if not marker.is_file():
                return False, None
            files = parse_json_text(marker.read_text(encoding="utf-8")).get(OUTPUT_FILES)
        else:
            card = folder / "README.md"
            text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
            if EXPORT_CARD_TAG not in text[:2000]:
                return False, None
            front = text.split("\n---", 1)[0]
            line = next((line for line in front.splitlines() if line.startswith(f"{OUTPUT_FILES}: ")), None)
            files = parse_json_text(line.removeprefix(f"{OUTPUT_FILES}: ")) if line else None
    except OSError:  # unreadable: not a known output
        return False, None
    except (ValueError, AttributeError):  # its record is not JSON, or not an object: written, with no record
        return True, None
    return True, {str(name) for name in files} if isinstance(files, list) else None


def check_replaceable_file(path: Path, *, command: str, example: str) -> None:
    """An existing output file may be replaced only when it is an earlier output of the same command
    (FILE_SIGNATURES) or empty, never a file of the user's or a link (`sparta eval RUN --output recipe.yaml`)."""
    if path.is_dir():
        raise SpartaError(f"--output {path} is a folder: name a file, e.g. {path / example}")
    if (path.exists() or path.is_symlink()) and not _written_by(path, command):
        raise SpartaError(f"--output {path} exists and is not an earlier `sparta {command}` result: sparta replaces only "
                          "its own files; choose a new file name")


def check_overwritable_file(path: Path, *, command: str, overwrite: bool, example: str) -> None:
    """check_replaceable_file, and an existing output replaced only with `--overwrite` (predict, generate)."""
    check_replaceable_file(path, command=command, example=example)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise SpartaError(f"--output {path} exists: pass --overwrite to replace it, or choose another file")


def _eval_result(head: str) -> bool:
    data = parse_json_text(head)
    return isinstance(data, dict) and {"target", "metrics"} <= set(data)


def _completion_row(head: str) -> bool:
    data = parse_json_text(head.partition("\n")[0])
    return isinstance(data, dict) and set(data) == {"prompt", "completion"}


# How each command's output file starts: eval a JSON object of its results, predict GLUE's header
# (predict.format_predictions), generate {prompt, completion} JSONL rows.
FILE_SIGNATURES = {
    "eval": _eval_result,
    "predict": lambda head: head.startswith("index\tprediction\n"),
    "generate": _completion_row,
}


def _written_by(path: Path, command: str) -> bool:
    """Whether the file at `path` is an earlier output of `command`; an empty file holds nothing to lose."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        text = path.read_text(encoding="utf-8")
        return not text or FILE_SIGNATURES[command](text)
    except (ValueError, OSError):
        return False


def check_report_folder(output: Path, names: Sequence[str]) -> None:
    """`sparta report --output DIR` writes `names` into DIR: refuse a DIR that is a file, and report files
    in it that an earlier report did not write (a user's own report.md), or that are links."""
    if output.exists() and not output.is_dir():
        raise SpartaError(f"--output {output} is a file: the report is a folder (report.csv, report.md, plots); name a folder")
    present = [name for name in names if (output / name).exists() or (output / name).is_symlink()]
    if not present:
        return
    card = output / "report.md"
    try:
        ours = card.is_file() and not card.is_symlink() and card.read_text(encoding="utf-8", errors="replace").startswith(REPORT_TAG)
    except OSError:
        ours = False
    links = [name for name in present if (output / name).is_symlink() or not (output / name).is_file()]
    if not ours or links:
        raise SpartaError(f"--output {output} already holds {', '.join(links or present)}, not written by an earlier "
                          "`sparta report`: sparta replaces only its own files; choose a new folder for --output")


# ---------------------------------------------------------------- one process per output

_held: dict[Path, object] = {}  # lock files this process holds, by resolved path (re-entrant within a process)


def _lock(lock_path: Path, what: str) -> None:
    key = lock_path.resolve()
    if key in _held:
        return
    try:  # never through a link: the PID written below would land in whatever file it names
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        handle = open(descriptor, "a+", encoding="utf-8")  # noqa: SIM115 - held until release() or exit
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SpartaError(f"{lock_path} is a link: sparta never writes through a link out of the folder it owns; "
                              "remove the link") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise SpartaError(f"cannot write to {lock_path.parent}: {exc.strerror}; choose a folder you can write to") from None
        raise
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            handle.close()
            raise
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SpartaError(f"{what} is in use by another sparta process (PID {holder}): wait for it to finish, or stop it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[key] = handle


def _release(lock_path: Path) -> None:
    handle = _held.pop(lock_path.resolve(), None)
    if handle is not None:
        handle.close()  # closing drops the flock


def lock_run_dir(run_dir: Path) -> None:
    """Hold the run folder for this process until release_run_dir or exit; refuse when another holds it."""
    make_dir(run_dir)
    _lock(run_dir / LOCK_FILE, f"output_dir {run_dir}")


def release_run_dir(run_dir: Path) -> None:
    _release(Path(run_dir) / LOCK_FILE)


def check_not_locked(run_dir: Path) -> None:
    """Refuse early (before loading a model) when another process holds the run folder. Only the main
    process of a distributed launch looks (RANK 0): the lock it takes later must not stop its own ranks."""
    lock_path = run_dir / LOCK_FILE
    if os.environ.get("RANK", "0") != "0" or not lock_path.is_file() or lock_path.resolve() in _held:
        return
    _lock(lock_path, f"output_dir {run_dir}")
    _release(lock_path)


@contextmanager
def locked_output(output: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside a merge/export output while it is built and swapped in; removed after."""
    output = Path(output)
    parent = output.expanduser().absolute().parent
    make_dir(parent)
    lock_path = parent / f".{output.name}.lock"
    _lock(lock_path, f"--output {output}")
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        _release(lock_path)
