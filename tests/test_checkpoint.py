"""Checkpoints without pickle (issue 11) that record the SpaRTA masks they trained (issue 12, bug 4)."""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sparta_cli.checkpoint import (
    MASKS_FILE,
    STATE_FILE,
    TENSORS_FILE,
    TrainerState,
    load_checkpoint,
    read_checkpoint,
    rng_file,
    save_checkpoint,
    usable_checkpoint,
)
from sparta_cli.errors import SpartaError

PACKAGE = Path(__file__).resolve().parents[1] / "sparta_cli"


class OneProcess:
    is_main_process = True
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass


def _training(steps: int = 3):
    torch.manual_seed(0)
    params = {"delta": torch.nn.Parameter(torch.randn(5)), "head": torch.nn.Parameter(torch.randn(2, 3))}
    optimizer = torch.optim.AdamW(params.values(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(steps):
        (params["delta"].square().sum() + params["head"].sum()).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return params, optimizer, scheduler


def _save(run: Path, step: int, masks=None) -> Path:
    params, optimizer, scheduler = _training(step)
    return save_checkpoint(run, TrainerState(step=step), params, optimizer, scheduler, OneProcess(), None, {"seed": 1},
                           masks=masks if masks is not None else {"layer.0.v": "abc"})


def test_a_checkpoint_restores_optimizer_scheduler_and_every_rng_exactly(tmp_path):
    params, optimizer, scheduler = _training()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, TrainerState(step=3, loss_sum=1.5), params, optimizer, scheduler, OneProcess(), None, {}, masks={})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["masks.json", "optimizer.json", "optimizer.safetensors", "recipe.json", rng_file(0), "scheduler.json", STATE_FILE, TENSORS_FILE])

    fresh, fresh_optimizer, fresh_scheduler = _training(0)
    state = load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, OneProcess(), {})
    assert state == TrainerState(step=3, loss_sum=1.5)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    for name in params:
        assert torch.equal(fresh[name], params[name])
    ours, theirs = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for pid, values in ours["state"].items():
        for key, value in values.items():
            assert torch.equal(theirs["state"][pid][key], value), key
    assert fresh_scheduler.state_dict() == scheduler.state_dict()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # unpickling this creates a file


