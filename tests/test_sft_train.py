"""SFT training and evaluation (issue 22): the recipe keys, the causal LM each method trains, a step's
gradient and a split's loss against dense references, exact resume, eval targets, preflight."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparta_cli.config import build_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.sft import IGNORE, read_sft_file, tokenize_row
from tests.conftest import IN_CI, save_tiny_llama


def write_chat(path: Path, rows: int, seed: int = 0) -> Path:
    """Sums as chat, answers of 1 to 12 tokens (so batches hold unequal numbers of supervised tokens)."""
    rng = random.Random(seed)
    records = []
    for _ in range(rows):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        records.append({"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{b}"},
                                     {"role": "assistant", "content": " ".join([str(a + b)] * rng.randint(1, 4))}]})
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sft-data")
    return write_chat(folder / "train.jsonl", 24), write_chat(folder / "val.jsonl", 7, seed=1)


def sft_recipe(model_dir: Path, train_file: Path | None, out: Path, *, adapter=None, task=None, data=None, **training):
    return build_recipe({
        "model": {"name_or_path": str(model_dir)},
        "adapter": adapter or {"method": "sparta", "density": 0.5, "targets": ["v", "o"]},
        "task": {"type": "sft", **({"train_file": str(train_file)} if train_file else {}), **(task or {})},
        "data": {"max_length": 64, **(data or {})},
        "training": {"batch_size": 4, "lr": 1e-2, "log_every": 1, **training},
        "seed": 3,
        "output_dir": str(out),
    })


def reference_rows(model_dir: Path, path: Path):
    """The file's rows tokenised as training sees them (the tokenizer's ChatML template, loss on the assistant)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [tokenize_row(row, tokenizer, tokenizer.chat_template) for row in read_sft_file(path).rows]


def summed_token_loss(model, row) -> tuple[torch.Tensor, int]:
    """Dense reference: one row alone, no padding, its supervised tokens' cross-entropy summed."""
    ids, labels = torch.tensor([row.input_ids]), torch.tensor([row.labels])
    logits = model(input_ids=ids).logits[0, :-1].double()
    return torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE, reduction="sum"), row.supervised


# ---------------------------------------------------------------- the recipe


@pytest.mark.parametrize(("task", "data", "message"), [
    ({"name": "sst2", "loss_on": "all"}, {}, "task.loss_on is task.type: sft's and does not apply to task sst2: remove it, or set task.type: sft"),
    ({"type": "classification", "train_file": "t.csv", "text_fields": ["s"], "format": "chat"}, {},
     "task.format is task.type: sft's and does not apply to task.type: classification: remove it, or set task.type: sft"),
    ({"type": "sft", "train_file": "t.jsonl", "text_fields": ["s"]}, {},
     "task.text_fields does not apply to task.type: sft (its rows are chat, prompt_completion or text records, docs/sft.md): remove it"),
    ({"type": "sft", "name": "mmlu", "shots": 5}, {}, "task.shots does not apply to task.type: sft (its rows are chat, "
                                                      "prompt_completion or text records, docs/sft.md): remove it"),
    ({"type": "sft"}, {}, "task.type: sft needs task.train_file (and task.validation_file), or task.name: sst2 or mmlu "
                          "for a built-in task as chat"),
    ({"name": "sst2"}, {"packing": True}, "data.packing is task.type: sft's (it packs rows end to end) and does not apply to this "
                                          "task: remove it"),
])
def test_keys_of_another_kind_of_task_are_refused(task, data, message):
    with pytest.raises(SpartaError) as error:
        build_recipe({"model": {"name_or_path": "m"}, "task": task, "data": data})
    assert str(error.value) == message


def test_a_named_task_that_does_not_render_as_chat_is_refused():
    from sparta_cli.tasks import resolve_task

    with pytest.raises(SpartaError, match="`cola` is neither: set the files, or task.name to one of those"):
        resolve_task(build_recipe({"model": {"name_or_path": "m"}, "task": {"name": "cola", "type": "sft"}}).task)


