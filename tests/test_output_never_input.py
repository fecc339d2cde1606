"""An output may never be an input (issue 25): every command that writes refuses an output path that
resolves, links followed, to a file it reads or into a folder it reads (a run, a model), `--overwrite`
or not, and nothing it reads changes. One rule, outputs.check_not_an_input; here it is hooked into
each command. The runs are tests/fixtures/runs (their base, `tiny-bert`, relative to the current
folder: every refusal happens before a model would load)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, import_or_require
from typer.testing import CliRunner

from sparta_cli.cli import app
from sparta_cli.errors import SpartaError
from sparta_cli.outputs import check_not_an_input

FIXTURES = REPO / "tests" / "fixtures" / "runs"
ROWS = "sentence\tlabel\na fine film\t1\na dull one\t0\n"


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """The current folder: the SpaRTA fixture run, a model folder and a data file of the user's."""
    shutil.copytree(FIXTURES / "sparta-run", tmp_path / "run")
    (tmp_path / "tiny-bert").mkdir()
    (tmp_path / "tiny-bert" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "rows.tsv").write_text(ROWS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(*args: str, says: str) -> None:
    """The CLI in this process: the refusal comes back as `result.exception` (the console script exits 2 with it)."""
    result = CliRunner().invoke(app, list(args))
    assert isinstance(result.exception, SpartaError), result.output
    assert says in str(result.exception) and "never writes over what it reads" in str(result.exception)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("output, relation", [("rows.tsv", "is"), ("link.tsv", "is"), ("hard.tsv", "is"),
                                              ("run/adapter_model.safetensors", "is inside"), ("run-link/new.json", "is inside"),
                                              ("tiny-bert/out.tsv", "is inside")])
def test_an_output_that_resolves_to_an_input_or_into_an_input_folder_is_refused(here, output, relation):
    (here / "link.tsv").symlink_to(here / "rows.tsv")
    (here / "hard.tsv").hardlink_to(here / "rows.tsv")
    (here / "run-link").symlink_to(here / "run")
    with pytest.raises(SpartaError, match=f"{relation} the input .*never writes over what it reads; choose"):
        check_not_an_input(Path(output), [Path("rows.tsv"), Path("run"), here / "tiny-bert"])


def test_beside_an_input_is_allowed_and_holding_one_only_for_folders_replaced_whole(here):
    check_not_an_input(Path("predictions.tsv"), [Path("rows.tsv"), Path("run")])
    check_not_an_input(here, [Path("run")])  # a report folder may hold the runs it reports
    with pytest.raises(SpartaError, match="holds the input run"):
        check_not_an_input(here, [Path("run")], replaces_whole=True)


# ---------------------------------------------------------------- each command


@pytest.mark.parametrize("output", ["rows.tsv", "link.tsv", "run/adapter_model.safetensors", "run-link/adapter_model.safetensors"])
def test_predict_never_replaces_the_file_it_reads_nor_a_file_of_its_run(here, output):
    (here / "link.tsv").symlink_to(here / "rows.tsv")
    (here / "run-link").symlink_to(here / "run")
    before, rows = snapshot(here / "run"), (here / "rows.tsv").read_bytes()
    refused("predict", "run", "--file", "rows.tsv", "--output", output, "--overwrite", says="the input")
    assert snapshot(here / "run") == before and (here / "rows.tsv").read_bytes() == rows


def test_predict_never_writes_into_the_base_model_folder(here):
    refused("predict", "run", "--file", "rows.tsv", "--output", "tiny-bert/predictions.tsv", says="is inside the input")
    assert sorted(p.name for p in (here / "tiny-bert").iterdir()) == ["config.json"]


@pytest.mark.parametrize(("output", "says"), [("run/completions.jsonl", "is inside the input run"), ("prompts.jsonl", "is the input prompts.jsonl"),
                                            ("tiny-bert/out.jsonl", "is inside the input tiny-bert")])
def test_generate_never_writes_over_its_prompts_nor_into_its_model(here, output, says):
    (here / "prompts.jsonl").write_text('{"prompt": "Hi"}\n')
    target = "tiny-bert" if output.startswith("tiny-bert") else "run"
    before = snapshot(here / "run"), (here / "prompts.jsonl").read_bytes()
    refused("generate", target, "--file", "prompts.jsonl", "--output", output, "--overwrite", says=says)
    assert (snapshot(here / "run"), (here / "prompts.jsonl").read_bytes()) == before


@pytest.mark.parametrize("output", ["run/adapter_config.json", "scores.json"])
def test_eval_output_never_goes_into_the_run_it_scores(here, output):
    (here / "scores.json").symlink_to(here / "run" / "eval_results.json")  # an earlier result's name, linked into the run
    before = snapshot(here / "run")
    refused("eval", "run", "--output", output, says="is inside the input run")
    assert snapshot(here / "run") == before


@pytest.mark.parametrize("output", ["run", "run-link", "run/report"])
def test_report_output_never_goes_into_a_run_it_reports(here, output):
    (here / "run-link").symlink_to(here / "run")
    before = snapshot(here / "run")
    refused("report", "run", "--output", output, says="the input")
    assert snapshot(here / "run") == before


def test_merge_output_never_goes_into_its_run(here):
    before = snapshot(here / "run")
    refused("merge", "run", "--output", "run/merged", says="is inside the input run")
    assert snapshot(here / "run") == before


def test_export_and_merge_outputs_never_go_into_the_runs_base(here):
    """Export listed only the run as its input: an output inside the base's folder was written there."""
    for command in (["export", "run", "--format", "sparta"], ["merge", "run"]):
        refused(*command, "--output", "tiny-bert/adapter", says="is inside the input tiny-bert")
    assert sorted(p.name for p in (here / "tiny-bert").iterdir()) == ["config.json"]


def tune_recipe(here: Path) -> Path:
    recipe = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    recipe["model"]["name_or_path"] = str(here / "tiny-bert")
    recipe["data"]["validation_size"] = 0.1
    path = here / "study" / "recipe.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("output, says", [("study", "holds the input"), ("model-link", "is the input")])
def test_tune_study_folder_never_holds_its_recipe_nor_is_its_model(here, output, says):
    import_or_require("optuna")
    recipe = tune_recipe(here)
    (here / "model-link").symlink_to(here / "tiny-bert")
    text = recipe.read_text()
    refused("tune", str(recipe), "--output", output, says=says)
    assert recipe.read_text() == text and sorted(p.name for p in recipe.parent.iterdir()) == ["recipe.yaml"]
    assert sorted(p.name for p in (here / "tiny-bert").iterdir()) == ["config.json"]
