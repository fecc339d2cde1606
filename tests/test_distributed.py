"""Two processes (gloo, CPU) train the same adapter as one process with twice the batch;
gradient checkpointing gives the same gradients through the SpaRTA layers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import IN_CI, tiny_batch, tiny_model
from safetensors.torch import load_file

from sparta_cli.config import load_recipe
from sparta_cli.train import train
from sparta_cli.tuners import apply_adapter
from sparta_cli.tuners.sparta.config import SpartaConfig


def _recipe(tmp: Path, model_dir: Path, data_dir: Path, out: Path, batch_size: int, rows: int = 32, **training) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"density": 0.1, "targets": ["v", "o"]},
        "task": {"name": "sst2"},
        "data": {"dir": str(data_dir), "max_length": 32, "max_train_samples": rows, "max_eval_samples": 30},
        "training": {"max_steps": 8, "batch_size": batch_size, "lr": 1e-3, "log_every": 1, **training},
        "seed": 3,
        "output_dir": str(out),
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists() and not IN_CI,
                    reason="torchrun missing")  # it comes with torch: under CI it must be there
def test_two_processes_match_one_process_with_double_batch(tmp_path, tiny_bert_nodropout_dir, data_dir):
    single, double = tmp_path / "single", tmp_path / "ddp"
    # one process, trained in this one (the comparison allows float noise: its thread count may differ from torchrun's workers')
    train(load_recipe(_recipe(tmp_path, tiny_bert_nodropout_dir, data_dir, single, 8)))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "sparta_cli", "train",
                             str(_recipe(tmp_path, tiny_bert_nodropout_dir, data_dir, double, 4))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(str(single / "adapter_model.safetensors")), load_file(str(double / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".indices"):
            assert torch.equal(a[key], b[key])  # the mask depends on seed and module name only
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    config = yaml.safe_load((double / "config.yaml").read_text())
    assert config["run"]["world_size"] == 2 and config["run"]["effective_batch_size"] == 8
    # evaluation counts every example once across the two processes
    assert json.loads((double / "eval_results.json").read_text())["eval_num_examples"] == 30
    # only the main process printed
    assert result.stdout.count("done in") == 1


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists() and not IN_CI,
                    reason="torchrun missing")
def test_two_processes_match_one_process_when_the_rows_do_not_fill_the_last_batch(tmp_path, tiny_bert_nodropout_dir, data_dir):
    """20 rows in global batches of 8 leave 4 for the last: process 0 gets them, and Accelerate (even_batches)
    gives process 1 four of the epoch's first rows again so the processes stay in step. Those must weigh
    nothing: they were trained on twice and the step's gradient halved the real rows' share."""
    single, double = tmp_path / "single", tmp_path / "ddp"
    uneven = {"rows": 20, "max_steps": None, "epochs": 2, "lr": 1e-2}
    train(load_recipe(_recipe(tmp_path, tiny_bert_nodropout_dir, data_dir, single, 8, **uneven)))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29534", "-m", "sparta_cli", "train",
                             str(_recipe(tmp_path, tiny_bert_nodropout_dir, data_dir, double, 4, **uneven))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(str(single / "adapter_model.safetensors")), load_file(str(double / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    logs = [[json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()] for run in (single, double)]
    losses = [[r["loss"] for r in log if "loss" in r] for log in logs]
    assert len(losses[0]) == 6
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        adapter = apply_adapter(model, SpartaConfig(density=0.2), seed=0, head_modules=["score"])
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(**tiny_batch(), labels=torch.tensor([0, 1, 2])).loss.backward()
        grads.append({name: p.grad.clone() for name, p in adapter.trainable()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