def test_sst2_and_mmlu_as_chat(data_dir):
    import datasets

    from sparta_cli.tasks import load_split, resolve_task, sft_rows
    from sparta_cli.tasks.sft import chat_records

    recipe = build_recipe({"model": {"name_or_path": "m"}, "task": {"name": "sst2", "type": "sft"}})
    task = resolve_task(recipe.task)
    assert (task.kind.name, task.main_metric, task.eval_splits) == ("sft", "loss", ("validation",))
    row = sft_rows(load_split(task, recipe.task, "validation", data_dir))[0]
    assert row.messages == ({"role": "user", "content": "Is the sentiment of this sentence positive or negative? Answer with one "
                                                        "word.\n\nit 's a charming and often affecting journey . "},
                            {"role": "assistant", "content": "positive"})
    recipe = build_recipe({"model": {"name_or_path": "m"}, "task": {"name": "mmlu", "type": "sft", "train_split": "test",
                                                                     "instruction": "Topic: {subject}."}})
    task = resolve_task(recipe.task)
    row = sft_rows(load_split(task, recipe.task, "train", data_dir))[0]  # train is MMLU's test split here
    user, answer = row.messages
    assert user["content"].startswith("Topic: abstract algebra.\n\nFind the degree for the given field extension")
    assert user["content"].endswith("\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:") and answer == {"role": "assistant", "content": "B"}
    sst2 = build_recipe({"model": {"name_or_path": "m"}, "task": {"name": "sst2", "type": "sft"}}).task
    unlabelled = datasets.Dataset.from_dict({"sentence": ["fine"], "label": [-1]})  # GLUE's test split
    with pytest.raises(SpartaError, match="sst2/test row 1 has no label"):
        list(chat_records(resolve_task(sst2), sst2, "test", unlabelled))


# ---------------------------------------------------------------- the model each method trains


def test_methods_train_the_body_of_a_causal_lm_and_head_its_lm_head(tiny_llama_dir, chat_files, tmp_path):
    from sparta_cli.tasks import resolve_task
    from sparta_cli.train import setup_model

    def trained(adapter):
        recipe = sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / "run", adapter=adapter)
        model = setup_model(recipe, resolve_task(recipe.task))
        assert type(model.adapter.base).__name__ == "LlamaForCausalLM"
        return sorted({name.split(".")[-1] if "sparta" in name or "lora" in name else name for name, _ in model.adapter.trainable()})

    assert trained(None) == ["sparta_delta"]  # no head: the LM head stays the model's
    assert trained({"method": "lora", "r": 2, "targets": ["v", "o"]}) == ["weight"]  # lora_A / lora_B
    assert trained({"method": "head"}) == ["lm_head.weight"]
    tied = save_tiny_llama(tmp_path / "tied", tie=True)
    recipe = sft_recipe(tied, chat_files[0], tmp_path / "run", adapter={"method": "head"})
    with pytest.raises(SpartaError, match=r"ties its LM head to its input embeddings \(tie_word_embeddings\), so adapter.method: "
                                          "head would train the input embeddings too: use adapter.method sparta, lora, dora or full"):
        setup_model(recipe, resolve_task(recipe.task))


# ---------------------------------------------------------------- the numbers


SGD_STEP = {"max_steps": 1, "optimizer": "sgd", "lr": 1.0, "max_grad_norm": None, "scheduler": "constant"}


def first_step_losses(model_dir: Path, train_file: Path, rows: int = 4):
    """Dense reference: the plain model and the summed token loss and supervised tokens of each of the
    first `rows` rows a run with seed 3 trains on (its sampler's order), each row alone."""
    from transformers import AutoModelForCausalLM

    from sparta_cli.data import EpochShuffleSampler

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenized = reference_rows(model_dir, train_file)
    first = [tokenized[index] for index in list(EpochShuffleSampler(len(tokenized), 3))[:rows]]
    losses, tokens = zip(*(summed_token_loss(model, row) for row in first))
    return model, losses, tokens


def assert_sgd_step(deltas: dict[str, torch.Tensor], model, grads) -> None:
    """One SGD step at lr 1 from SpaRTA's zero deltas writes minus the gradient at its indices."""
    modules = sorted(key.removesuffix(".delta") for key in deltas if key.endswith(".delta"))
    for module, grad in zip(modules, grads):
        expected = -grad.reshape(-1)[deltas[f"{module}.indices"].long()].float()
        torch.testing.assert_close(deltas[f"{module}.delta"], expected, rtol=1e-4, atol=1e-7)


