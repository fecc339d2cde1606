"""The training loop's bookkeeping: the schedule steps once per optimizer step whatever the
accumulation, and the loop reports throughput."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparta_cli.config import build_recipe
from sparta_cli.train import train


def _recipe(model_dir: Path, data_dir: Path, out: Path, **training):
    return build_recipe({
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"density": 0.1, "targets": ["v", "o"]},
        "task": {"name": "sst2"},
        "data": {"dir": str(data_dir), "max_length": 32, "max_train_samples": 128, "max_eval_samples": 16},
        "training": {"max_steps": 4, "lr": 1e-2, "warmup_steps": 2, "scheduler": "linear", "log_every": 1, **training},
        "seed": 3,
        "output_dir": str(out),
    })


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


def test_accumulation_keeps_the_schedule_and_the_result(tmp_path, tiny_bert_nodropout_dir, data_dir):
    accumulated = train(_recipe(tiny_bert_nodropout_dir, data_dir, tmp_path / "accum", batch_size=8, grad_accum=4))
    single = train(_recipe(tiny_bert_nodropout_dir, data_dir, tmp_path / "single", batch_size=32, grad_accum=1))
    lrs = [[r["lr"] for r in _log(run) if "loss" in r] for run in (accumulated, single)]
    # warmup over 2 steps to 1e-2, then linear decay to 0 at step 4
    assert lrs[0] == lrs[1] == [5e-3, 1e-2, 5e-3, 0.0]
    a, b = (load_file(str(run / "adapter_model.safetensors")) for run in (accumulated, single))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert abs(a[next(k for k in a if "delta" in k or "values" in k)]).max() > 1e-4, "nothing trained"
    losses = [[r["loss"] for r in _log(run) if "loss" in r] for run in (accumulated, single)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)


def test_results_report_throughput_and_device(tmp_path, tiny_bert_nodropout_dir, data_dir):
    run = train(_recipe(tiny_bert_nodropout_dir, data_dir, tmp_path / "run", batch_size=8, log_every=2))
    results = json.loads((run / "train_results.json").read_text())
    assert results["device"] == "cpu" and results["peak_gpu_memory_gib"] is None
    assert results["train_samples_per_second"] > 0
    # 32 examples of at most 32 tokens: fewer non-pad tokens than padded slots
    assert 0 < results["train_tokens_per_second"] * results["train_runtime"] <= 32 * 32 + 1
    steps = [r for r in _log(run) if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4] and all(r["tokens_per_s"] > 0 for r in steps)
    assert _log(run)[-1]["train_steps"] == 4


def test_the_loss_window_gives_step_means_tokens_and_a_nonfinite_flag():
    from types import SimpleNamespace

    from sparta_cli.train import LossWindow

    one_process = SimpleNamespace(num_processes=1)
    window = LossWindow(torch.device("cpu"))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for loss in (1.0, 3.0):  # one step of two micro-batches: its loss is their mean
        window.add(torch.tensor(loss), {"attention_mask": mask, "input_ids": mask})
    window.end_step()
    window.add(torch.tensor(4.0), {"attention_mask": mask, "input_ids": mask})
    window.end_step()
    assert window.steps == 2 and window.read(one_process) == (6.0, 9, False)
    window.reset()
    window.add(torch.tensor(float("nan")), {"attention_mask": mask, "input_ids": mask})
    window.add(torch.tensor(1.0), {"attention_mask": mask, "input_ids": mask})
    window.end_step()
    loss_sum, _, nonfinite = window.read(one_process)
    assert nonfinite and loss_sum != loss_sum


def test_every_epoch_is_trained_when_its_batches_do_not_fill_the_last_accumulation(tmp_path, tiny_bert_nodropout_dir, data_dir):
    """Accelerate steps at every epoch's end, a short group included: 3 epochs of 5 batches with grad_accum 2
    are 3 x 3 = 9 steps. The count was ceil(3 x 5 / 2) = 8, so the run stopped a batch before its third
    epoch ended (with batch_size 40 and grad_accum 4: 1 step of the 3, two epochs never run)."""
    from sparta_cli.train import total_steps

    run = train(build_recipe({
        "model": {"name_or_path": str(tiny_bert_nodropout_dir)},
        "adapter": {"density": 0.1, "targets": ["v", "o"]},
        "task": {"name": "sst2"},
        "data": {"dir": str(data_dir), "max_length": 32, "max_train_samples": 40, "max_eval_samples": 16},
        "training": {"epochs": 3, "batch_size": 8, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 0, "log_every": 1},
        "seed": 3,
        "output_dir": str(tmp_path / "epochs"),
    }))
    results = json.loads((run / "all_results.json").read_text())
    assert (results["train_steps"], [r["epoch"] for r in _log(run) if "loss" in r][-1]) == (9, 3.0)
    for epochs, batches, accumulation, steps in ((3, 5, 2, 9), (3, 1, 4, 3), (2.5, 10, 1, 25), (0.5, 10, 4, 2), (1, 8, 4, 2)):
        recipe = build_recipe({"model": {"name_or_path": "m"}, "task": {"name": "sst2"},
                               "training": {"epochs": epochs, "grad_accum": accumulation}})
        assert total_steps(recipe, batches) == steps, (epochs, batches, accumulation)


def test_an_optimizer_step_fp16_skipped_does_not_advance_the_schedule(tmp_path, tiny_bert_nodropout_dir, data_dir, monkeypatch):
    """On a GPU, fp16's GradScaler skips a step whose gradients overflowed; the schedule still advanced
    (as HF Trainer's does not). Simulated: the first two steps report skipped."""
    from accelerate import Accelerator

    asked = []

    def skipped(self) -> bool:
        asked.append(None)
        return len(asked) <= 2

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped))
    run = train(_recipe(tiny_bert_nodropout_dir, data_dir, tmp_path / "run", batch_size=8))
    assert [r["lr"] for r in _log(run) if "loss" in r] == [0.0, 0.0, 5e-3, 1e-2]  # the warmup starts at the first real step


