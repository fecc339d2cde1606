"""Atomic writes: every file sparta writes appears under its real name complete, or not at all.

Each writer writes to a temporary name in the same folder, fsyncs, then renames;
a rename within one filesystem is atomic, so a kill at any moment leaves the old
file (or none), never half of a new one. The temporary names are hidden and end in
`.tmp` (leftover_of): what a killed writer left behind is swept by the next write of
the same file, and a run folder is swept whole when a run starts in it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from sparta_cli.errors import RunFailure, SpartaError


def _explain(exc: OSError, path: Path) -> SpartaError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RunFailure(f"no space left on the device while writing {path}: free some space or write elsewhere; "
                          "the previous output is kept")
    if exc.errno == errno.EROFS:
        return SpartaError(f"cannot write to {path}: the file system is read-only; write elsewhere")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SpartaError(f"no permission to write {path}: choose a place you can write to")
    if exc.errno == errno.EISDIR:
        return SpartaError(f"cannot write {path}: it is a folder; name a file")
    if exc.errno == errno.ENAMETOOLONG:
        return name_too_long(path)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((str(p) for p in (path, *path.parents) if p.is_file()), "a part of the path")
        return SpartaError(f"cannot create {path}: {blocker} is a file, not a folder: choose another output_dir")
    return RunFailure(f"cannot write {path}: {exc.strerror or exc}")


_ERRNO_IN_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                  "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def explain_write_error(exc: BaseException, path: str | Path | None = None) -> SpartaError | None:
    """The one-line error for a full disk or an unwritable place, from an OSError or from a library
    that reports one as text (safetensors' `SafetensorError: ... No space left on device (os error 28)`)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return _explain(exc, Path(path or exc.filename or "the output"))
    for phrase, code in _ERRNO_IN_TEXT.items():
        if phrase in str(exc):
            return _explain(OSError(code, phrase), Path(path or getattr(exc, "filename", None) or "the output"))
    return None


def name_too_long(path: Path) -> SpartaError:
    """The file system's name limit (255 bytes a name on most), with the name that passes it."""
    parent = next((p for p in path.absolute().parents if _exists(p)), Path("/"))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)), default=str(path))
    if len(os.fsencode(longest)) <= limit:
        return SpartaError(f"the path {str(path)[:80]}... is longer than the file system allows: choose a shorter one")
    return SpartaError(f"the name `{longest[:40]}...` in {str(path)[:80]}... has {len(os.fsencode(longest))} bytes, more than the "
                       f"{limit} the file system allows for one name: shorten it (in output_dir, the output you named, or the ${{...}} "
                       "values they use)")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


# ---------------------------------------------------------------- reading a user's file


def describe(mode: int) -> str:
    """What a path that is not a regular file is, from its stat mode."""
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _read_error(exc: OSError, path: Path) -> SpartaError:
    """The one-line error for a file that is there but cannot be read."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SpartaError(f"cannot read {path}: permission denied: make it readable (chmod u+r) or copy it somewhere you can read")
    if exc.errno == errno.ENAMETOOLONG:
        return SpartaError(f"cannot read {path}: a name in the path is longer than the file system allows: shorten it")
    if exc.errno == errno.ELOOP:
        return SpartaError(f"cannot read {path}: its symbolic links loop: point it at a real file")
    return SpartaError(f"cannot read {path}: {exc.strerror or exc}: check the path")


def input_file(path: Path, missing: str, fix: str, setting: str = "") -> Path:
    """`path` when it is a regular file; else a one-line error: `missing` when nothing is there,
    else what it is (`setting path is a FIFO (named pipe), not a regular file: fix`). Nothing is opened."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise SpartaError(missing) from None
    except OSError as exc:
        raise _read_error(exc, path) from None
    if not stat.S_ISREG(mode):
        raise SpartaError(f"{setting}{path} is {describe(mode)}, not a regular file: {fix}")
    return path


def read_bytes(path: Path) -> bytes:
    """The file's bytes; opened without blocking, so a FIFO swapped in is refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SpartaError(f"{path} not found: check the path") from None
    except OSError as exc:
        raise _read_error(exc, path) from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SpartaError(f"{path} is {describe(mode)}, not a regular file: give a regular file")
        try:
            return handle.read()
        except OSError as exc:
            raise _read_error(exc, path) from None


def read_text(path: Path) -> str:
    """The whole file, a leading BOM dropped; bad bytes are reported by line so they can be found."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise SpartaError(f"{path} is UTF-16 text, not UTF-8: re-save the file as UTF-8 "
                              "(e.g. `iconv -f UTF-16 -t UTF-8`)") from None
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpartaError(f"{path} is not UTF-8 text (bad byte on line {line}): re-save the file as UTF-8") from None


def explain_os_error(exc: BaseException) -> SpartaError | None:
    """The one-line error for a file system failure that escaped a command (the CLI's last resort):
    a name too long, a file it may not read, a link loop, a path that vanished, too many open files,
    a failing disk; the write failures of explain_write_error included."""
    if not isinstance(exc, OSError) or exc.errno is None:
        return explain_write_error(exc)
    path = Path(exc.filename if isinstance(exc.filename, (str, bytes, os.PathLike)) and exc.filename else "a file")
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM) and _exists(path) and not os.access(path, os.R_OK):
        return SpartaError(f"no permission to read {path}: make it readable (chmod), or use a copy you can read")
    if code in (errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR):
        return _explain(exc, path)
    if code == errno.ELOOP:
        return SpartaError(f"{path} is a link that leads back to itself: fix or remove the link")
    if code == errno.ENOENT:
        return RunFailure(f"{path} does not exist (was it removed while sparta ran?): restore it and rerun")
    if code in (errno.EMFILE, errno.ENFILE):
        return RunFailure("too many open files: raise the limit (`ulimit -n 65536`) and rerun")
    if code == errno.EIO:
        return RunFailure(f"input/output error on {path}: the disk or network file system failed; check it and rerun")
    return explain_write_error(exc)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.(?P<kind>[a-z0-9_]{8}\.tmp|tmp|old)$")
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