def delta_weights(deltas: dict[str, torch.Tensor], model) -> list[torch.Tensor]:
    """The dense weights of the modules SpaRTA trained, in `assert_sgd_step`'s order."""
    return [model.get_submodule(key.removesuffix(".delta")).weight for key in sorted(deltas) if key.endswith(".delta")]


def test_a_step_is_the_mean_token_loss_gradient_of_its_rows_however_they_are_accumulated(tiny_llama_dir, chat_files, tmp_path):
    """One SGD step at lr 1 writes minus the gradient into SpaRTA's deltas: 4 rows in one batch, or 2 x 2
    accumulated, give the gradient of the mean token loss over the 4 rows (a dense reference)."""
    from safetensors.torch import load_file

    from sparta_cli.train import train

    deltas = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        run = train(sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / f"b{batch}", **{**SGD_STEP, "batch_size": batch,
                                                                                           "grad_accum": accumulation}))
        deltas[batch] = load_file(str(run / "adapter_model.safetensors"))
    model, losses, tokens = first_step_losses(tiny_llama_dir, chat_files[0])
    keys = sorted(key for key in deltas[4] if key.endswith(".delta"))
    assert keys and set(deltas[2]) == set(deltas[4])  # deltas only: no head, nothing else trained
    weights = delta_weights(deltas[4], model)
    token_mean = torch.stack(losses).sum() / sum(tokens)
    batch_means = (sum(losses[:2]) / sum(tokens[:2]) + sum(losses[2:]) / sum(tokens[2:])) / 2
    grads = torch.autograd.grad(token_mean, weights, retain_graph=True)
    other = torch.autograd.grad(batch_means, weights)
    # a mean of the two micro-batches' means is another gradient, far beyond the tolerance below
    assert max(float((g - o).abs().max() / g.abs().max()) for g, o in zip(grads, other)) > 1e-2
    assert_sgd_step(deltas[4], model, grads)
    assert_sgd_step(deltas[2], model, grads)


def test_a_step_with_gradient_checkpointing_is_the_dense_gradient(tiny_llama_dir, chat_files, tmp_path):
    """training.gradient_checkpointing recomputes each block's activations in the backward: the step is
    still minus the dense reference's gradient of the mean token loss."""
    from safetensors.torch import load_file

    from sparta_cli.tasks import resolve_task
    from sparta_cli.train import setup_model, train

    recipe = sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / "checkpointed", **SGD_STEP, gradient_checkpointing=True)
    layers = setup_model(recipe, resolve_task(recipe.task)).adapter.base.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)  # the key reaches the model's blocks
    deltas = load_file(str(train(recipe) / "adapter_model.safetensors"))
    model, losses, tokens = first_step_losses(tiny_llama_dir, chat_files[0])
    assert_sgd_step(deltas, model, torch.autograd.grad(torch.stack(losses).sum() / sum(tokens), delta_weights(deltas, model)))