def test_a_malicious_pickle_in_a_checkpoint_is_refused_without_running(tmp_path):
    path = _save(tmp_path, 2)
    marker = tmp_path / "pwned"
    (path / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": _Payload(marker)}))
    assert not marker.exists()
    with pytest.raises(SpartaError, match="pickle files.*never loads"):
        read_checkpoint(path, 1)
    with pytest.raises(SpartaError, match="pickle"):
        usable_checkpoint(tmp_path, 1, warn=lambda text: None)
    assert not marker.exists()
    pickle.loads((path / "optimizer.pt").read_bytes())  # the payload is live: this is what sparta must never do
    assert marker.exists()


def test_sparta_never_unpickles():
    """No pickle module, and torch.load only with weights_only=True, anywhere in the package."""
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import pickle|from pickle)|\bpickle\.loads?\(", text, re.M), source
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{source}: {call}"


def test_resume_refuses_a_checkpoint_that_trained_other_entries(tmp_path):
    path = _save(tmp_path, 2, masks={"layer.0.v": "aaa", "layer.0.o": "bbb"})
    params, optimizer, scheduler = _training(0)
    with pytest.raises(SpartaError, match="other SpaRTA entries.*`layer.0.o`.*versions in config.yaml"):
        load_checkpoint(path, params, optimizer, scheduler, OneProcess(), {"layer.0.v": "aaa", "layer.0.o": "ccc"})
    (path / MASKS_FILE).write_text(json.dumps({"layer.0.v": "aaa"}))  # tampered: a layer dropped
    with pytest.raises(SpartaError, match="`layer.0.o`"):
        load_checkpoint(path, params, optimizer, scheduler, OneProcess(), {"layer.0.v": "aaa", "layer.0.o": "bbb"})


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    with open(newest / TENSORS_FILE, "r+b") as handle:
        handle.truncate(20)
    warnings: list[str] = []
    assert usable_checkpoint(tmp_path, 1, warnings.append) == tmp_path / "checkpoint-2"
    assert len(warnings) == 1 and str(newest / TENSORS_FILE) in warnings[0] and "truncated or corrupted" in warnings[0]


@pytest.mark.parametrize("damage,phrase", [
    (lambda p: (p / rng_file(0)).unlink(), "rng_state_0.safetensors is missing"),
    (lambda p: _edit_state(p, lambda s: s.pop("seen")), "lacks `seen`"),
    (lambda p: _edit_state(p, lambda s: s.update(extra=1)), "unknown key `extra`"),
    (lambda p: _edit_state(p, lambda s: s.update(step="ten")), "`step` = 'ten'"),
    (lambda p: (p / "optimizer.json").write_text("{"), "not valid JSON"),
    (lambda p: (p / "scheduler.json").unlink(), "scheduler.json is missing"),
])
def test_a_damaged_checkpoint_file_is_named_in_one_line(tmp_path, damage, phrase):
    path = _save(tmp_path, 2)
    damage(path)
    with pytest.raises(SpartaError, match=re.escape(phrase)):
        read_checkpoint(path, 1)


def _edit_state(path: Path, edit) -> None:
    state = json.loads((path / STATE_FILE).read_text())
    edit(state)
    (path / STATE_FILE).write_text(json.dumps(state))


def _interrupted_run(tmp_path: Path, tiny_bert_dir: Path, data_dir: Path) -> tuple[Path, list[str]]:
    """A real run with a checkpoint at every step whose final outputs are gone (as after a kill in the final evaluation)."""
    from sparta_cli.runs import ALL_RESULTS

    run = tmp_path / "run"
    args = [f"model.name_or_path={tiny_bert_dir}", f"data.dir={data_dir}", "data.max_train_samples=16", "data.max_eval_samples=8",
            "data.max_length=16", "data.cache=false", "training.max_steps=3", "training.batch_size=4", "training.save_every=1",
            f"output_dir={run}"]
    _cli(["train", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"), *args])
    for name in (ALL_RESULTS, "adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    return run, args


def _cli(args: list[str]) -> str:
    from typer.testing import CliRunner

    from sparta_cli.cli import app

    result = CliRunner().invoke(app, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.output


def test_resume_checks_the_masks_and_skips_a_damaged_newest_checkpoint(tmp_path, tiny_bert_dir, data_dir):
    from sparta_cli.checkpoint import checkpoints

    run, args = _interrupted_run(tmp_path, tiny_bert_dir, data_dir)
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    *_, previous, newest = checkpoints(run)
    masks = json.loads((newest / MASKS_FILE).read_text())
    assert masks and all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in masks.values())

    tampered = dict(masks)
    tampered[next(iter(tampered))] = "0" * 64
    (newest / MASKS_FILE).write_text(json.dumps(tampered))
    with pytest.raises(SpartaError, match=f"{newest.name} trained other SpaRTA entries"):
        _cli(["train", recipe, *args, "--resume"])

    with open(newest / TENSORS_FILE, "r+b") as handle:  # now damaged too: resume falls back to the one before
        handle.truncate(10)
    output = _cli(["train", recipe, *args, "--resume"])
    assert "skipping" in output and newest.name in output and "resuming from" in output and previous.name in output
    assert (run / "all_results.json").is_file()


def _truncate(path: Path, name: str) -> None:
    """Cut a file in the middle of its data (its header whole)."""
    size = (path / name).stat().st_size
    with open(path / name, "r+b") as handle:
        handle.truncate(size - 8)


@pytest.mark.parametrize("damage,phrase", [
    (lambda p: _truncate(p, TENSORS_FILE), f"{TENSORS_FILE} is truncated or corrupted"),
    (lambda p: _truncate(p, "optimizer.safetensors"), "optimizer.safetensors is truncated or corrupted"),
    (lambda p: _edit_state(p, lambda s: s.update(surprise=1)), f"{STATE_FILE} has an unknown key `surprise`"),
    (lambda p: (p / rng_file(0)).unlink(), f"{rng_file(0)} is missing"),
    (lambda p: (p / "recipe.json").write_text(json.dumps({"seed": 1, "adapter": 5})),
     "recipe.json: `adapter` is int, not a mapping: the checkpoint is damaged"),
])
def test_a_damaged_checkpoint_is_named_with_what_is_wrong_and_what_resume_does(tmp_path, damage, phrase):
    older = _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    damage(newest)
    warnings: list[str] = []
    assert usable_checkpoint(tmp_path, 1, warnings.append) == older
    assert len(warnings) == 1
    assert str(newest) in warnings[0] and phrase in warnings[0] and "--resume falls back past it, to checkpoint-2" in warnings[0]

    damage(older)  # no checkpoint left to fall back to: resume stops, naming the newest's damage
    warnings.clear()
    with pytest.raises(SpartaError, match="--resume stops") as raised:
        usable_checkpoint(tmp_path, 1, warnings.append)
    assert str(newest) in str(raised.value) and phrase in str(raised.value)
    assert "no older checkpoint to fall back to" in warnings[-1]


def test_a_problem_every_checkpoint_shares_stops_resume_at_the_newest(tmp_path):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    warnings: list[str] = []
    with pytest.raises(SpartaError, match=re.escape(f"{newest} was written by 1 process(es) but this run has 2: --resume stops")):
        usable_checkpoint(tmp_path, 2, warnings.append)
    assert not warnings  # no fall back to the older one: it was written by as many processes


def test_unexpected_optimizer_entries_are_named_as_damage(tmp_path):
    from safetensors.torch import save_file

    path = _save(tmp_path, 2)
    save_file({"surprise": torch.zeros(1)}, str(path / "optimizer.safetensors"))
    with pytest.raises(SpartaError, match="optimizer.safetensors or optimizer.json holds entries sparta does not write"):
        read_checkpoint(path, 1)


def test_resume_with_a_changed_recipe_names_each_key_with_its_old_and_new_value(tmp_path):
    from sparta_cli.config import load_recipe
    from sparta_cli.train import _resume_point

    recipe_path = PACKAGE.parent / "configs" / "quickstart.yaml"
    saved = load_recipe(recipe_path, [f"output_dir={tmp_path}", "training.lr=0.001", "seed=3"])
    params, optimizer, scheduler = _training(2)
    path = save_checkpoint(tmp_path, TrainerState(step=2), params, optimizer, scheduler, OneProcess(), None, saved.to_dict())
    changed = load_recipe(recipe_path, [f"output_dir={tmp_path}", "training.lr=0.002", "seed=4"])
    with pytest.raises(SpartaError) as raised:
        _resume_point(tmp_path, changed, lambda text: None)
    message = str(raised.value)
    assert str(path) in message and "--resume stops" in message
    assert "training.lr: 0.001 there, 0.002 now" in message and "seed: 3 there, 4 now" in message
    assert _resume_point(tmp_path, saved, lambda text: None) == path  # the same recipe resumes
