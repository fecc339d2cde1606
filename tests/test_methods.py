"""Every method (sparta, lora, dora, full, head) trains, saves, loads back and scores the same.

Two levels: a tiny random model, where the reloaded adapter's logits are compared with
the in-memory trained model's on one batch; and `sparta train` on MiniLM + a few SST-2
examples, where `sparta eval` of the run, and of its `sparta merge` output, must
reproduce the metrics the run itself recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_model

from sparta_cli.optim import build_optimizer
from sparta_cli.runs import read_adapter_config
from sparta_cli.tuners import apply_adapter, load_adapter, method_config
from sparta_cli.tuners.sparta.config import SpartaConfig

METHODS = ["sparta", "lora", "dora", "full", "head"]
EXACT = {"sparta", "full", "head"}  # lora/dora reload through PEFT: equal up to float rounding
HEADS = {"mistral": ["score"], "bert": ["classifier"]}


def _train_steps(adapter, batch, steps: int = 3) -> None:
    optimizer = build_optimizer(adapter, "adamw", lr=1e-2, head_lr=None, weight_decay=0.01)  # SpaRTA's write hook included
    adapter.model.train()
    for _ in range(steps):
        adapter.model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    adapter.model.eval()


@pytest.mark.parametrize("arch", ["mistral", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_trained_adapter_round_trips(tmp_path: Path, arch: str, method: str):
    batch = {**tiny_batch(), "labels": torch.tensor([0, 2, 1])}
    settings = method_config(method)
    cfg = settings(**settings.own_keys({"density": 0.1, "targets": ["q", "v", "o"], "r": 4, "alpha": 8.0}))
    base_logits = tiny_model(arch)(**batch).logits
    adapter = apply_adapter(tiny_model(arch), cfg, seed=5, head_modules=HEADS[arch])
    _train_steps(adapter, batch)
    with torch.no_grad():
        trained = adapter.model(**batch).logits
    assert not torch.allclose(trained, base_logits), "training changed nothing"
    adapter.save(tmp_path, {"targets": cfg.recorded()["targets"]})

    loaded = load_adapter(tmp_path, tiny_model(arch), read_adapter_config(tmp_path))
    loaded.model.eval()
    with torch.no_grad():
        reloaded = loaded.model(**batch).logits
    if method in EXACT:
        assert torch.equal(reloaded, trained)
    else:
        torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    assert loaded.num_trainable() == 0, "a loaded adapter is for inference: nothing trains"


@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory, minilm_path, data_dir):
    """`sparta train` for every method: 1 step on 8 SST-2 examples, scored on 16."""
    from sparta_cli.config import load_recipe
    from sparta_cli.train import train

    root = tmp_path_factory.mktemp("methods")
    recipe_path = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    runs = {}
    for method in METHODS:
        overrides = [f"output_dir={root / method}", f"adapter.method={method}", f"data.dir={data_dir}",
                     "data.max_train_samples=8", "data.max_eval_samples=16", "data.max_length=32",
                     "data.cache=false", "training.max_steps=1", "training.batch_size=8", "training.eval_every=null"]
        if method in ("lora", "dora"):
            overrides.append("adapter.targets=[q,v]")
        runs[method] = train(load_recipe(recipe_path, overrides))
    return runs


@pytest.mark.parametrize("method", METHODS)
def test_sparta_train_run_evaluates_and_merges_to_the_same_scores(minilm_runs, data_dir, tmp_path: Path, method: str):
    """`sparta eval RUN` reproduces what training recorded; `sparta merge` then `sparta eval MERGED` too."""
    from sparta_cli.evaluate_cmd import run_eval
    from sparta_cli.merge import merge_runs

    run_dir = minilm_runs[method]
    assert read_adapter_config(run_dir)["method"] == method
    recorded = json.loads((run_dir / "eval_results.json").read_text())
    same = ["data.max_eval_samples=16", "data.max_length=32", "data.cache=false"]
    scored = run_eval(str(run_dir), task=None, split=None, output=tmp_path / "run.json", overrides=same)["metrics"]
    assert scored["eval_accuracy"] == recorded["eval_accuracy"]
    assert scored["eval_loss"] == pytest.approx(recorded["eval_loss"], rel=1e-5)

    merge_runs([run_dir], output=tmp_path / "merged")
    merged = run_eval(str(tmp_path / "merged"), task="sst2", split=None, output=tmp_path / "merged.json",
                      overrides=[*same, f"data.dir={data_dir}"])["metrics"]
    assert merged["eval_accuracy"] == recorded["eval_accuracy"]
    assert merged["eval_loss"] == pytest.approx(recorded["eval_loss"], rel=1e-4)


def test_a_full_run_is_a_plain_transformers_checkpoint(minilm_runs):
    """AutoModelForSequenceClassification loads a full run's folder as it is (labels, tokenizer,
    task), with exactly the logits of the model `sparta eval` scores; no adapter file is written."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparta_cli.evaluate_cmd import RUN, eval_recipe, load_scored_model
    from sparta_cli.tasks import resolve_task

    run_dir = minilm_runs["full"]
    assert not (run_dir / "adapter_model.safetensors").exists() and not (run_dir / "adapter_config.json").exists()
    theirs = AutoModelForSequenceClassification.from_pretrained(run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    recipe = eval_recipe(str(run_dir), RUN, None, [])
    task = resolve_task(recipe.task)
    ours = load_scored_model(RUN, str(run_dir), recipe, task)[0].eval()
    assert theirs.config.id2label == dict(enumerate(task.label_names)) and theirs.config.finetuning_task == "sst2"
    batch = tokenizer(["a gripping, funny film", "dull, and far too long for what it has to say"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(theirs(**batch).logits, ours(**batch).logits)


def test_lora_matched_density_equals_lora_r8_qv_count_on_the_targets():
    """The equal-budget density compare_methods.sh and paper_table.py use, against counts made by hand."""
    from sparta_cli.targets import lora_matched_density

    model = tiny_model("llama")  # hidden 32, 4 heads of 8 (2 kv heads), 2 layers
    lora = 2 * (8 * (32 + 32) + 8 * (32 + 16))  # per layer: q (32 -> 32) and v (32 -> 16), r=8
    pool = 2 * (16 * 32 + 32 * 32)  # per layer: v (16 x 32) and o (32 x 32)
    assert lora_matched_density(model, ["v", "o"]) == lora / pool
    density = lora_matched_density(model, ["v", "o"])
    sparta = apply_adapter(tiny_model("llama"), SpartaConfig(density=density, targets=["v", "o"]), 0, [])
    assert sparta.num_trainable() - sum(p.numel() for n, p in sparta.trainable() if "score" in n) == lora