def test_a_dora_run_trains_to_a_finite_loss_and_its_saved_adapter_gives_its_eval(tiny_llama_dir, chat_files, tmp_path):
    """adapter.method: dora on a causal LM: a few steps, a finite loss logged at each, and `sparta eval RUN`
    (PEFT's files loaded back onto a fresh base) gives the eval loss the run recorded."""
    from sparta_cli.evaluate_cmd import run_eval
    from sparta_cli.train import train

    run = train(sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / "dora", adapter={"method": "dora", "r": 2, "targets": ["v", "o"]},
                           task={"validation_file": str(chat_files[1])}, max_steps=3))
    losses = [json.loads(line)["loss"] for line in (run / "trainer_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    recorded = json.loads((run / "eval_results.json").read_text())["eval_loss"]
    scored = run_eval(str(run), task=None, split=None, output=tmp_path / "eval.json", overrides=[])
    assert scored["metrics"]["eval_loss"] == pytest.approx(recorded, rel=1e-6)
    base = run_eval(str(tiny_llama_dir), task=None, split=None, output=tmp_path / "base.json",
                    overrides=["task.type=sft", f"task.validation_file={chat_files[1]}"])
    assert abs(base["metrics"]["eval_loss"] - recorded) > 1e-3  # the adapter moved the loss: the check can fail


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists() and not IN_CI,
                    reason="torchrun missing")  # it comes with torch: under CI it must be there
@pytest.mark.parametrize(("sharding", "adapter", "saved", "port"), [
    ("none", None, "adapter_model.safetensors", 29571),
    ("fsdp", None, "adapter_model.safetensors", 29572),
    ("fsdp", {"method": "full"}, "model.safetensors", 29573),
])
def test_two_processes_weight_their_micro_batches_by_tokens(sharding, adapter, saved, port, tiny_llama_dir, chat_files, tmp_path):
    """2 processes (gloo) with 2 rows each take the step of 1 process with those 4 rows: each process's
    summed token loss over the step's tokens of both, not the mean of two per-process means; the same
    under training.sharding=fsdp (FSDP2: each process holds half of the causal LM), SpaRTA or full."""
    from safetensors.torch import load_file

    from sparta_cli.train import train

    single = load_file(str(train(sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / "one", adapter=adapter, **SGD_STEP, batch_size=4))
                           / saved))
    recipe = sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / "two", adapter=adapter, **SGD_STEP, batch_size=2, sharding=sharding)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "sparta_cli", "train",
                             str(tmp_path / "two.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    double = load_file(str(tmp_path / "two" / saved))
    assert single.keys() == double.keys()
    for key in single:  # measured: at most 9e-8 apart (full's lm_head under fsdp); SpaRTA's deltas 0 to 3e-8
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-7)
    # the step moved the weights, so the comparison can fail: SpaRTA's deltas left 0, full's weights the base's
    base = load_file(str(tiny_llama_dir / "model.safetensors")) if saved == "model.safetensors" else {}
    assert any(not torch.equal(single[key], base.get(key, torch.zeros_like(single[key]))) for key in single if single[key].is_floating_point())


def _random_rows(count: int, seed: int):
    """Rows of random ids with about 60% of their labels on (the first always off, as tokenize_row makes it)."""
    from sparta_cli.sft import TokenizedRow

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        size = int(torch.randint(3, 14, (1,), generator=generator))
        ids = torch.randint(1, 96, (size,), generator=generator).tolist()
        on = (torch.rand(size, generator=generator) < 0.6).tolist()
        rows.append(TokenizedRow(ids, [IGNORE] + [token if keep else IGNORE for token, keep in zip(ids[1:], on[1:])]))
    return rows


@pytest.mark.parametrize(("adapter", "tie"), [({"method": "full"}, True), ({"method": "head"}, False),
                                              ({"method": "lora", "r": 2, "targets": ["v", "o"]}, True),
                                              ({"method": "dora", "r": 2, "targets": ["v", "o"]}, False),
                                              ({"method": "sparta", "density": 0.5, "targets": ["v", "o"]}, True)])
