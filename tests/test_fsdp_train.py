"""`sparta train` with training.sharding=fsdp under torchrun (gloo, CPU): the adapter of one process
with the same global batch, checkpoints in today's format, kill -9 + --resume bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparta_cli.cli import app
from sparta_cli.errors import SpartaError
from sparta_cli.sharding import check_launch
from sparta_cli.tuners import get_tuner

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 24


def _recipe(tmp: Path, model_dir: Path, data_dir: Path, out: Path, batch_size: int, sharding: str,
            adapter: dict | None = None, **training) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": adapter or {"density": 0.1, "targets": ["v", "o"]},
        "task": {"name": "sst2"},
        "data": {"dir": str(data_dir), "max_length": 32, "max_train_samples": 48, "max_eval_samples": 30},
        "training": {"max_steps": STEPS, "batch_size": batch_size, "lr": 1e-3, "log_every": 1, "save_every": 8,
                     "sharding": sharding, **training},
        "seed": 3,
        "output_dir": str(out),
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _torchrun(recipe: Path, port: int, *extra: str) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), "-m", "sparta_cli", "train", str(recipe), *extra]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _train_here(recipe: Path) -> None:
    """The one-process reference, trained in this process: the comparisons allow float noise, so the
    thread count may differ from a fresh process's, and no interpreter start is paid for it."""
    from sparta_cli.config import load_recipe
    from sparta_cli.train import train

    train(load_recipe(recipe))


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for child in map(int, children) for d in [*_descendants(child), child]]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.slow
def test_fsdp_run_matches_one_process_and_resumes_after_kill_bit_for_bit(tmp_path, tiny_bert_nodropout_dir, data_dir):
    single, fsdp, killed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "killed"
    _train_here(_recipe(tmp_path, tiny_bert_nodropout_dir, data_dir, single, 8, "none"))
    _run(_torchrun(_recipe(tmp_path, tiny_bert_nodropout_dir, data_dir, fsdp, 4, "fsdp"), 29541))
    a, b = load_file(str(single / "adapter_model.safetensors")), load_file(str(fsdp / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # measured: at most 6.4e-7 (8 steps), the same order over 24
        assert (torch.equal(a[key], b[key]) if key.endswith(".indices") else _relative(b[key], a[key]) <= 1e-5), key
    # checkpoints hold the whole adapter and optimizer, as one process writes them
    one, two = load_file(str(single / "checkpoint-8" / "trainable.safetensors")), load_file(str(fsdp / "checkpoint-8" / "trainable.safetensors"))
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}

    recipe = _recipe(tmp_path, tiny_bert_nodropout_dir, data_dir, killed, 4, "fsdp")
    proc = subprocess.Popen(_torchrun(recipe, 29542), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoint-8").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "checkpoint-8 never appeared"
        time.sleep(0.005)
    for pid in [*_descendants(proc.pid), proc.pid]:  # both workers (torchrun starts them in sessions of their own), then the launcher
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "all_results.json").exists(), "the run finished before it was killed"
    _run(_torchrun(recipe, 29543, "--resume"))
    assert (killed / "adapter_model.safetensors").read_bytes() == (fsdp / "adapter_model.safetensors").read_bytes()


# what each method writes, and the tensors to compare in it
SAVED = {"lora": "peft/adapter_model.safetensors", "dora": "peft/adapter_model.safetensors", "full": "model.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_lora_dora_and_full_train_under_fsdp_as_on_one_process(tmp_path, method, tiny_bert_nodropout_dir, data_dir):
    """PEFT's layers and full fine-tuning under the same FSDP2 sharding: the files they write match
    one process's with the same global batch, and `sparta eval` reads them as any run."""
    adapter = {"method": method, "r": 4, "targets": ["q", "v"]} if method != "full" else {"method": "full"}
    runs = {}
    for sharding, batch in (("none", 8), ("fsdp", 4)):
        out = tmp_path / f"{method}-{sharding}"
        recipe = _recipe(tmp_path, tiny_bert_nodropout_dir, data_dir, out, batch, sharding, adapter, max_steps=8, save_every=4)
        if sharding == "none":
            _train_here(recipe)
        else:
            _run(_torchrun(recipe, 29550 + len(method)))
        runs[sharding] = load_file(str(out / SAVED[method]))
    assert runs["none"].keys() == runs["fsdp"].keys()
    # relative, except for tensors that stay at rounding noise (~1e-9: the attention key bias, whose
    # exact gradient is zero because softmax ignores it), where the absolute difference is what counts
    floats = [key for key in runs["none"] if runs["none"][key].is_floating_point()]
    worst = max(_relative(runs["fsdp"][key], runs["none"][key]) for key in floats if runs["none"][key].norm() > 1e-4)
    noise = max([float((runs["fsdp"][key] - runs["none"][key]).norm()) for key in floats if runs["none"][key].norm() <= 1e-4], default=0.0)
    # measured: worst relative 5.5e-7 (lora), 6.6e-7 (dora), 9.4e-7 (full); noise 1.2e-7 (full), 8 steps
    assert worst <= 1e-5 and noise <= 1e-6, (worst, noise)
    evaluated = CliRunner().invoke(app, ["eval", str(tmp_path / f"{method}-fsdp")])
    assert evaluated.exit_code == 0, f"{evaluated.output}\n{evaluated.exception!r}"


@pytest.mark.slow
def test_bf16_and_model_selection_under_fsdp(tmp_path, tiny_bert_nodropout_dir, data_dir):
    """bf16 under FSDP (its mixed-precision policy: bf16 weights gathered, fp32 deltas and gradient
    sums) trains what one bf16 process (autocast) trains, as closely as bf16 follows fp32, and the
    best validation step's adapter is the one kept. SGD, so that differences are not amplified by
    Adam's normalisation of near-zero gradients."""
    common = {"eval_every": 4, "max_steps": 12, "save_every": None, "optimizer": "sgd", "lr": 0.05}
    adapters, results = {}, {}
    for name, sharding, batch, precision in (("fp32", "none", 8, "no"), ("bf16", "none", 8, "bf16"), ("fsdp-bf16", "fsdp", 4, "bf16")):
        out = tmp_path / name
        recipe = _recipe(tmp_path, tiny_bert_nodropout_dir, data_dir, out, batch, sharding, None, mixed_precision=precision, **common)
        recipe.write_text(recipe.read_text().replace("max_train_samples: 48", "max_train_samples: 64\n  validation_size: 16"))
        single = [sys.executable, "-m", "sparta_cli", "train", str(recipe)]  # a process each: accelerate's state holds one precision
        _run(single if sharding == "none" else _torchrun(recipe, 29560))
        adapters[name] = load_file(str(out / "adapter_model.safetensors"))
        results[name] = json.loads((out / "all_results.json").read_text())

    def worst(a: str, b: str) -> float:
        return max(_relative(adapters[a][k], adapters[b][k]) for k in adapters[b] if k.endswith(".delta"))

    assert results["fsdp-bf16"]["best_step"] == results["bf16"]["best_step"]
    assert "test_accuracy" in results["fsdp-bf16"]
    # measured: FSDP bf16 against one bf16 process 0.0097, one bf16 process against fp32 0.012 (FSDP bf16 against fp32 0.015)
    assert worst("fsdp-bf16", "bf16") <= 2 * worst("bf16", "fp32") <= 0.1


def test_sharding_refuses_what_does_not_work_in_one_line():
    with pytest.raises(SpartaError, match="training.sharding=fsdp"):
        check_launch(get_tuner("sparta"), "none", "FSDP", "no")  # accelerate's plugin: points at the way that works
    with pytest.raises(SpartaError, match="not both"):
        check_launch(get_tuner("lora"), "fsdp", "FSDP", "no")
    with pytest.raises(SpartaError, match="torchrun"):
        check_launch(get_tuner("sparta"), "fsdp", "NO", "no")  # one process, no process group
    check_launch(get_tuner("lora"), "none", "FSDP", "no")  # PEFT under accelerate's FSDP is not ours to refuse
