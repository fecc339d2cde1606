"""What an SFT run gives (issue 22): generation metrics at evaluation, `sparta generate` on the run, its
merged causal-LM checkpoint (plain transformers, the same greedy tokens), and its PEFT (SHiRA) and
peft_sparta exports (the run's logits, its weights). One real run of a tiny tied-embedding Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sparta_cli.config import build_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.generation import ANSWER_ROOM, Sampling, score_generations, stop_ids
from sparta_cli.runs import ADAPTER_FILE, TRAINED_PREFIX, TRAINER_LOG, read_run
from tests.test_generation import reference_greedy

QUESTIONS = [(3, 4), (10, 20), (7, 7), (41, 1), (5, 50), (12, 30), (9, 0), (2, 2)]


def _chat(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                                     {"role": "assistant", "content": str(a + b)}]}) + "\n" for a, b in pairs))
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_chat_lm_dir) -> Path:
    """A SpaRTA run with generation metrics on its first 2 validation prompts (4 steps, ~5 s)."""
    from sparta_cli.train import train

    root = tmp_path_factory.mktemp("sft-run")
    recipe = build_recipe({
        "model": {"name_or_path": str(tiny_chat_lm_dir)},
        "adapter": {"method": "sparta", "density": 0.5, "targets": ["v", "o"]},
        "task": {"type": "sft", "train_file": str(_chat(root / "train.jsonl", QUESTIONS)),
                 "validation_file": str(_chat(root / "val.jsonl", QUESTIONS[:4])), "generation_metrics": True},
        "data": {"max_length": 64},
        "training": {"batch_size": 4, "lr": 0.05, "max_steps": 4, "eval_generate_samples": 2, "log_every": 4},
        "seed": 3,
        "output_dir": str(root / "run"),
    })
    return train(recipe)


@pytest.fixture(scope="module")
def run_model(sft_run):
    from sparta_cli.config import ModelConfig
    from sparta_cli.models import load_for_causal_lm
    from sparta_cli.tuners import load_adapter

    run = read_run(sft_run, tensors=False)
    loaded = load_for_causal_lm(ModelConfig(name_or_path=run.base["name_or_path"], dtype="float32"))
    return load_adapter(sft_run, loaded.model, run.config).model.eval(), loaded.tokenizer


def _prompts(tokenizer, pairs) -> list[list[int]]:
    messages = [[{"role": "user", "content": f"{a}+{b}"}] for a, b in pairs]
    return [tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"] for m in messages]


def test_training_logs_generation_metrics_of_the_runs_greedy_answers(sft_run, run_model):
    model, tokenizer = run_model
    stops = stop_ids(tokenizer, tokenizer.chat_template)
    references = [str(a + b) for a, b in QUESTIONS[:2]]
    room = max(len(tokenizer(reference)["input_ids"]) for reference in references) + ANSWER_ROOM
    answers = [tokenizer.decode(reference_greedy(model, ids, room, stops), skip_special_tokens=True) for ids in _prompts(tokenizer, QUESTIONS[:2])]
    expected = score_generations(answers, references)
    last = [json.loads(line) for line in (sft_run / TRAINER_LOG).read_text().splitlines() if "eval_rouge_l" in line][-1]
    assert last["step"] == 4 and {key: last[f"eval_{key}"] for key in expected} == expected


def test_merged_checkpoint_keeps_the_tie_and_generates_the_runs_greedy_tokens(sft_run, run_model, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sparta_cli.generate_cmd import run_generate
    from sparta_cli.merge import merge_runs

    merged = tmp_path / "merged"
    merge_runs([sft_run], output=merged)
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    with safe_open(str(merged / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # the shared tensor is written once, as the base holds it
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    model, tokenizer = run_model
    stops = stop_ids(tokenizer, tokenizer.chat_template)
    prompts = _prompts(tokenizer, QUESTIONS[:2])
    tokens = [reference_greedy(plain, ids, 8, stops) for ids in prompts]
    assert tokens == [reference_greedy(model, ids, 8, stops) for ids in prompts] and all(tokens)
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a}+{b}"}) + "\n" for a, b in QUESTIONS[:2]))
    sampling, fp32 = Sampling(max_new_tokens=8, batch_size=2), ["model.dtype=float32"]  # as the reference runs (auto: bf16 on a GPU)
    from_run = run_generate(str(sft_run), file=rows, output=tmp_path / "run.jsonl", sampling=sampling, overrides=fp32)
    assert run_generate(str(merged), file=rows, output=tmp_path / "merged.jsonl", sampling=sampling, overrides=fp32) == from_run
    assert [record["completion"] for record in from_run] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens]
    with pytest.raises(SpartaError, match="is inside the input .*: sparta never writes over what it reads"):  # the run's base model
        run_generate(str(sft_run), file=rows, output=Path(read_run(sft_run, tensors=False).base["name_or_path"]) / "x.jsonl")


def test_a_head_trained_apart_from_tied_embeddings_unties_them(sft_run, tiny_chat_lm_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from sparta_cli.export import export_run
    from sparta_cli.merge import merge_runs

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    tensors = load_file(str(run / ADAPTER_FILE))
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir)
    head = base.lm_head.weight.detach() + 0.25
    save_file({**tensors, f"{TRAINED_PREFIX}lm_head.weight": head.contiguous()}, str(run / ADAPTER_FILE), {"format": "pt"})
    merge_runs([run], output=tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.tie_word_embeddings is False
    assert torch.equal(merged.lm_head.weight, head) and torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    with pytest.raises(SpartaError, match="has no trained head; this run trained lm_head.weight whole: use --format sparta or --format peft"):
        export_run(run, format="peft-sparta", output=tmp_path / "ps")


def test_peft_shira_export_gives_the_runs_logits_on_a_causal_lm(sft_run, run_model, tiny_chat_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sparta_cli.export import export_run

    export_run(sft_run, format="peft", output=tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert "AutoModelForCausalLM.from_pretrained(" in (tmp_path / "peft" / "README.md").read_text()
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir), str(tmp_path / "peft")).eval()
    model, tokenizer = run_model
    batch = torch.tensor(_prompts(tokenizer, QUESTIONS[:1]))
    with torch.no_grad():
        assert torch.equal(theirs(batch).logits, model(batch).logits)


def test_peft_sparta_causal_lm_loader_rebuilds_the_runs_weights(sft_run, tiny_chat_lm_dir, tmp_path):
    from peft_sparta import SpaRTAforCausalLM
    from transformers import AutoModelForCausalLM

    from sparta_cli.export import export_run

    export_run(sft_run, format="peft-sparta", output=tmp_path / "ps")
    theirs = SpaRTAforCausalLM(str(tmp_path / "ps"))  # loads the base itself, in bf16
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir, dtype=torch.bfloat16)
    run = read_run(sft_run)
    for name, param in base.named_parameters():  # the reference: each delta added to the bf16 base weight, in fp32
        expected = param.detach().clone()
        module = name.removesuffix(".weight")
        if module in run.indices:
            flat = expected.view(-1)
            flat[run.indices[module].long()] = (flat[run.indices[module].long()].float() + run.deltas[module]).to(torch.bfloat16)
        assert torch.equal(theirs.base_model.get_parameter(name), expected), name
    assert "SpaRTAforCausalLM('ADAPTER_DIR')" in (tmp_path / "ps" / "README.md").read_text()


def test_generate_refuses_a_classifier(tmp_path):
    from sparta_cli.generate_cmd import run_generate

    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(SpartaError, match="is a sequence classifier, which predicts labels, not text: use `sparta predict`"):
        run_generate(str(tmp_path / "clf"), prompt="Hi")


def test_an_sft_run_and_its_merge_are_scored_on_another_task_and_their_own_files(sft_run, tmp_path, data_dir):
    """An SFT run has no task head, so `--task mmlu` scores it on MMLU's letters (as docs/sft.md says), as
    its merge is; a merge of a run on your own files is scored once given a file, and says so when not."""
    from sparta_cli.evaluate_cmd import run_eval
    from sparta_cli.merge import merge_runs

    letters = [f"data.dir={data_dir}", "data.max_eval_samples=4", "task.type=null", "task.head=lm"]
    merged = tmp_path / "merged"
    merge_runs([sft_run], output=merged)
    for target in (sft_run, merged):
        scored = run_eval(str(target), task="mmlu", split="validation", output=tmp_path / f"{target.name}-mmlu.json", overrides=letters)
        assert scored["metrics"]["eval_num_examples"] == 4 and 0 <= scored["metrics"]["eval_accuracy"] <= 1
    with pytest.raises(SpartaError, match="was merged from a run on your own files, which a checkpoint does not carry: "
                                          "pass task.validation_file=FILE"):
        run_eval(str(merged), task=None, split=None, output=tmp_path / "own.json", overrides=[])
    validation = read_run(sft_run, tensors=False).config["task"].get("validation_file") or str(sft_run.parent / "val.jsonl")
    scored = run_eval(str(merged), task=None, split=None, output=tmp_path / "own.json", overrides=[f"task.validation_file={validation}"])
    assert scored["metrics"]["eval_num_examples"] == 4


@pytest.mark.parametrize("method", ["sparta", "lora"])
def test_a_target_tied_to_the_input_embeddings_is_refused_before_the_weights_load(method, tiny_chat_lm_dir, tmp_path):
    """SpaRTA on a tied lm_head wrote W0 + delta into the embeddings too, which merge (untied, embeddings left
    at the base) and every export (deltas dropped, or a PEFT layer on a tied weight) did not reproduce."""
    from sparta_cli.preflight import preflight

    recipe = build_recipe({"model": {"name_or_path": str(tiny_chat_lm_dir)}, "adapter": {"method": method, "targets": ["re:lm_head$"]},
                           "task": {"type": "sft", "train_file": str(_chat(tmp_path / "train.jsonl", QUESTIONS))},
                           "output_dir": str(tmp_path / "run")})
    with pytest.raises(SpartaError, match=r"target `re:lm_head\$` chooses lm_head, whose weight is the input embeddings' "
                                          r"\(tie_word_embeddings\).*leave it out of adapter.targets"):
        preflight(recipe)


def test_a_merge_keeps_the_bases_generation_config_and_runs_of_two_kinds_are_refused(sft_run, tiny_chat_lm_dir, tmp_path):
    """The streamed merge dropped generation_config.json (an instruct model's sampling defaults and extra
    end-of-turn ids); an SFT run merged with a classifier gave a checkpoint that depended on their order."""
    from run_factory import make_run

    from sparta_cli.merge import merge_runs

    base = tmp_path / "base"
    shutil.copytree(tiny_chat_lm_dir, base)
    generation = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1, 2], "temperature": 0.6, "top_p": 0.9}))
    merged = tmp_path / "merged"
    merge_runs([sft_run], output=merged, base=str(base))
    assert json.loads((merged / "generation_config.json").read_text()) == {**generation, "eos_token_id": [1, 2], "temperature": 0.6, "top_p": 0.9}
    classifier = make_run(tmp_path / "classifier", str(tiny_chat_lm_dir))
    for runs in ([sft_run, classifier], [classifier, sft_run]):
        with pytest.raises(SpartaError, match=r"is an SFT run \(a causal LM\) and .*classifier a classification run: merge runs of one kind"):
            merge_runs(runs, output=tmp_path / "mixed")


def test_an_export_carries_the_chat_template_its_run_kept(tiny_chat_lm_dir, tmp_path):
    """No export held the template: once the file was gone (or edited), generate and merge of the export
    failed (or rendered with another)."""
    from sparta_cli.export import export_run
    from sparta_cli.generate_cmd import load_generator, resolve_target
    from sparta_cli.train import train

    template = tmp_path / "chat.jinja"
    template.write_text("# marked\n" + tiny_chat_lm_tokenizer_template(tiny_chat_lm_dir))
    run = train(build_recipe({"model": {"name_or_path": str(tiny_chat_lm_dir)}, "adapter": {"method": "sparta", "density": 0.5, "targets": ["v", "o"]},
                              "task": {"type": "sft", "train_file": str(_chat(tmp_path / "train.jsonl", QUESTIONS)), "chat_template": str(template)},
                              "data": {"max_length": 64}, "training": {"batch_size": 4, "max_steps": 1}, "output_dir": str(tmp_path / "run")}))
    kept = template.read_text()
    template.unlink()
    for format in ("sparta", "peft"):
        export_run(run, format=format, output=tmp_path / format)
        assert (tmp_path / format / "chat_template.jinja").read_text() == kept
    assert load_generator(resolve_target(str(tmp_path / "sparta"))).template == kept


def tiny_chat_lm_tokenizer_template(folder: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).chat_template


def test_a_lora_export_names_the_base_as_the_run_does_not_this_machines_folder(tiny_bert_dir, tmp_path):
    from run_factory import make_run

    from sparta_cli.export import export_run

    run = make_run(tmp_path / "lora", str(tiny_bert_dir), method="lora", targets=("q", "v"))
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model": {**config["base_model"], "name_or_path": "org/tiny-bert"}}))
    export_run(run, format="peft", output=tmp_path / "export")
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-bert"