def test_only_the_supervised_positions_reach_the_lm_head_with_the_full_logits_losses_and_gradients(adapter, tie):
    """The SFT loss and scorer apply the LM head to the supervised positions only: the same per-token losses,
    per-row sums and gradients as the plain computation from every position's logits, padded and packed,
    whatever wraps the model (PEFT's LoRA / DoRA, SpaRTA; a tied head; the head trained)."""
    from transformers import LlamaForCausalLM

    from sparta_cli.sft import collate_packed, collate_padded, pack
    from sparta_cli.tasks.kinds import SFT_KIND, sft_scorer, supervised_token_losses
    from sparta_cli.tuners import apply_adapter
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = tie
    base = LlamaForCausalLM(config)
    cfg = build_recipe({"model": {"name_or_path": "m"}, "adapter": adapter, "task": {"name": "sst2", "type": "sft"}}).adapter
    model = apply_adapter(base, cfg, 0, ["lm_head"] if adapter["method"] == "head" else []).model
    if adapter["method"] in ("lora", "dora"):  # PEFT starts B at 0: move it, so the adapter's path counts in the losses
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
    trainable = [param for param in model.parameters() if param.requires_grad]
    rows = _random_rows(7, seed=2)
    widths = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: widths.append(out.shape[:-1]))
    for batch in (collate_padded(rows, pad_id=0), collate_packed(pack(rows, max_length=16), pad_id=0)):
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
        targets = batch["labels"][:, 1:]
        full = model(**inputs, use_cache=False).logits[:, :-1].float()  # the plain reference: every position's logits
        reference = torch.nn.functional.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                                      reduction="none").view(targets.shape)
        reference_grads = torch.autograd.grad(reference.sum(), trainable)
        losses, supervised = supervised_token_losses(model, batch)
        assert widths[-1] == (int(supervised.sum()),)  # the head saw the supervised rows alone
        torch.testing.assert_close(losses, reference[supervised], rtol=1e-6, atol=0)
        loss, tokens = SFT_KIND.train_loss(model, batch)
        assert int(tokens) == sum(row.supervised for row in rows)
        # measured: losses and gradients bitwise equal on the 2-core CPU (the same fp32 products); the
        # tolerances leave room for another BLAS's blocking of a matmul with fewer rows
        for grad, expected in zip(torch.autograd.grad(loss, trainable), reference_grads):
            torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)
        with torch.no_grad():  # rows after the first 2 repeat others (a last batch evened across processes): no weight
            loss, tokens = SFT_KIND.train_loss(model, batch, rows=2)
        assert int(tokens) == int((targets[:2] != IGNORE).sum())
        torch.testing.assert_close(loss, reference[:2][targets[:2] != IGNORE].sum(), rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            sums, counts = sft_scorer(model, batch)
        torch.testing.assert_close(sums, reference.double().sum(-1), rtol=1e-6, atol=0)
        assert counts.tolist() == (targets != IGNORE).sum(-1).tolist()


def test_eval_loss_is_the_summed_token_loss_over_the_supervised_tokens(tiny_llama_dir, chat_files, tmp_path):
    """`sparta eval` of a base causal LM on an SFT file, in batches of 3 rows, against each row run alone."""
    from transformers import AutoModelForCausalLM

    from sparta_cli.evaluate_cmd import run_eval

    validation = chat_files[1]
    results = run_eval(str(tiny_llama_dir), task=None, split=None, output=tmp_path / "eval.json",
                       overrides=["task.type=sft", f"task.validation_file={validation}", "training.eval_batch_size=3"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    with torch.no_grad():
        losses, tokens = zip(*(summed_token_loss(model, row) for row in reference_rows(tiny_llama_dir, validation)))
    expected = float(sum(losses) / sum(tokens))
    metrics = results["metrics"]
    assert results["head"] == "lm" and metrics["eval_num_examples"] == 7
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-6)
    batch_means = [float(sum(losses[i:i + 3]) / sum(tokens[i:i + 3])) for i in range(0, 7, 3)]
    assert abs(sum(batch_means) / 3 - expected) > 1e-3  # the mean of batch means differs: the test can tell them apart


def test_kill_and_resume_of_a_packed_sft_run_with_model_selection_is_exact(tiny_llama_dir, chat_files, tmp_path):
    """Stopped at its step-4 evaluation (checkpoint-2 kept), resumed: the same adapter, byte for byte, as
    the run that never stopped; `sparta eval RUN` then gives the loss training recorded for it."""
    from sparta_cli.evaluate_cmd import run_eval
    from sparta_cli.report import write_report
    from sparta_cli.train import train

    def recipe(name: str):
        return sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / name, task={"validation_file": str(chat_files[1])},
                          data={"packing": True, "validation_size": 6, "max_length": 48}, batch_size=2, max_steps=6, eval_every=2,
                          save_every=2, best_metric="perplexity")

    reference = train(recipe("reference"))

    def stop_at_4(step: int, metrics: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe("killed"), on_evaluate=stop_at_4)
    killed = tmp_path / "killed"
    assert [path.name for path in killed.glob("checkpoint-*")] == ["checkpoint-2"] and not (killed / "all_results.json").exists()
    train(recipe("killed"), resume=True)
    assert (killed / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    recorded = json.loads((reference / "eval_results.json").read_text())
    assert json.loads((killed / "eval_results.json").read_text()) == recorded
    assert recorded["best_step"] in (2, 4, 6) and "eval_perplexity" in recorded and "test_loss" in recorded
    log = [json.loads(line) for line in (reference / "trainer_log.jsonl").read_text().splitlines()]
    assert all(record["tokens_per_s"] > 0 for record in log if "loss" in record)
    config = json.loads((reference / "adapter_config.json").read_text())
    assert config["task"]["kind"] == "sft" and config["base_model"]["architecture"] == "LlamaForCausalLM"
    assert (config["task"]["format"], config["task"]["chat"]) == ("chat", True)  # task.format left out: read from the fields
    scored = run_eval(str(reference), task=None, split=None, output=tmp_path / "eval.json", overrides=[])
    assert scored["metrics"]["eval_loss"] == pytest.approx(recorded["test_loss"], rel=1e-6)
    report = (write_report([str(reference)], output=tmp_path / "report") / "report.csv").read_text()
    metric, mean = report.splitlines()[1].split(",")[-3:-1]  # sparta report: the run's (selected) loss, one seed
    assert metric == "loss" and float(mean) == pytest.approx(recorded["eval_loss"], rel=1e-9)


# ---------------------------------------------------------------- eval targets and preflight


def test_a_causal_lm_folder_is_merged_when_it_records_a_finetuning_task(tmp_path):
    from sparta_cli.evaluate_cmd import BASE, MERGED, target_kind

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert target_kind(str(tmp_path)) == BASE  # a base model: plain transformers checkpoints record no task
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "finetuning_task": "sst2"}))
    assert target_kind(str(tmp_path)) == MERGED


