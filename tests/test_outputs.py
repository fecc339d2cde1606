"""What sparta may delete (issue 11): only what it wrote, never through a link, one process per output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_factory import make_run, save_tiny_llama

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import atomic_path, replace_dir, sweep_leftovers, write_text
from sparta_cli.outputs import (
    LOCK_FILE,
    RUN_ENTRIES,
    check_output_dir,
    check_overwritable_file,
    check_replaceable,
    check_replaceable_file,
    is_run_dir,
    lock_run_dir,
    prepare_output_dir,
    release_run_dir,
)


def _earlier_outputs() -> dict[str, str]:
    """How each file-writing command's output starts, from the code that writes it."""
    import numpy as np

    from sparta_cli.predict import format_predictions

    return {"predict": format_predictions(np.array([1, 0]), ("negative", "positive")),
            "eval": json.dumps({"target": "run", "task": "sst2", "metrics": {"eval_accuracy": 0.5}}, indent=2),
            "generate": json.dumps({"prompt": "Hi", "completion": "there"}) + "\n"}


@pytest.mark.parametrize("command", ["eval", "predict", "generate"])
def test_an_output_file_replaces_only_an_earlier_output_of_its_command(command, tmp_path):
    outputs = _earlier_outputs()
    ours, empty, mine = tmp_path / "ours", tmp_path / "empty", tmp_path / "notes.txt"
    ours.write_text(outputs[command])
    empty.write_text("")
    mine.write_text("my notes\n")
    deep = tmp_path / "deep.json"  # a user's JSON nested past the interpreter's depth is theirs too
    deep.write_text("[" * 200_000 + "]" * 200_000)
    (tmp_path / "link").symlink_to(ours)
    others = [tmp_path / other for other in outputs if other != command]
    for other in others:
        other.write_text(outputs[other.name])
    for path in (mine, deep, tmp_path / "link", *others):  # --overwrite or not, a file it did not write stays
        with pytest.raises(SpartaError, match=f"is not an earlier `sparta {command}` result"):
            check_overwritable_file(path, command=command, overwrite=True, example="out")
        with pytest.raises(SpartaError, match="is not an earlier"):
            check_replaceable_file(path, command=command, example="out")
    assert mine.read_text() == "my notes\n"
    for path in (ours, empty):
        check_replaceable_file(path, command=command, example="out")  # eval's rule: its own result is replaced
        check_overwritable_file(path, command=command, overwrite=True, example="out")
        with pytest.raises(SpartaError, match="exists: pass --overwrite"):
            check_overwritable_file(path, command=command, overwrite=False, example="out")
    check_overwritable_file(tmp_path / "new", command=command, overwrite=False, example="out")
    with pytest.raises(SpartaError, match="is a folder: name a file, e.g. .*out"):
        check_replaceable_file(tmp_path, command=command, example="out")


