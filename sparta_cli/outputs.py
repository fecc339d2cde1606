"""What sparta may delete, and where it may write: the one home for these rules.

- A run folder (`sparta train`): `--overwrite` removes only the entries a sparta run writes
  (RUN_ENTRIES); a folder holding anything else is refused, never cleared, and a link in it is
  unlinked, never followed.
- A merge or export output is replaced whole (fileio.replace_dir), so `--overwrite` replaces only a
  previous output of that command, and never a folder that is or holds one of the command's inputs,
  the current folder, the home folder or a filesystem root.
- A report folder may hold anything; the report files already in it are replaced only when an
  earlier `sparta report` wrote them (its report.md starts with REPORT_TAG).
- One process at a time per output: an exclusive `flock` on a lock file, which the operating system
  releases when the process ends, however it ends (no stale lock after a kill -9).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import LEFTOVER, make_dir, sweep_leftovers

LOCK_FILE = ".sparta.lock"

# Everything `sparta train` (and `sparta eval` of a run) writes into a run folder.
# tests/test_outputs.py checks a real run against this list.
RUN_ENTRIES = re.compile(
    r"^(config\.yaml|adapter_config\.json|adapter_model\.safetensors|trainer_log\.jsonl|train_results\.json"
    r"|eval_results\.json|all_results\.json|training_loss\.png|eval_results_.+\.json|checkpoint-\d+|peft|tensorboard|wandb"
    # a `full` run's folder is a transformers checkpoint: save_pretrained's model and tokenizer files, its config aside
    r"|sparta_config\.json"
    r"|config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|merges\.txt"
    r"|(tokenizer|spiece|sentencepiece\.bpe)\.model|chat_template\.(jinja|json)"
    + "|" + re.escape(LOCK_FILE) + r")$"
)
# A folder is a run folder when it holds one of these (a run killed early has only config.yaml or a log).
RUN_MARKERS = ("config.yaml", "adapter_config.json", "sparta_config.json", "trainer_log.jsonl", "all_results.json")
MERGE_MARKER = "merge_report.json"
EXPORT_CARD_TAG = "tags: [sparta, sparse-fine-tuning]"  # the model card export writes (export.model_card)
REPORT_TAG = "<!-- written by sparta report: rerunning it with this --output replaces the report's files -->"


def _is_leftover(name: str) -> bool:
    return LEFTOVER.match(name) is not None


def run_dir_is_empty(path: Path) -> bool:
    """True for a missing or empty folder, or one holding only a lock file and leftovers."""
    return not path.is_dir() or all(entry.name == LOCK_FILE or _is_leftover(entry.name) for entry in path.iterdir())


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (any((path / name).is_file() for name in RUN_MARKERS)
                              or any(re.fullmatch(r"checkpoint-\d+", p.name) for p in path.iterdir()))


def foreign_entries(path: Path) -> list[str]:
    """Entries of a run folder that no sparta run writes (the user's own files)."""
    return sorted(entry.name for entry in path.iterdir() if not RUN_ENTRIES.match(entry.name) and not _is_leftover(entry.name))


def check_clearable_run_dir(path: Path) -> None:
    """Refuse `--overwrite` on a folder that is not a sparta run or holds files a run did not write."""
    if run_dir_is_empty(path):
        return
    foreign = foreign_entries(path)
    if not is_run_dir(path) or foreign:
        shown = f"`{foreign[0]}`" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "") if foreign else "no run files"
        raise SpartaError(f"output_dir {path} is not a sparta run folder (it holds {shown}): --overwrite only replaces what a "
                          "sparta run wrote; set output_dir to a new folder")


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


# ---------------------------------------------------------------- merge and export outputs


def _same_or_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_replaceable(output: Path, *, command: str, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an --output that would lose files: an existing one without --overwrite, and even with it
    a folder that is not a previous `sparta <command>` output, or that is or holds an input, the
    current folder, the home folder or a filesystem root."""
    output = Path(output)
    resolved = output.expanduser().resolve()
    protected = [(Path(path).expanduser().resolve(), f"the input {path}") for path in inputs]
    protected += [(Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "your home folder")]
    for path, what in sorted(protected, key=lambda item: item[0] != resolved):  # "is" before "holds"
        if _same_or_inside(path, resolved):
            relation = "is" if path == resolved else "holds"
            raise SpartaError(f"--output {output} {relation} {what}: sparta {command} replaces its output folder whole; "
                              "choose a new folder for --output")
    if resolved.parent == resolved:
        raise SpartaError(f"--output {output} is a filesystem root: choose a new folder for --output")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise SpartaError(f"--output {output} is a file or a link, not a folder: choose a new folder for --output")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise SpartaError(f"--output {output} is not empty: pass --overwrite to replace it, or choose a new folder")
    if not _written_by(output, command):
        raise SpartaError(f"--output {output} is not the output of an earlier `sparta {command}`: --overwrite only replaces "
                          "what sparta wrote; choose a new folder for --output")


def _written_by(folder: Path, command: str) -> bool:
    if command == "merge":
        return (folder / MERGE_MARKER).is_file()
    card = folder / "README.md"
    try:
        return card.is_file() and EXPORT_CARD_TAG in card.read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        return False


def check_replaceable_file(path: Path, *, command: str, keys: Sequence[str]) -> None:
    """An output file may replace only an earlier output of the same command (a JSON object with `keys`),
    never a file of the user's (`sparta eval RUN --output recipe.yaml`)."""
    if path.is_dir():
        raise SpartaError(f"--output {path} is a folder: name a file, e.g. {path / 'eval_results.json'}")
    if not path.exists() and not path.is_symlink():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (ValueError, OSError):
        data = None
    if not isinstance(data, dict) or not set(keys) <= set(data):
        raise SpartaError(f"--output {path} exists and is not an earlier `sparta {command}` result: sparta replaces only "
                          "its own files; choose a new file name")


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
    try:
        handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release() or exit
    except OSError as exc:
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
