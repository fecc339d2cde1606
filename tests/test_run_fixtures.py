"""Run folders written by an earlier sparta (commit ce17928, tests/fixtures/make_runs.sh) still
evaluate, merge, export and resume: the folder layout is a format, and the reader must keep reading it.

Each fixture's base is the tiny random BERT of conftest.save_tiny_bert (seed 0), rebuilt at the
relative path `tiny-bert` the runs recorded; expected_logits.json holds what that sparta's loader
gave on three sentences."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, save_tiny_bert
from typer.testing import CliRunner

from sparta_cli.cli import app
from sparta_cli.config import ModelConfig
from sparta_cli.fileio import read_json
from sparta_cli.models import load_for_classification
from sparta_cli.runs import read_adapter_config
from sparta_cli.tuners import load_adapter

FIXTURES = REPO / "tests" / "fixtures" / "runs"
EXPECTED = json.loads((FIXTURES / "expected_logits.json").read_text(encoding="utf-8"))


@pytest.fixture
def here(tmp_path, monkeypatch, data_dir) -> Path:
    """A folder holding copies of the fixture runs and their base, as the current folder."""
    for entry in FIXTURES.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, tmp_path / entry.name)
    save_tiny_bert(tmp_path / "tiny-bert", dropout=0.0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARTA_DATA_DIR", str(data_dir))
    return tmp_path


def sparta(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def batch() -> dict:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained("tiny-bert")(EXPECTED["texts"], padding=True, return_tensors="pt"))


@torch.no_grad()
def adapter_logits(run_dir: Path) -> torch.Tensor:
    config = read_adapter_config(run_dir)
    loaded = load_for_classification(ModelConfig(name_or_path="tiny-bert"), 2, config["task"]["label_names"])
    for name in config["head_modules"]:
        loaded.model.get_submodule(name).float()
    return load_adapter(run_dir, loaded.model, config).model.eval()(**batch()).logits


@torch.no_grad()
def checkpoint_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()(**batch()).logits


@pytest.mark.parametrize("run", ["sparta-run", "lora-run"])
def test_an_old_run_loads_and_evaluates_as_it_did(here, run):
    expected = torch.tensor(EXPECTED[run])
    torch.testing.assert_close(adapter_logits(here / run), expected, rtol=0, atol=1e-6)
    base = load_for_classification(ModelConfig(name_or_path="tiny-bert"), 2, ["negative", "positive"]).model.eval()
    with torch.no_grad():  # the adapter is what makes these logits (the test can fail): an untrained head is far off
        assert (base(**batch()).logits - expected).abs().max() > 1e-2
    sparta("eval", run, "--output", "scores.json", "data.max_eval_samples=16")
    trained = read_json(here / run / "all_results.json")
    assert read_json(here / "scores.json")["metrics"]["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("run", ["sparta-run", "lora-run"])
def test_an_old_run_merges_into_a_checkpoint_with_its_logits(here, run):
    sparta("merge", run, "--output", "merged")
    torch.testing.assert_close(checkpoint_logits(here / "merged"), torch.tensor(EXPECTED[run]), rtol=0, atol=1e-5)


def test_an_old_run_exports(here):
    sparta("export", "sparta-run", "--format", "sparta", "--output", "exported")
    torch.testing.assert_close(adapter_logits(here / "exported"), torch.tensor(EXPECTED["sparta-run"]), rtol=0, atol=1e-6)
    sparta("export", "lora-run", "--format", "peft", "--output", "lora-peft")
    assert (here / "lora-peft" / "adapter_model.safetensors").is_file()


def test_an_old_checkpoint_resumes_to_the_uninterrupted_result(here):
    """sparta-resume is sparta-run stopped after its step-2 checkpoint: resumed, it ends where sparta-run ended."""
    sparta("train", "sparta-resume/config.yaml", "--resume", "output_dir=sparta-resume")
    resumed, uninterrupted = read_json(here / "sparta-resume" / "all_results.json"), read_json(here / "sparta-run" / "all_results.json")
    for key in ("train_loss", "eval_loss"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6), key
    torch.testing.assert_close(adapter_logits(here / "sparta-resume"), torch.tensor(EXPECTED["sparta-run"]), rtol=0, atol=1e-6)
