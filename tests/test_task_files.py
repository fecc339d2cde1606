"""Reading people's data files (issue 25): what is no regular file is named and never read, long CSV
fields are data, a label is a class number only when it is a plain integer, a file sparta cannot
read is one line with the fix, and a tokenization cache that fails its checksum is rebuilt."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from sparta_cli.config import TaskConfig, build_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.tasks import load_split, resolve_task
from sparta_cli.tasks.files import read_text, sorted_labels


def one_line(call, *names: str) -> str:
    with pytest.raises(SpartaError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in names), message
    return message


def custom_cfg(path: Path, kind: str = "classification") -> TaskConfig:
    return TaskConfig(type=kind, train_file=str(path), text_fields=["text"])


# ---------------------------------------------------------------- not a regular file


def test_a_fifo_as_a_data_file_is_named_and_never_opened(tmp_path):
    fifo = tmp_path / "train.csv"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    one_line(lambda: resolve_task(custom_cfg(fifo)), "task.train_file", str(fifo), "FIFO", "not a regular file")
    # swapped in after the check: read without blocking and refused
    one_line(lambda: read_text(fifo), str(fifo), "FIFO")


def test_a_character_device_as_a_data_file_is_named(tmp_path):
    cfg = custom_cfg(Path("/dev/zero"))  # reading it never ends
    message = one_line(lambda: resolve_task(cfg), "/dev/zero", "character device")
    assert "not found" not in message and "does not exist" not in message
    one_line(lambda: read_text(Path("/dev/null")), "/dev/null", "character device")


def test_a_folder_as_a_data_file_is_called_a_folder(tmp_path):
    one_line(lambda: resolve_task(custom_cfg(tmp_path)), "task.train_file", "is a folder")


def test_a_fifo_in_the_data_dir_is_named(tmp_path):
    (tmp_path / "SST-2").mkdir()
    os.mkfifo(tmp_path / "SST-2" / "dev.tsv")
    cfg = TaskConfig(name="sst2")
    one_line(lambda: load_split(resolve_task(cfg), cfg, "validation", tmp_path), "dev.tsv", "FIFO")


def test_predict_file_that_is_a_fifo_is_named(tmp_path):
    from sparta_cli.predict import file_task

    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    task = resolve_task(TaskConfig(name="sst2"))
    message = one_line(lambda: file_task(task, fifo), "--file", "FIFO")
    assert "does not exist" not in message
    one_line(lambda: file_task(task, tmp_path / "nope.csv"), "--file", "does not exist")


# ---------------------------------------------------------------- long fields


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_field_longer_than_pythons_csv_limit_is_read_whole(tmp_path, suffix):
    long_text = "word " * 60_000  # 300,000 characters: over csv's 131,072 default
    sep = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"train{suffix}"
    path.write_text(f"text{sep}label\n{long_text}{sep}pos\nshort{sep}neg\n", encoding="utf-8")
    cfg = custom_cfg(path)
    task = resolve_task(cfg)
    rows = load_split(task, cfg, "train", None)
    assert rows["text"] == [long_text, "short"] and task.label_names == ("neg", "pos")


# ---------------------------------------------------------------- labels


def test_only_plain_integers_are_class_numbers():
    assert sorted_labels({"10", "2", "-1"}) == ("-1", "2", "10")  # numbers: numeric order
    # not plain integers, so names in text order, whatever int() or str.isdigit() make of them
    assert sorted_labels({"10", "٣"}) == ("10", "٣")  # int("٣") == 3 would put it first
    assert sorted_labels({"0", "1", "²"}) == ("0", "1", "²")  # "²".isdigit(), but int("²") raises
    assert sorted_labels({"0", "--1"}) == ("--1", "0")
    assert sorted_labels({"2", "1e3"}) == ("1e3", "2")


def test_numeric_looking_labels_are_label_names(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,1.0\nb,1e3\nc, 2\nd,٣\ne,²\nf,1\n", encoding="utf-8")
    cfg = custom_cfg(path)
    task = resolve_task(cfg)
    assert task.label_names == ("1", "1e3", "2", "²", "٣")  # "1.0" is "1"; " 2" is "2"
    assert load_split(task, cfg, "train", None)["label"] == [0, 1, 2, 4, 3, 0]


def test_a_regression_label_is_a_finite_ascii_number(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,1e3\nb,-2.5\nc,.5\n", encoding="utf-8")
    cfg = custom_cfg(path, "regression")
    assert load_split(resolve_task(cfg), cfg, "train", None)["label"] == [1000.0, -2.5, 0.5]
    for bad, line in (("nan", 3), ("inf", 3), ("٣", 3), ("1_0", 3)):
        path.write_text(f"text,label\na,1\nb,{bad}\n", encoding="utf-8")
        one_line(lambda: load_split(resolve_task(cfg), cfg, "train", None), str(path), f"line {line}", bad)


# ---------------------------------------------------------------- unreadable files


def test_utf16_file_says_to_resave_as_utf8(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\na,pos\nb,neg\n".encode("utf-16"))
    one_line(lambda: resolve_task(custom_cfg(path)), str(path), "UTF-16", "re-save the file as UTF-8")


def test_latin1_file_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes('{"text": "a", "label": 1}\n{"text": "caf\xe9", "label": 0}\n'.encode("latin-1"))
    one_line(lambda: resolve_task(custom_cfg(path)), str(path), "not UTF-8", "line 2", "re-save the file as UTF-8")


def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,pos\nb,neg\n", encoding="utf-8")

    def denied(*args, **kwargs):  # chmod 000 does not stop root, who runs CI here
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", denied)
    one_line(lambda: resolve_task(custom_cfg(path)), str(path), "permission denied", "chmod")


def test_a_name_longer_than_the_file_system_allows(tmp_path):
    path = tmp_path / ("x" * 300 + ".csv")
    one_line(lambda: resolve_task(custom_cfg(path)), "longer than the file system allows")


# ---------------------------------------------------------------- tokenization cache


def _cached_text_task(tmp_path, minilm_path, monkeypatch):
    """(task, tokenizer, recipe) of a 20-row text file, tokenized into a cache of the test's own."""
    from sparta_cli.models import load_tokenizer

    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"text number {i}", "label": i % 2}) + "\n" for i in range(20)))
    recipe = build_recipe({"model": {"name_or_path": minilm_path},
                           "task": {"type": "classification", "train_file": str(train), "text_fields": ["text"]}})
    return resolve_task(recipe.task), load_tokenizer(recipe.model), recipe