def leftover_of(entry: Path) -> str | None:
    """The NAME a killed writer's temporary `entry` stood in for, or None for anything else (a user's
    `.notes.old` file included): `.NAME.XXXXXXXX.tmp` (mkstemp/mkdtemp below), `.checkpoint-N.tmp`
    (checkpoint.py), or a `.NAME.old` folder (replace_dir's previous output)."""
    match = _TEMPORARY.match(entry.name)
    if match is None:
        return None
    if match["kind"] == "tmp" and not _CHECKPOINT.match(match["name"]):
        return None
    if match["kind"] == "old" and (entry.is_symlink() or not entry.is_dir()):
        return None
    return match["name"]


def sweep_leftovers(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries a killed writer left in `folder` (only those for `name`, when given).

    Only sparta's own hidden names match; links are unlinked, never followed. A `.NAME.old`
    whose NAME is missing is the previous good output of a replace_dir killed mid-swap: it is
    put back, not removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    swept = []
    for entry in folder.iterdir():
        stands_for = leftover_of(entry)
        if stands_for is None or (name is not None and stands_for != name):
            continue
        original = folder / stands_for
        try:
            if entry.name.endswith(".old") and not os.path.lexists(original):
                os.replace(entry, original)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _explain(exc, entry) from None
        swept.append(entry)
    return swept


def make_dir(path: str | Path) -> None:
    """`mkdir -p`, with the writers' one-line errors (a parent that is a file, no permission, disk full)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _explain(exc, Path(path)) from None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    make_dir(path.parent)
    sweep_leftovers(path.parent, path.name)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _explain(exc, path) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 and some writers (safetensors) recreate the file 0600: give it ordinary permissions
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _explain(exc, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """Run `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | Path, text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    def save(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as exc:  # noqa: BLE001 - safetensors reports I/O errors as SafetensorError text
            known = explain_write_error(exc, path)
            if known is None:
                raise
            raise known from None

    write_with(path, save)


def ordinary_permissions(folder: Path) -> None:
    """Give the regular files under `folder` (symlinks untouched, never followed) the permissions a
    plain write gives them: transformers' save_pretrained writes model.safetensors 0600, so a merged
    checkpoint or a full run could not be read by the group the folder is shared with."""
    mode = 0o666 & ~_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


@contextmanager
def exclusive(lock_path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (created when missing), waiting for another holder first.

    The operating system drops the lock when its holder exits, killed or not, so a crash never leaves
    it held; `on_wait` is called once when the wait begins, to say why nothing is happening."""
    lock_path = Path(lock_path)
    make_dir(lock_path.parent)
    try:
        handle = open(lock_path, "a")  # noqa: SIM115 - closed below; closing drops the flock
    except OSError as exc:
        raise _explain(exc, lock_path) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def replace_dir(build: Callable[[Path], Any], target: str | Path) -> None:
    """Build a folder under a temporary name, then swap it in for `target` atomically."""
    target = Path(target)
    make_dir(target.parent)
    sweep_leftovers(target.parent, target.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise _explain(exc, target) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary folder
        build(tmp)
        ordinary_permissions(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise _explain(exc, target) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file sparta or transformers wrote; anything else is one line naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpartaError(f"{path} does not exist: is this a sparta run directory?") from None
    except IsADirectoryError:
        raise SpartaError(f"{path} is a folder, not a JSON file: the folder is damaged; rerun or restore it") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SpartaError(f"{path} is not valid JSON ({str(exc)[:80]}): the file is damaged; rerun or restore it") from None
    if not isinstance(data, dict):
        raise SpartaError(f"{path} holds a JSON {type(data).__name__}, not an object: the file is damaged; rerun or restore it")
    return data


# ---------------------------------------------------------------- YAML

MAX_YAML_NODES = 100_000  # a recipe has ~50; a billion-laughs bomb resolves to billions


class YamlRefused(yaml.YAMLError):
    """A YAML document sparta will not read: an alias bomb, or a key given twice."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader (no Python objects) that refuses duplicate keys and documents whose aliases
    resolve to more than MAX_YAML_NODES nodes (a 1.5 KB "billion laughs" file would take GBs)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if duplicate:
                raise YamlRefused(f"the key `{key}` appears twice at line {key_node.start_mark.line + 1}: keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_size(node)
        return node


def _check_size(root) -> None:
    """Count the nodes the document expands to, each shared (aliased) node once per use."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias counts once instead of looping
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        sizes[id(node)] = total
        if total > MAX_YAML_NODES:
            raise YamlRefused(f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?): write the values out")
        return total

    size(root)


def parse_yaml(text: str) -> Any:
    """yaml.safe_load with StrictLoader: no Python objects, no alias bombs, no duplicate keys."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise YamlRefused(f"a value cannot be read ({str(exc).split(':')[0]}): shorten it") from None


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """One line per record, flushed: a kill loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def checkpoint_files(folder: Path) -> list[Path] | None:
    """The safetensors files of a local checkpoint, or None when it has none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in dict.fromkeys(read_json(index)["weight_map"].values())]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None
