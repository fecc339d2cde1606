"""The training loop's boundaries: the placement behind which checkpoint I/O and weight writes go
(the FSDP2 one is tested end to end in test_fsdp_train.py), and a run that releases what it
acquired (the run folder's lock, the trackers) however it ends."""

from __future__ import annotations

import ast
import fcntl
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_model

from sparta_cli.config import build_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.outputs import LOCK_FILE
from sparta_cli.placement import Placement, place
from sparta_cli.tuners import apply_adapter
from sparta_cli.tuners.sparta.config import SpartaConfig

PACKAGE = Path(__file__).resolve().parents[1] / "sparta_cli"


def _placed(seed: int = 0):
    from accelerate import Accelerator

    model = tiny_model("llama", seed=seed)
    adapter = apply_adapter(model, SpartaConfig(density=0.2, targets=["q", "v"]), seed=0, head_modules=["score"])
    placement = place(adapter, Accelerator(cpu=True), "none")
    optimizer = torch.optim.AdamW([p for _, p in adapter.trainable()], lr=1e-2)
    adapter.sparta.write_after_steps_of(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return adapter, placement, optimizer, scheduler


def _logits(adapter) -> torch.Tensor:
    with torch.no_grad():
        return adapter.model(**tiny_batch()).logits


def test_the_local_placement_restores_a_checkpoint_with_the_weights_written(tmp_path):
    from sparta_cli.checkpoint import TrainerState

    adapter, placement, optimizer, scheduler = _placed()
    assert type(placement) is Placement
    trainable = dict(adapter.trainable())
    batch = tiny_batch()
    for _ in range(2):
        adapter.model(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
        placement.clip_grad_norm_(list(trainable.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    trained = _logits(adapter)
    best = {name: t.detach().clone() for name, t in trainable.items()}
    path = placement.save_checkpoint(tmp_path, TrainerState(step=2), trainable, optimizer, scheduler, None, {"seed": 0}, best,
                                     adapter.sparta.mask_digests())

    fresh, fresh_placement, fresh_optimizer, fresh_scheduler = _placed()
    assert not torch.equal(_logits(fresh), trained)
    fresh_trainable = dict(fresh.trainable())
    state = fresh_placement.load_checkpoint(path, fresh_trainable, fresh_optimizer, fresh_scheduler, fresh.sparta.mask_digests())
    assert state.step == 2
    assert torch.equal(_logits(fresh), trained)  # the deltas loaded and the dense weights hold W0 + delta again
    assert all(layer.weight_is_written() for layer in fresh.sparta.layers.values())
    kept = fresh_placement.load_best(path, fresh_trainable)
    assert kept.keys() == best.keys() and all(torch.equal(kept[name], best[name]) for name in best)
    assert fresh_placement.adapter_tensors() is None  # the adapter reads its own tensors
    fresh_placement.check_in_sync(fresh_trainable)  # one process: nothing to compare


def test_train_py_never_branches_on_sharding():
    """Where the model lives is the placement's business: no `sharded` name, no sharding import in the loop."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in names | attributes if "sharded" in name.lower()}
    assert "sparta_cli.sharding" not in imported


@pytest.mark.parametrize("module", ["evaluate_cmd.py", "predict.py", "tune/worker.py", "tune/run.py"])
def test_eval_predict_and_tune_get_interrupted_and_mixed_precision_without_the_training_loop(module):
    tree = ast.parse((PACKAGE / module).read_text())
    from_train = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "sparta_cli.train"
                  for alias in node.names}
    assert from_train <= {"train"}  # only the loop itself, where a command trains


def _locked(run_dir: Path) -> bool:
    """Whether some open file holds the run folder's lock (this process's own included)."""
    with open(run_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def _recipe(model_dir: Path, data_dir: Path, out: Path, **training):
    return build_recipe({
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"density": 0.1, "targets": ["v", "o"]},
        "task": {"name": "sst2"},
        "data": {"dir": str(data_dir), "max_length": 16, "max_train_samples": 16, "max_eval_samples": 8},
        "training": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "log_every": 2, **training},
        "logging": {"tensorboard": True},
        "seed": 3,
        "output_dir": str(out),
    })


def test_a_failing_run_releases_the_run_folder_and_closes_its_trackers(tmp_path, tiny_bert_nodropout_dir, data_dir, monkeypatch):
    from accelerate import Accelerator

    from sparta_cli.train import train

    ended = []
    end_training = Accelerator.end_training
    monkeypatch.setattr(Accelerator, "end_training", lambda self: (ended.append(True), end_training(self)))
    held = []

    def on_evaluate(step, metrics):
        held.append(_locked(out))
        raise RuntimeError("the caller stops it")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the caller stops it"):
        train(_recipe(tiny_bert_nodropout_dir, data_dir, out), on_evaluate=on_evaluate)
    assert held == [True] and not _locked(out)  # held while it ran, released by the run that took it
    assert ended == [True] and (out / "tensorboard").is_dir()


def test_a_run_refused_after_taking_the_run_folder_releases_it(tmp_path, tiny_bert_nodropout_dir, data_dir):
    from sparta_cli.train import train

    out = tmp_path / "run"
    train(_recipe(tiny_bert_nodropout_dir, data_dir, out, save_every=2))
    (out / "all_results.json").unlink()  # as if killed in the final evaluation: resumable from checkpoint-4
    with pytest.raises(SpartaError, match=r"training.lr: .* there, 0.5 now"):
        train(_recipe(tiny_bert_nodropout_dir, data_dir, out, save_every=2, lr=0.5), resume=True)
    assert not _locked(out)
