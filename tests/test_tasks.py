"""Tasks read from the real offline copies (counts from /work/shared/data/README.md) and from tiny files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import DATA_DIR, IN_CI, require_or_skip

from sparta_cli.config import TaskConfig
from sparta_cli.errors import SpartaError
from sparta_cli.tasks import (
    KNOWN_TASKS,
    MMLU_CATEGORIES,
    format_mmlu_prompt,
    load_split,
    mmlu_prompt_with_shots,
    resolve_task,
    split_names,
)

DATA = DATA_DIR if (DATA_DIR / "glue").is_dir() else None
# under CI the tests run anyway and fail on the missing data: a skip there would hide a break
needs_data = pytest.mark.skipif(DATA is None and not IN_CI, reason="no offline data copy (shared/data or $SPARTA_DATA_DIR)")


def load(name: str, split: str, data_dir: Path | None, **task_cfg):
    cfg = TaskConfig(name=name, **task_cfg)
    return load_split(resolve_task(cfg), cfg, split, data_dir)


def one_line_error(call, *names: str) -> str:
    """Runs `call`, expecting a one-line SpartaError that names each of `names`."""
    with pytest.raises(SpartaError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    return message


# ---------------------------------------------------------------- GLUE, real files

GLUE_COUNTS = [
    # task, split, rows, label counts (class id -> rows) from the data README
    ("cola", "train", 8551, {1: 6023, 0: 2528}),
    ("cola", "validation", 1043, {1: 721, 0: 322}),
    ("sst2", "train", 67349, {1: 37569, 0: 29780}),
    ("sst2", "validation", 872, {1: 444, 0: 428}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194}),
    ("mrpc", "validation", 408, {1: 279, 0: 129}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}),  # 0 = entailment
    ("rte", "validation", 277, {0: 146, 1: 131}),
    ("wnli", "train", 635, {0: 323, 1: 312}),
    ("wnli", "validation", 71, {0: 40, 1: 31}),
    ("qnli", "train", 10293, {0: 5173, 1: 5120}),
    ("qnli", "validation", 5463, {0: 2702, 1: 2761}),
    ("mnli", "train", 10471, {0: 3565, 1: 3470, 2: 3436}),  # entailment, neutral, contradiction
    ("qqp", "train", 10309, {0: 6527, 1: 3782}),
]


@needs_data
@pytest.mark.parametrize(("name", "split", "rows", "counts"), GLUE_COUNTS)
def test_glue_rows_and_labels(name: str, split: str, rows: int, counts: dict[int, int]) -> None:
    task = resolve_task(TaskConfig(name=name))
    dataset = load(name, split, DATA)
    assert len(dataset) == rows
    assert Counter(dataset["label"]) == counts
    assert dataset.column_names == [*task.text_fields, "label"]
    assert all(isinstance(dataset[0][field], str) and dataset[0][field] for field in task.text_fields)


@needs_data
@pytest.mark.parametrize(("split", "rows", "mean"), [("train", 5749, 2.701), ("validation", 1500, 2.364)])
def test_stsb_is_regression(split: str, rows: int, mean: float) -> None:
    dataset = load("stsb", split, DATA)
    assert len(dataset) == rows
    assert sum(dataset["label"]) / rows == pytest.approx(mean, abs=5e-4)
    assert dataset.features["label"].dtype == "float32"
    first = {"train": ("A plane is taking off.", "An air plane is taking off.", 5.0),
             "validation": ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)}[split]
    assert tuple(dataset[0].values()) == first


@needs_data
@pytest.mark.parametrize(("name", "missing"), [("mnli", "dev_matched.tsv"), ("qqp", "dev.tsv")])
def test_missing_dev_file_is_named(name: str, missing: str) -> None:
    one_line_error(lambda: load(name, "validation", DATA), missing, "data.dir")


@needs_data
def test_data_root_and_glue_folder_both_work() -> None:
    from_root = load("rte", "validation", DATA)
    from_glue = load("rte", "validation", DATA / "glue")
    assert from_root.to_dict() == from_glue.to_dict()


@needs_data
def test_cola_first_line_is_data() -> None:
    dataset = load("cola", "train", DATA)
    assert dataset[0] == {"sentence": "Our friends won't buy this analysis, let alone the next one we propose.", "label": 1}


@needs_data
def test_mrpc_bom_header_is_skipped() -> None:
    dataset = load("mrpc", "train", DATA)
    assert dataset[0]["sentence1"].startswith("Amrozi accused his brother")
    assert dataset[0]["label"] == 1


@needs_data
def test_quotes_are_text() -> None:
    # MRPC dev row 1 has an unbalanced `"`: GLUE quotes nothing, so it stays in the sentence.
    assert load("mrpc", "validation", DATA)[0]["sentence2"].startswith('" The foodservice pie business')


# ---------------------------------------------------------------- GLUE, tiny files

MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                   "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def mnli_dev_row(index: int, premise: str, hypothesis: str, label: str) -> str:
    return "\t".join([str(index), "1", f"{index}e", "fiction", "(x)", "(y)", "(ROOT x)", "(ROOT y)",
                      premise, hypothesis, label, label, label, label, label, label])


@pytest.fixture
def mnli_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "glue" / "MNLI"
    folder.mkdir(parents=True)
    (folder / "dev_matched.tsv").write_text("\n".join([
        MNLI_DEV_HEADER,
        mnli_dev_row(0, 'He said "no.', "He refused.", "entailment"),
        mnli_dev_row(1, "It rained.", "It was dry.", "contradiction"),
    ]) + "\n")
    (folder / "dev_mismatched.tsv").write_text("\n".join([
        MNLI_DEV_HEADER,
        mnli_dev_row(0, "A cat sat.", "An animal sat.", "entailment"),
        mnli_dev_row(1, "A dog ran.", "The dog is fast.", "neutral"),
        mnli_dev_row(2, "Snow fell.", "Nothing fell.", "contradiction"),
    ]) + "\n")
    test_header = "\t".join(MNLI_DEV_HEADER.split("\t")[:10])
    (folder / "test_matched.tsv").write_text(f"{test_header}\n0\t1\t1e\tfiction\t(x)\t(y)\t(R x)\t(R y)\tA.\tB.\n")
    return tmp_path


def test_mnli_matched_and_mismatched(mnli_dir: Path) -> None:
    task = resolve_task(TaskConfig(name="mnli"))
    assert task.eval_splits == ("validation_matched", "validation_mismatched")
    assert task.metric_suffixes == {"validation_mismatched": "_mm"}
    matched = load("mnli", "validation_matched", mnli_dir)
    assert matched.to_dict() == {"premise": ['He said "no.', "It rained."], "hypothesis": ["He refused.", "It was dry."],
                                 "label": [0, 2]}
    mismatched = load("mnli", "validation_mismatched", mnli_dir / "glue")
    assert mismatched["label"] == [0, 1, 2]
    assert load("mnli", "validation", mnli_dir).to_dict() == matched.to_dict()  # alias of the matched half


def test_glue_test_split_has_no_labels(mnli_dir: Path, tmp_path: Path) -> None:
    assert load("mnli", "test", mnli_dir).to_dict() == {"premise": ["A."], "hypothesis": ["B."], "label": [-1]}
    sst = tmp_path / "SST-2"
    sst.mkdir()
    (sst / "test.tsv").write_text("index\tsentence\n0\tuneasy mishmash of styles and genres .\n1\tgood .\n")
    assert load("sst2", "test", tmp_path)["label"] == [-1, -1]


def test_glue_label_outside_set_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "RTE").mkdir()
    path = tmp_path / "RTE" / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tneutral\n")
    message = one_line_error(lambda: load("rte", "validation", tmp_path), str(path), "line 3", "'neutral'")
    assert "entailment, not_entailment" in message


def test_glue_short_row_names_line(tmp_path: Path) -> None:
    (tmp_path / "WNLI").mkdir()
    path = tmp_path / "WNLI" / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\tno tabs here\n")
    one_line_error(lambda: load("wnli", "train", tmp_path), str(path), "line 3")


def test_glue_empty_file(tmp_path: Path) -> None:
    (tmp_path / "SST-2").mkdir()
    path = tmp_path / "SST-2" / "train.tsv"
    path.write_text("sentence\tlabel\n")
    one_line_error(lambda: load("sst2", "train", tmp_path), str(path), "no data rows")


def test_glue_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "CoLA").mkdir()
    path = tmp_path / "CoLA" / "train.tsv"
    path.write_bytes("gj04\t1\t\tfine .\ngj04\t0\t\tcaf\xe9 .\n".encode("latin-1"))
    one_line_error(lambda: load("cola", "train", tmp_path), str(path), "UTF-8", "line 2")


def test_missing_glue_folder(tmp_path: Path) -> None:
    one_line_error(lambda: load("qnli", "train", tmp_path), "QNLI", str(tmp_path / "glue" / "QNLI"), "data.dir")
    one_line_error(lambda: load("qnli", "train", tmp_path / "nowhere"), str(tmp_path / "nowhere"), "does not exist")


# ---------------------------------------------------------------- IMDB


@pytest.fixture(scope="module")
def imdb():
    if DATA is None:
        require_or_skip("no offline data copy (shared/data or $SPARTA_DATA_DIR)")
    return {split: load("imdb", split, DATA) for split in ("train", "test")}


def test_imdb_counts(imdb) -> None:
    for split in ("train", "test"):
        assert len(imdb[split]) == 25000
        assert Counter(imdb[split]["label"]) == {0: 12500, 1: 12500}
        assert imdb[split].column_names == ["text", "label"]
    assert "<br />" in "".join(imdb["train"][:50]["text"])  # text kept verbatim


def test_imdb_tasks_and_aliases() -> None:
    task = resolve_task(TaskConfig(name="imdb"))
    assert task.eval_splits == ("test",)
    assert split_names(task) == ("train", "test")
    assert task.label_names == ("neg", "pos")


def test_imdb_missing_folder(tmp_path: Path) -> None:
    one_line_error(lambda: load("imdb", "validation", tmp_path), str(tmp_path / "imdb"))


# ---------------------------------------------------------------- MMLU


def test_mmlu_categories_cover_57_subjects() -> None:
    assert len(MMLU_CATEGORIES) == 57
    assert Counter(MMLU_CATEGORIES.values()) == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}


@needs_data
@pytest.mark.parametrize(("split", "rows", "counts"), [
    ("dev", 285, {0: 67, 1: 69, 2: 71, 3: 78}),
    ("val", 1531, {0: 381, 1: 379, 2: 387, 3: 384}),
    ("test", 14042, {0: 3222, 1: 3462, 2: 3582, 3: 3776}),
])
def test_mmlu_splits(split: str, rows: int, counts: dict[int, int]) -> None:
    dataset = load("mmlu", split, DATA)
    assert len(dataset) == rows
    assert Counter(dataset["label"]) == counts
    assert set(dataset["subject"]) == set(MMLU_CATEGORIES)
    assert dataset.column_names == ["prompt", "subject", "label"]
    assert all("\nA. " in prompt and prompt.endswith("\nAnswer:") for prompt in dataset["prompt"])


@needs_data
def test_mmlu_classifier_prompt_is_the_question() -> None:
    row = load("mmlu", "validation", DATA)[0]
    assert row["subject"] == "abstract_algebra"
    assert row["prompt"].startswith("The cyclic subgroup of Z_24 generated by 18 has order\nA. 4\n")
    assert "The following are" not in row["prompt"]


@needs_data
@pytest.mark.parametrize("shots", [0, 1, 5])
def test_mmlu_lm_prompt_has_k_dev_examples(shots: int) -> None:
    validation = load("mmlu", "validation", DATA, head="lm", shots=shots)
    dev = load("mmlu", "dev", DATA)
    prompt = validation[0]["prompt"]
    assert prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert prompt.endswith("Answer:")
    worked = [line for line in prompt.split("\n") if line.startswith("Answer: ")]
    assert len(worked) == shots
    for example in dev.filter(lambda row: row["subject"] == "abstract_algebra")["prompt"][:shots]:
        assert example in prompt


@needs_data
def test_mmlu_has_no_local_train_split() -> None:
    one_line_error(lambda: load("mmlu", "train", DATA), "auxiliary_train")


def test_mmlu_task_shape() -> None:
    task = resolve_task(TaskConfig(name="mmlu"))
    assert (task.text_fields, task.label_names, task.num_labels) == (("prompt",), ("A", "B", "C", "D"), 4)
    assert task.eval_splits == ("validation",)
    assert split_names(task) == ("train", "dev", "validation", "test")


def test_format_mmlu_prompt() -> None:
    assert format_mmlu_prompt("2+2?", ["1", "2", "3", "4"]) == "2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    assert format_mmlu_prompt("2+2?", ["1", "2", "3", "4"], answer=3).endswith("Answer: D")


def test_mmlu_prompt_with_shots() -> None:
    shot = {"question": "1+1?", "choices": ["2", "3", "4", "5"], "answer": 0, "subject": "elementary_mathematics"}
    row = {"question": "2+2?", "choices": ["1", "2", "3", "4"], "answer": 3, "subject": "elementary_mathematics"}
    assert mmlu_prompt_with_shots(row, [shot]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
        "2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )


def test_mmlu_bad_answer_names_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "mmlu" / "val"
    folder.mkdir(parents=True)
    path = folder / "abstract_algebra_val.csv"
    path.write_text('"Q1",a,b,c,d,A\n"Q2",a,b,c,d,E\n')
    one_line_error(lambda: load("mmlu", "validation", tmp_path), str(path), "line 2")


def test_shots_need_mmlu_lm_head() -> None:
    one_line_error(lambda: resolve_task(TaskConfig(name="mmlu", shots=3)), "task.shots", "task.head")
    one_line_error(lambda: resolve_task(TaskConfig(name="sst2", head="lm", shots=3)), "task.shots")


# ---------------------------------------------------------------- task table


def test_glue_task_shapes() -> None:
    assert resolve_task(TaskConfig(name="sst2")).label_names == ("negative", "positive")
    assert resolve_task(TaskConfig(name="cola")).main_metric == "matthews_correlation"
    assert resolve_task(TaskConfig(name="wnli")).label_names == ("not_entailment", "entailment")
    mnli = resolve_task(TaskConfig(name="mnli"))
    assert mnli.label_names == ("entailment", "neutral", "contradiction")
    assert mnli.text_fields == ("premise", "hypothesis")
    stsb = resolve_task(TaskConfig(name="STS-B"))
    assert (stsb.name, stsb.is_regression, stsb.num_labels, stsb.main_metric) == ("stsb", True, 1, "combined_score")
    assert set(KNOWN_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "imdb", "mmlu"}


def test_unknown_task_suggests_closest() -> None:
    message = one_line_error(lambda: resolve_task(TaskConfig(name="sst")), "`sst2`", "mnli", "task.type")
    assert message.startswith("unknown task `sst`")


def test_unknown_split() -> None:
    one_line_error(lambda: load("rte", "dev_set", None), "rte", "train, validation, test")


def test_hub_without_internet_says_what_to_do(tmp_path: Path) -> None:
    # A fresh interpreter, offline from the start with an empty cache: never touches the network.
    script = ("from sparta_cli.config import TaskConfig\nfrom sparta_cli.tasks import load_split, resolve_task\n"
              "from sparta_cli.errors import SpartaError\ncfg = TaskConfig(name='sst2')\n"
              "try:\n    load_split(resolve_task(cfg), cfg, 'validation', None)\n"
              "except SpartaError as exc:\n    print(exc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_DATASETS_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False,
                            cwd=Path(__file__).resolve().parents[1])
    assert "no internet: set data.dir or $SPARTA_DATA_DIR to a local copy" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------- your own data


def custom(tmp_path: Path, kind: str, **files: str) -> tuple[TaskConfig, dict[str, Path]]:
    """Writes `files` (split -> content; the name's extension picks the format) and the TaskConfig for them."""
    paths = {}
    for key, content in files.items():
        split, ext = key.rsplit("_", 1)
        paths[split] = tmp_path / f"{split}.{ext}"
        paths[split].write_text(content)
    cfg = TaskConfig(type=kind, text_fields=["a", "b"], label_field="y",
                     **{f"{split}_file": str(path) for split, path in paths.items()})
    return cfg, paths


def load_custom(cfg: TaskConfig, split: str):
    return load_split(resolve_task(cfg), cfg, split, None)


@pytest.mark.parametrize("ext,train,validation", [
    ("csv", 'a,b,y\n"x, with comma",p,pos\nq,r,neg\n', "a,b,y\ns,t,pos\n"),
    ("tsv", 'a\tb\ty\n"quoted x\tp\tpos\nq\tr\tneg\n', "a\tb\ty\ns\tt\tpos\n"),
    ("jsonl", '{"a": "x", "b": "p", "y": "pos"}\n\n{"a": "q", "b": "r", "y": "neg"}\n', '{"a": "s", "b": "t", "y": "pos"}\n'),
])
def test_custom_classification(tmp_path: Path, ext: str, train: str, validation: str) -> None:
    cfg, _ = custom(tmp_path, "classification", **{f"train_{ext}": train, f"validation_{ext}": validation})
    task = resolve_task(cfg)
    assert (task.label_names, task.num_labels, task.main_metric) == (("neg", "pos"), 2, "accuracy")
    assert (task.eval_splits, split_names(task), task.text_fields) == (("validation",), ("train", "validation"), ("a", "b"))
    dataset = load_custom(cfg, "train")
    assert dataset["label"] == [1, 0]
    assert dataset["a"][0] == {"csv": "x, with comma", "tsv": '"quoted x', "jsonl": "x"}[ext]
    assert load_custom(cfg, "validation")["label"] == [1]


def test_custom_numeric_labels_sort_as_numbers(tmp_path: Path) -> None:
    rows = "".join(f'{{"a": "t{i}", "b": "u", "y": {i}}}\n' for i in (10, 2, 0, 1))
    cfg, _ = custom(tmp_path, "classification", train_jsonl=rows)
    task = resolve_task(cfg)
    assert task.label_names == ("0", "1", "2", "10")
    assert load_custom(cfg, "train")["label"] == [3, 2, 0, 1]


def test_custom_regression(tmp_path: Path) -> None:
    cfg, _ = custom(tmp_path, "regression", train_csv="a,b,y\nx,p,0.5\nq,r,4\n", validation_jsonl='{"a": "s", "b": "t", "y": 2.25}\n')
    task = resolve_task(cfg)
    assert (task.label_names, task.is_regression, task.main_metric) == (None, True, "combined_score")
    assert load_custom(cfg, "train")["label"] == [0.5, 4.0]
    assert load_custom(cfg, "validation")["label"] == [2.25]


def test_custom_regression_label_must_be_a_number(tmp_path: Path) -> None:
    cfg, paths = custom(tmp_path, "regression", train_csv="a,b,y\nx,p,0.5\nq,r,high\n")
    one_line_error(lambda: load_custom(cfg, "train"), str(paths["train"]), "line 3", "'high'")


def test_custom_test_file_without_labels(tmp_path: Path) -> None:
    cfg, _ = custom(tmp_path, "classification", train_csv="a,b,y\nx,p,pos\nq,r,neg\n", test_csv="a,b\ns,t\nu,v\n")
    assert load_custom(cfg, "test").to_dict() == {"a": ["s", "u"], "b": ["t", "v"], "label": [-1, -1]}


def test_custom_validation_label_outside_train_set(tmp_path: Path) -> None:
    cfg, paths = custom(tmp_path, "classification", train_csv="a,b,y\nx,p,pos\nq,r,neg\n",
                        validation_csv="a,b,y\ns,t,pos\nu,v,neutral\n")
    message = one_line_error(lambda: load_custom(cfg, "validation"), str(paths["validation"]), "line 3", "'neutral'")
    assert "neg, pos" in message


def test_custom_missing_column(tmp_path: Path) -> None:
    cfg, paths = custom(tmp_path, "classification", train_csv="a,text,y\nx,p,pos\nq,r,neg\n")
    one_line_error(lambda: load_custom(cfg, "train"), str(paths["train"]), "`b`", "task.text_fields")
    cfg, paths = custom(tmp_path, "classification", train_csv="a,b,label\nx,p,pos\n")
    one_line_error(lambda: resolve_task(cfg), str(paths["train"]), "`y`", "task.label_field")


def test_custom_missing_jsonl_field_names_line(tmp_path: Path) -> None:
    cfg, paths = custom(tmp_path, "classification", train_jsonl='{"a": "x", "b": "p", "y": 1}\n{"a": "q", "y": 0}\n')
    one_line_error(lambda: load_custom(cfg, "train"), str(paths["train"]), "line 2", "`b`")


def test_custom_empty_file(tmp_path: Path) -> None:
    cfg, paths = custom(tmp_path, "classification", train_csv="a,b,y\n")
    one_line_error(lambda: resolve_task(cfg), str(paths["train"]), "no data rows")
    cfg, paths = custom(tmp_path, "regression", train_jsonl="")
    one_line_error(lambda: load_custom(cfg, "train"), str(paths["train"]), "no data rows")


def test_custom_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes("a,b,y\nx,p,pos\ncaf\xe9,r,neg\n".encode("latin-1"))
    cfg = TaskConfig(type="classification", train_file=str(path), text_fields=["a", "b"], label_field="y")
    one_line_error(lambda: resolve_task(cfg), str(path), "UTF-8", "line 3")


def test_custom_missing_file_and_split(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    cfg = TaskConfig(type="regression", validation_file=str(missing), text_fields=["a"])
    task = resolve_task(cfg)  # regression reads nothing up front
    one_line_error(lambda: load_split(task, cfg, "validation", None), str(missing), "task.validation_file")
    one_line_error(lambda: load_split(task, cfg, "train", None), "task.train_file")


def test_custom_wrong_row_width_and_type(tmp_path: Path) -> None:
    cfg, paths = custom(tmp_path, "classification", train_csv="a,b,y\nx,p,pos\nq,r\n")
    one_line_error(lambda: resolve_task(cfg), str(paths["train"]), "line 3")
    txt = tmp_path / "train.txt"
    txt.write_text("a b y\n")
    cfg = TaskConfig(type="classification", train_file=str(txt), text_fields=["a"], label_field="y")
    one_line_error(lambda: resolve_task(cfg), str(txt), ".csv, .tsv or .jsonl")