def test_two_runs_tokenizing_one_split_at_once_share_the_entry(tmp_path, minilm_path, monkeypatch, capsys):
    """Two table runs started together once failed: the second swept the first's temporary folder as a
    killed writer's leftover ("cannot write .../tokenized/<key>: No such file or directory")."""
    import threading

    from datasets import Dataset

    from sparta_cli import data

    task, tokenizer, recipe = _cached_text_task(tmp_path, minilm_path, monkeypatch)
    first_is_writing, second_waits, encodes = threading.Event(), threading.Event(), []
    save, encode, say_waiting = Dataset.save_to_disk, data._encode_split, data._say_waiting

    def slow_save(self, path, **kwargs):
        if threading.current_thread().name == "first":
            first_is_writing.set()
            second_waits.wait(timeout=60)  # without the lock the second run sweeps our folder meanwhile
        return save(self, path, **kwargs)

    def counted_encode(*args):
        encodes.append(threading.current_thread().name)
        return encode(*args)

    def waiting(*args):
        say_waiting(*args)
        second_waits.set()

    monkeypatch.setattr(Dataset, "save_to_disk", slow_save)
    monkeypatch.setattr(data, "_encode_split", counted_encode)
    monkeypatch.setattr(data, "_say_waiting", waiting)
    results, failures = {}, []

    def run():
        try:
            results[threading.current_thread().name] = data.tokenize_split(task, "train", tokenizer, recipe).dataset["input_ids"]
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, name="first")]
    threads[0].start()
    assert first_is_writing.wait(timeout=60)
    threads.append(threading.Thread(target=run, name="second"))
    threads[1].start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert encodes == ["first"] and results["first"] == results["second"]
    assert "another sparta process is tokenizing this split" in capsys.readouterr().out
    assert [entry.name for entry in data.cache_root().iterdir()] == [next(data.cache_root().iterdir()).name]


def test_a_cache_entry_that_fails_its_checksum_is_rebuilt(tmp_path, minilm_path, monkeypatch, capsys):
    from sparta_cli.data import cache_root, tokenize_split

    task, tokenizer, recipe = _cached_text_task(tmp_path, minilm_path, monkeypatch)
    first = [list(ids) for ids in tokenize_split(task, "train", tokenizer, recipe).dataset["input_ids"]]
    (entry,) = list(cache_root().iterdir())
    recorded = json.loads((entry / "stats.json").read_text())["sha256"]
    (arrow,) = [name for name in recorded if name.endswith(".arrow")]
    # bit rot: same size, same row count, one byte of the token ids changed
    data = bytearray((entry / "data" / arrow).read_bytes())
    first_ids = data.find((first[0][1]).to_bytes(4, "little"))
    assert first_ids > 0
    data[first_ids] ^= 0x01
    (entry / "data" / arrow).write_bytes(bytes(data))
    capsys.readouterr()
    again = tokenize_split(task, "train", tokenizer, recipe)
    out = capsys.readouterr().out
    assert "is damaged" in out and "checksum" in out and len(out.strip().splitlines()) == 1, out
    assert [list(ids) for ids in again.dataset["input_ids"]] == first
    capsys.readouterr()
    tokenize_split(task, "train", tokenizer, recipe)  # the rebuilt entry passes its check
    assert "damaged" not in capsys.readouterr().out
