"""Small things a newcomer reaches for: --version, -h, GLUE's `dev` split name, MMLU subsets and
prompt lengths, and library warnings kept out of the output."""

from __future__ import annotations

import warnings

import pytest
from conftest import REPO
from typer.testing import CliRunner

from sparta_cli import __version__
from sparta_cli.cli import app
from sparta_cli.config import MMLU_MAX_LENGTH, MMLU_MAX_LENGTH_SHOTS, TaskConfig, build_recipe, load_recipe
from sparta_cli.data import subsample
from sparta_cli.tasks import load_split, resolve_task

RECIPE = REPO / "configs" / "quickstart.yaml"


def test_version_and_short_help():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sparta {__version__}"
    for args in (["-h"], ["train", "-h"], ["report", "-h"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0 and result.output.startswith("Usage:"), (args, result.output)


@pytest.mark.parametrize(("task", "dev", "split"), [("sst2", "dev", "validation"), ("mnli", "dev_mismatched", "validation_mismatched"),
                                                     ("mnli", "dev", "validation_matched")])
def test_dev_is_an_alias_of_glues_validation_split(task, dev, split, data_dir):
    from sparta_cli.tasks import canonical_split as _canonical_split

    assert _canonical_split(resolve_task(TaskConfig(name=task)), dev) == split


def test_glue_dev_split_reads_dev_tsv(data_dir):
    task_cfg = TaskConfig(name="sst2")
    assert len(load_split(resolve_task(task_cfg), task_cfg, "dev", data_dir)) == 872


def test_an_mmlu_subset_spans_the_subjects(data_dir):
    """57 rows unshuffled: one per subject, not 57 rows of the first two subjects."""
    task_cfg = TaskConfig(name="mmlu")
    rows = load_split(resolve_task(task_cfg), task_cfg, "validation", data_dir)
    picked = subsample(rows, 57, None)["subject"]
    assert len(set(picked)) == 57
    assert len(set(subsample(rows, 114, None)["subject"])) == 57


def test_mmlu_default_max_length_fits_its_prompts():
    assert load_recipe(RECIPE, ["task.name=mmlu"]).data.max_length == 64  # the recipe's own value is kept
    plain = {"model": {"name_or_path": "x"}, "task": {"name": "MMLU"}}
    assert build_recipe(plain).data.max_length == MMLU_MAX_LENGTH
    assert build_recipe(plain, ["task.head=lm", "task.shots=5"]).data.max_length == MMLU_MAX_LENGTH_SHOTS
    assert build_recipe(plain, ["data.max_length=256"]).data.max_length == 256
    assert build_recipe({**plain, "task": {"name": "sst2"}}).data.max_length == 128


def test_a_default_max_length_is_lowered_to_the_models_positions_a_chosen_one_refused(tmp_path, data_dir, capsys):
    """MMLU's 5-shot default (3,072) on a model with a 64-position table: preflight, on the config alone,
    lowers it to 64 and says so; the same length set by the user is refused with the fix."""
    from transformers import BertConfig

    from sparta_cli.errors import SpartaError
    from sparta_cli.preflight import preflight

    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=64).save_pretrained(tmp_path)  # config.json alone: preflight loads no weights
    plain = {"model": {"name_or_path": str(tmp_path)}, "task": {"name": "mmlu", "head": "lm", "shots": 5},
             "data": {"dir": str(data_dir)}}
    recipe = build_recipe(plain)
    preflight(recipe, targets=False)
    assert recipe.data.max_length == 64
    assert f"data.max_length: {MMLU_MAX_LENGTH_SHOTS} (the default for this task) lowered to 64" in capsys.readouterr().out
    chosen = build_recipe(plain, [f"data.max_length={MMLU_MAX_LENGTH_SHOTS}"])
    with pytest.raises(SpartaError, match=f"data.max_length={MMLU_MAX_LENGTH_SHOTS} is longer than the 64 positions .* "
                                          "set data.max_length=64 or less"):
        preflight(chosen, targets=False)


def test_library_warnings_stay_out_unless_debug():
    from sparta_cli.console import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.warn_explicit("a note to developers", category, "transformers/x.py", 1, module="transformers.x")
    assert caught == []
    import logging  # offline, huggingface_hub logged each of its retries before sparta's one-line error

    assert logging.getLogger("huggingface_hub").getEffectiveLevel() == logging.ERROR