def test_a_short_last_group_and_batch_weigh_each_row_as_a_full_step_does(tmp_path, tiny_bert_nodropout_dir, data_dir):
    """37 rows in batches of 8 are 8, 8, 8, 8, 5: with grad_accum 2 the epoch's steps hold 16, 16 and 5 rows.
    Each step's gradient must be the mean over its own rows, as in a plain loop written out here (SGD, so the
    size of every update shows). Accelerate divides every micro-batch's loss by grad_accum, so the last step
    got half its gradient (and a mean of micro-batch means weighs a short batch's rows more)."""
    from accelerate.utils import set_seed

    from sparta_cli.data import make_loader, tokenize_split
    from sparta_cli.models import load_model
    from sparta_cli.tasks import resolve_task

    recipe = build_recipe({
        "model": {"name_or_path": str(tiny_bert_nodropout_dir)},
        "adapter": {"method": "head"},
        "task": {"name": "sst2"},
        "data": {"dir": str(data_dir), "max_length": 32, "max_train_samples": 37, "max_eval_samples": 8},
        "training": {"epochs": 2, "batch_size": 8, "grad_accum": 2, "lr": 0.5, "optimizer": "sgd", "scheduler": "constant",
                     "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": None, "log_every": 1},
        "seed": 3,
        "output_dir": str(tmp_path / "run"),
    })
    run = train(recipe)

    task = resolve_task(recipe.task)
    set_seed(recipe.seed)  # as train() seeds before it loads the model: the same new head
    loaded = load_model(recipe.model, task)
    model = loaded.model
    model.requires_grad_(False)
    head = model.get_submodule("classifier").float().requires_grad_(True)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    rows = tokenize_split(task, "train", loaded.tokenizer, recipe, 37, recipe.seed).dataset
    loader = make_loader(rows, loaded.tokenizer, 8, shuffle=True, seed=recipe.seed)
    losses = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        for group in (batches[i:i + 2] for i in range(0, len(batches), 2)):
            count = sum(len(batch["labels"]) for batch in group)
            total = sum(torch.nn.functional.cross_entropy(model(**batch).logits.float(), batch["labels"], reduction="sum")
                        for batch in group)
            (total / count).backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(total.detach()) / count)

    assert len(losses) == 6
    trained = load_file(str(run / "adapter_model.safetensors"))
    for name, param in head.named_parameters():
        key = next(k for k in trained if k.endswith(f"classifier.{name}"))
        torch.testing.assert_close(trained[key], param.detach(), rtol=1e-5, atol=1e-6)
    # the logged loss is the one the step applied: the mean over its rows
    torch.testing.assert_close(torch.tensor([r["loss"] for r in _log(run) if "loss" in r]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert json.loads((run / "train_results.json").read_text())["train_samples"] == 37