def _run_folder(path: Path) -> Path:
    """What a finished run leaves, by name (contents do not matter here)."""
    path.mkdir(parents=True)
    for name in ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "trainer_log.jsonl", "all_results.json"):
        (path / name).write_text("x")
    (path / "checkpoint-2").mkdir()
    (path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    return path


def test_overwrite_refuses_the_current_folder_with_a_recipe_in_it(tmp_path, monkeypatch):
    (tmp_path / "recipe.yaml").write_text("model: {name_or_path: x}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpartaError, match="not a sparta run folder.*recipe.yaml.*only replaces what a sparta run wrote"):
        prepare_output_dir(Path("."), overwrite=True, resume=False)
    assert (tmp_path / "recipe.yaml").read_text() == "model: {name_or_path: x}\n"


def test_overwrite_refuses_a_run_folder_holding_a_file_of_the_user(tmp_path):
    run = _run_folder(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(SpartaError, match="notes.txt"):
        check_output_dir(run, overwrite=True, resume=False)
    assert (run / "notes.txt").read_text() == "mine" and (run / "config.yaml").exists()


def test_overwrite_unlinks_a_link_and_never_follows_it(tmp_path):
    run = _run_folder(tmp_path / "run")
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_text("keep")
    os.symlink(elsewhere, run / "checkpoint-9")  # a name a run writes, but a link
    (run / "adapter_model.safetensors").unlink()
    os.symlink(elsewhere / "data.bin", run / "adapter_model.safetensors")
    prepare_output_dir(run, overwrite=True, resume=False)
    try:
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
        assert (elsewhere / "data.bin").read_text() == "keep"
    finally:
        release_run_dir(run)


@pytest.mark.parametrize("method", ["sparta", "lora", "full"])
def test_the_run_entry_list_covers_a_real_run(method, tmp_path, minilm_path):
    """RUN_ENTRIES is written by hand: a real run's files must all match it (or --overwrite would refuse every rerun)."""
    run = make_run(tmp_path / "run", minilm_path, method=method)
    write_text(run / "eval_results_sst2_validation.json", "{}")
    assert is_run_dir(run)
    assert [p.name for p in run.iterdir() if not RUN_ENTRIES.match(p.name)] == []


def test_leftovers_are_swept_and_a_half_swapped_folder_comes_back(tmp_path):
    (tmp_path / ".adapter_model.safetensors.abcd_123.tmp").write_text("half")
    (tmp_path / ".checkpoint-5.tmp").mkdir()
    (tmp_path / ".merged.old").mkdir()  # replace_dir killed between its two renames: the previous output
    (tmp_path / ".merged.old" / "model.safetensors").write_text("good")
    (tmp_path / ".my-own.tmp.txt").write_text("the user's")  # not sparta's naming
    swept = sweep_leftovers(tmp_path)
    assert sorted(p.name for p in swept) == [".adapter_model.safetensors.abcd_123.tmp", ".checkpoint-5.tmp"]
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "good"
    assert (tmp_path / ".my-own.tmp.txt").exists()


def test_the_next_write_of_a_file_sweeps_its_leftovers(tmp_path):
    (tmp_path / ".report.csv.zzzzzzzz.tmp").write_text("killed mid-write")
    (tmp_path / ".other.csv.zzzzzzzz.tmp").write_text("another file's")
    write_text(tmp_path / "report.csv", "a,b\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.csv.zzzzzzzz.tmp", "report.csv"]
    with atomic_path(tmp_path / "x.bin") as tmp:
        assert tmp.name.startswith(".x.bin.") and tmp.name.endswith(".tmp")  # the name sweep_leftovers knows


def test_a_failed_replace_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    replace_dir(lambda tmp: (tmp / "a").write_text("v1"), out)

    def fails(tmp: Path) -> None:
        (tmp / "a").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(SpartaError, match="no space left"):
        replace_dir(fails, out)
    assert (out / "a").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["cwd", "home", "root", "the run", "the run's parent", "the base"])
def test_merge_output_never_replaces_an_input_or_a_precious_folder(where, tmp_path, monkeypatch):
    run = _run_folder(tmp_path / "runs" / "r1")
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "runs"))
    output = {"cwd": Path("."), "home": Path("~"), "root": Path("/"), "the run": run, "the run's parent": tmp_path / "runs",
              "the base": base}[where]
    with pytest.raises(SpartaError, match="--output"):
        check_replaceable(output, command="merge", inputs=[run, base], overwrite=True)


def test_merge_output_needs_overwrite_and_replaces_only_an_earlier_merge(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(SpartaError, match="pass --overwrite"):
        check_replaceable(out, command="merge", inputs=[], overwrite=False)
    with pytest.raises(SpartaError, match="not the output of an earlier `sparta merge`"):
        check_replaceable(out, command="merge", inputs=[], overwrite=True)
    (out / "thesis.tex").unlink()
    (out / "merge_report.json").write_text("{}")
    check_replaceable(out, command="merge", inputs=[], overwrite=True)


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from sparta_cli.outputs import lock_run_dir
lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_on_one_run_folder_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SpartaError, match=f"in use by another sparta process \\(PID {holder.pid}\\)"):
            check_output_dir(run, overwrite=False, resume=True)
        with pytest.raises(SpartaError, match=f"PID {holder.pid}"):
            lock_run_dir(run)
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs, the kernel drops the lock
        holder.wait()
    deadline = time.time() + 10
    while True:
        try:
            lock_run_dir(run)
            break
        except SpartaError:
            assert time.time() < deadline, "the lock outlived its process"
            time.sleep(0.1)
    release_run_dir(run)


def test_merge_with_overflowing_weights_writes_nothing(tmp_path, minilm_path):
    from sparta_cli.merge import merge_runs

    base = save_tiny_llama(tmp_path / "llama", minilm_path)
    run = make_run(tmp_path / "run", str(base))
    with pytest.raises(SpartaError, match="not finite.*smaller --weights.*nothing was written"):
        merge_runs([run], output=tmp_path / "merged", weights="1e300")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- full disks and read-only places


@pytest.fixture
def tmpfs(tmp_path):
    """A real 64 KiB tmpfs (needs root, which CI's container has): the kernel's own ENOSPC and EROFS."""
    mounts: list[Path] = []

    def mount(name: str, *options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=64k", *options]), "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the injected-error tests below still run")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


def test_a_full_disk_is_one_line_and_the_previous_file_survives(tmpfs):
    disk = tmpfs("disk")
    write_text(disk / "report.csv", "previous,good\n")
    (disk / "filler").write_bytes(b"x" * 60_000)
    with pytest.raises(SpartaError, match=f"no space left on the device while writing {disk / 'report.csv'}"):
        write_text(disk / "report.csv", "y" * 20_000)
    assert (disk / "report.csv").read_text() == "previous,good\n"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "report.csv"]  # no temporary left behind