def test_preflight_reads_every_row_and_checks_the_template_before_weights_load(tiny_llama_dir, tmp_path):
    from sparta_cli.preflight import preflight

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}) + "\n")
    with pytest.raises(SpartaError) as error:
        preflight(sft_recipe(tiny_llama_dir, bad, tmp_path / "run"))
    assert str(error.value) == (f"{bad} line 2: message 2 (assistant) is empty, so there is no answer to train on: "
                                "write it or remove that row") and error.value.exit_code == 2
    good = write_chat(tmp_path / "good.jsonl", 3)
    prefixed = tmp_path / "prefixed.jinja"  # writes "Answer: " before every answer, which the data does not hold
    prefixed.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ ('Answer: ' if m['role'] == 'assistant' else '') "
                        "+ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(SpartaError, match=rf"{good} line 1: the chat template renders message 3 \(assistant\) as .*not as the "
                                          "data's text, so the loss mask would be wrong"):
        preflight(sft_recipe(tiny_llama_dir, good, tmp_path / "run", task={"chat_template": str(prefixed)}))


def test_preflight_refuses_a_tied_head_and_generation_metrics_without_prompts_before_anything_is_written(
        tiny_llama_dir, tiny_chat_lm_dir, chat_files, tmp_path):
    """What `sparta validate` passed and `sparta train` then refused after the load (leaving config.yaml
    behind, which blocked the corrected rerun): `head` on a tied LM head, generation metrics on text rows."""
    from typer.testing import CliRunner

    from sparta_cli.cli import app

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"story number {i}"}) + "\n" for i in range(6)))
    cases = [
        (sft_recipe(tiny_chat_lm_dir, chat_files[0], tmp_path / "tied", adapter={"method": "head"}),
         "this llama model ties its LM head to its input embeddings"),
        (sft_recipe(tiny_llama_dir, text, tmp_path / "text", task={"validation_file": str(text), "generation_metrics": True}),
         f"{text} line 1: the row has no prompt to generate from: generation metrics need chat or prompt_completion data"),
    ]
    for recipe, says in cases:
        path = tmp_path / f"{Path(recipe.output_dir).name}.yaml"
        path.write_text(yaml.safe_dump(recipe.to_dict()))
        for command in ("validate", "train"):
            result = CliRunner().invoke(app, [command, str(path)])
            assert getattr(result.exception, "exit_code", None) == 2 and says in str(result.exception), (command, result.output)
        assert not Path(recipe.output_dir).exists(), "train wrote into output_dir before refusing"


def test_a_split_with_no_answer_within_max_length_names_the_setting_that_applies(tiny_llama_dir, chat_files, tmp_path, monkeypatch):
    from sparta_cli.preflight import preflight

    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))
    for overlong, clause in (("truncate", ""), ("drop", " (data.overlong: drop drops every row that does not fit)")):
        with pytest.raises(SpartaError) as error:
            preflight(sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / "run", data={"max_length": 8, "overlong": overlong}))
        assert str(error.value).endswith(f"no row keeps an answer token within data.max_length=8{clause}: raise data.max_length")


# ChatML with a marker line before every conversation: renders each message's content as it is (the mask holds),
# and differs from the tiny Llama tokenizer's own ChatML
MARKED_CHATML = ("# marked\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("method", ["sparta", "full"])
def test_a_run_keeps_its_chat_template_and_every_command_reads_it_from_any_folder(method, tiny_llama_dir, chat_files, tmp_path,
                                                                                  monkeypatch):
    """A relative task.chat_template was read from the current folder by eval, generate, serve and merge:
    from another folder it named another file (or none) and rendered with it without a word. The run now
    keeps the template it trained with; a full run's own tokenizer carries it too."""
    from transformers import AutoTokenizer

    from sparta_cli.evaluate_cmd import RUN, eval_recipe
    from sparta_cli.generate_cmd import load_generator, resolve_target
    from sparta_cli.merge import trained_chat_template
    from sparta_cli.runs import read_run
    from sparta_cli.train import train

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for folder, text in ((here, MARKED_CHATML), (elsewhere, "{{ raise_exception('the template of another folder') }}")):
        (folder / "tp").mkdir(parents=True)
        (folder / "tp" / "chat.jinja").write_text(text)
    monkeypatch.chdir(here)
    run = train(sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / "run", adapter={"method": method}, task={"chat_template": "tp/chat.jinja"},
                           max_steps=1))
    assert (run / "chat_template.jinja").read_text() == MARKED_CHATML
    assert yaml.safe_load((run / "config.yaml").read_text())["task"]["chat_template"] == "tp/chat.jinja"  # the recipe as given
    monkeypatch.chdir(elsewhere)
    assert eval_recipe(str(run), RUN, None, []).task.chat_template == str(run / "chat_template.jinja")
    assert load_generator(resolve_target(str(run))).template == MARKED_CHATML
    assert trained_chat_template(read_run(run, tensors=False)) == MARKED_CHATML
    if method == "full":
        assert AutoTokenizer.from_pretrained(str(run)).chat_template == MARKED_CHATML


def test_a_resume_from_a_folder_where_the_template_path_names_another_template_is_refused(tiny_llama_dir, chat_files, tmp_path,
                                                                                       monkeypatch):
    """The checkpoints trained with the first folder's template; the resumed steps rendered with the
    second's, and the kept copy was rewritten to it."""
    from sparta_cli.train import train

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for folder, text in ((here, MARKED_CHATML), (elsewhere, MARKED_CHATML.replace("<|im_start|>", "<|im_start|> "))):
        (folder / "tp").mkdir(parents=True)
        (folder / "tp" / "chat.jinja").write_text(text)
    recipe = sft_recipe(tiny_llama_dir, chat_files[0], tmp_path / "run", max_steps=3, eval_every=1, save_every=1,
                        task={"chat_template": "tp/chat.jinja", "validation_file": str(chat_files[1])})

    def stop_at_2(step: int, metrics: dict) -> None:  # checkpoint-1 kept
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.chdir(here)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, on_evaluate=stop_at_2)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SpartaError, match=r"task.chat_template tp/chat.jinja is not the template .*checkpoint-1 trained with"):
        train(recipe, resume=True)
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == MARKED_CHATML
    monkeypatch.chdir(here)
    train(recipe, resume=True)
    assert (tmp_path / "run" / "all_results.json").is_file()


def test_preflight_refuses_a_validation_size_the_training_rows_cannot_hold(tiny_llama_dir, tmp_path):
    """`sparta validate` said ok, then `train` refused it after loading the weights."""
    from sparta_cli.preflight import preflight

    rows = write_chat(tmp_path / "five.jsonl", 5)
    with pytest.raises(SpartaError, match=r"data.validation_size = 10 holds out 10 of the 5 training rows"):
        preflight(sft_recipe(tiny_llama_dir, rows, tmp_path / "run", data={"validation_size": 10}))
    preflight(sft_recipe(tiny_llama_dir, rows, tmp_path / "run", data={"validation_size": 2}))