def test_a_read_only_place_is_one_line_even_for_root(tmpfs, tmp_path, minilm_path, monkeypatch, capsys):
    from sparta_cli import cli

    read_only = tmpfs("ro", "ro")
    run = make_run(tmp_path / "runs" / "r", minilm_path)
    monkeypatch.setattr(sys, "argv", ["sparta", "report", str(run), "--output", str(read_only / "report")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write to {read_only / 'report'}: the file system is read-only"), err


@pytest.mark.parametrize("failure,phrase", [
    (OSError(28, "No space left on device", "/data/x"), "no space left on the device while writing /data/x"),
    (OSError(30, "Read-only file system", "/data/x"), "cannot write to /data/x: the file system is read-only"),
    (OSError(13, "Permission denied", "/data/x"), "no permission to write /data/x"),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"),
     "no space left on the device"),
])
def test_any_write_error_from_any_library_is_one_line(failure, phrase, tmp_path, minilm_path, monkeypatch, capsys):
    """The CLI's last line of defence maps a full disk or an unwritable place, whoever raised it."""
    from sparta_cli import cli, report

    def fails(*args, **kwargs):
        raise failure

    run = make_run(tmp_path / "runs" / "r", minilm_path)
    monkeypatch.setattr(report, "to_csv", fails)
    monkeypatch.setattr(sys, "argv", ["sparta", "report", str(run), "--output", str(tmp_path / "report")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and phrase in err and err.count("\n") == 1 and "rerun with --debug" not in err, err
    assert exited.value.code in (1, 2)


def test_merge_on_a_full_disk_keeps_the_previous_merge(tmp_path, minilm_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError text: one line, and the earlier output is untouched."""
    import safetensors.torch

    from sparta_cli.merge import merge_runs

    base = save_tiny_llama(tmp_path / "llama", minilm_path)
    run = make_run(tmp_path / "run", str(base))
    merge_runs([run], output=tmp_path / "merged")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "merged").iterdir()}

    def full(*args, **kwargs):
        from safetensors import SafetensorError

        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(SpartaError, match="no space left on the device"):
        merge_runs([run], output=tmp_path / "merged", overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "merged").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_checkpoints_written_by_save_pretrained_get_ordinary_permissions(tmp_path, minilm_path):
    # transformers writes model.safetensors 0600: a full run or a merge shared with a group was unreadable there
    from sparta_cli.merge import merge_runs

    old = os.umask(0o022)
    try:
        full = make_run(tmp_path / "full", minilm_path, method="full")
        merge_runs([make_run(tmp_path / "sparta", minilm_path)], output=tmp_path / "merged")
    finally:
        os.umask(old)
    for path in (full / "model.safetensors", tmp_path / "merged" / "model.safetensors"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


def test_replace_dir_sets_permissions_only_on_its_own_files(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_text("theirs")
    outside.chmod(0o600)

    def build(tmp: Path) -> None:
        (tmp / "weights.bin").write_text("ours")
        (tmp / "weights.bin").chmod(0o600)
        os.symlink(outside, tmp / "link.bin")

    old = os.umask(0o022)
    try:
        replace_dir(build, tmp_path / "out")
    finally:
        os.umask(old)
    assert oct((tmp_path / "out" / "weights.bin").stat().st_mode & 0o777) == oct(0o644)
    assert oct(outside.stat().st_mode & 0o777) == oct(0o600)  # a link is never followed


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path):
    """The PID was written through a `.sparta.lock` link into the file it named, outside the run folder."""
    from sparta_cli.outputs import LOCK_FILE, check_not_locked, lock_run_dir

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).symlink_to(victim)
    for check in (check_not_locked, lock_run_dir):
        with pytest.raises(SpartaError, match=r"\.sparta\.lock is a link: sparta never writes through a link .*remove the link"):
            check(run)
    assert victim.read_text() == "precious"


def test_a_users_hidden_old_and_tmp_files_are_not_a_killed_writers_leftovers(tmp_path):
    """`.res.json.old` was moved onto res.json (as replace_dir's previous output) and `.res.json.tmp` deleted."""
    from sparta_cli.fileio import sweep_leftovers, write_json

    (tmp_path / ".res.json.old").write_text("my backup")
    (tmp_path / ".res.json.tmp").write_text("my notes")
    write_json(tmp_path / "res.json", {"metrics": {}})
    assert sweep_leftovers(tmp_path) == []
    assert (tmp_path / ".res.json.old").read_text() == "my backup" and (tmp_path / ".res.json.tmp").read_text() == "my notes"
    assert json.loads((tmp_path / "res.json").read_text()) == {"metrics": {}}
