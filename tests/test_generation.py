"""Generation: the metrics against hand-computed values, batched left-padded generation against a plain
token-by-token greedy loop, reproducible sampling, the prompts of `sparta generate` and its file safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparta_cli.errors import SpartaError
from sparta_cli.generation import (
    Sampling,
    completion_ids,
    exact_match,
    generate,
    generation_metrics,
    lcs_length,
    normalize_answer,
    prompt_ids,
    rouge_l,
    score_generations,
    stop_ids,
)
from sparta_cli.sft import parse_prompts, parse_records, resolve_chat_template, tokenize_row
from tests.conftest import CHATML_TEMPLATE, make_byte_tokenizer
from tests.test_sft_data import LLAMA3_TEMPLATE

# ---------------------------------------------------------------- metrics (hand-computed)


def test_normalised_exact_match_is_squads():
    assert normalize_answer("  The Cat, sat!  on\tA mat. ") == "cat sat on mat"
    assert normalize_answer("An apple") == "apple" and normalize_answer("Theory") == "theory"  # whole words only
    assert exact_match("Positive.", "positive") == 1.0 and exact_match("The answer is B", "B") == 0.0
    assert exact_match("", "") == 1.0


def test_rouge_l_is_the_f1_of_the_token_lcs():
    assert lcs_length("a b c d".split(), "b d e".split()) == 2
    assert lcs_length("the cat sat on the mat".split(), "the cat is on the mat".split()) == 5
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)  # P = R = 5/6
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)  # P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("Don't-stop", "don t stop") == 1.0  # rouge_score's tokens: runs of letters and digits
    assert rouge_l("", "x") == 0.0 and rouge_l("y", "x") == 0.0
    assert score_generations(["positive", "a b c d"], ["Positive!", "b d e"]) == pytest.approx(
        {"exact_match": 0.5, "rouge_l": (1 + 4 / 7) / 2})


def test_sampling_settings_are_checked():
    for settings, message in (({"max_new_tokens": 0}, "--max-new-tokens 0"), ({"temperature": -1.0}, "--temperature -1.0"),
                              ({"temperature": float("nan")}, "--temperature nan"), ({"top_p": 0.0}, r"--top-p 0.0 is not in \(0, 1\]"),
                              ({"batch_size": 0}, "--batch-size 0"), ({"temperature": float("inf")}, "--temperature inf is infinite"),
                              ({"seed": 2**64}, "--seed 18446744073709551616 is out of range: use 0 to 4294967295")):
        with pytest.raises(SpartaError, match=message):
            Sampling(**settings)
    assert Sampling.of(max_new_tokens=None, seed=3) == Sampling(seed=3)


def test_a_completion_ends_before_its_first_stop_token():
    assert completion_ids([5, 6, 9, 7, 9], stops=[9]) == [5, 6]
    assert completion_ids([5, 6], stops=[9]) == [5, 6]


def test_the_end_of_turn_token_comes_from_the_template(tmp_path):
    tokenizer = make_byte_tokenizer()  # EOS <|eot_id|>
    assert tokenizer.convert_ids_to_tokens(stop_ids(tokenizer, CHATML_TEMPLATE)) == ["<|eot_id|>", "<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens(stop_ids(tokenizer, LLAMA3_TEMPLATE)) == ["<|eot_id|>"]
    assert stop_ids(tokenizer) == [tokenizer.eos_token_id]


# ---------------------------------------------------------------- generation on a tiny random chat Llama


@pytest.fixture(scope="module")
def chat_lm(tiny_chat_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir).eval()
    return model, tokenizer, resolve_chat_template(tokenizer)


def reference_greedy(model, ids: list[int], steps: int, stops: list[int]) -> list[int]:
    """The plain reference: one prompt, no padding, no cache, the argmax of the full forward each step."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
    return out


CONVERSATIONS = [[{"role": "user", "content": "Hi"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]]


def test_batched_left_padded_greedy_is_the_token_by_token_argmax(chat_lm):
    model, tokenizer, template = chat_lm
    rows = parse_prompts([(f"line {n}", {"messages": messages}) for n, messages in enumerate(CONVERSATIONS, 1)], chat=True)
    prompts = prompt_ids(rows, tokenizer, template)
    assert len({len(ids) for ids in prompts}) == 3  # three lengths: the batch is padded
    completions = generate(model, tokenizer, prompts, Sampling(max_new_tokens=6, batch_size=3), template)
    stops = stop_ids(tokenizer, template)
    expected = [tokenizer.decode(reference_greedy(model, ids, 6, stops), skip_special_tokens=True) for ids in prompts]
    assert completions == expected and all(completions)


def test_sampling_is_reproducible_from_its_seed_and_leaves_the_callers_rng(chat_lm):
    model, tokenizer, template = chat_lm
    prompts = prompt_ids(parse_prompts([("x", {"prompt": "Hi"}), ("y", {"prompt": "Yo"})], chat=True), tokenizer, template)
    sampled = Sampling(max_new_tokens=5, temperature=1.0, top_p=0.95, seed=5)
    torch.manual_seed(123)
    first = generate(model, tokenizer, prompts, sampled, template)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert generate(model, tokenizer, prompts, sampled, template) == first and torch.equal(torch.rand(1), after)
    assert generate(model, tokenizer, prompts, Sampling(max_new_tokens=5, temperature=1.0, top_p=0.95, seed=6), template) != first
    assert generate(model, tokenizer, prompts, Sampling(max_new_tokens=5), template) != first  # greedy is another draw


def test_generation_metrics_score_the_greedy_answers_against_the_last_assistant_turn(chat_lm):
    model, tokenizer, template = chat_lm
    rows = parse_records([(f"v {n}", {"messages": [*messages, {"role": "assistant", "content": "Paris"}]})
                          for n, messages in enumerate(CONVERSATIONS, 1)]).rows
    prompts = prompt_ids(parse_prompts([("p", {"messages": messages}) for messages in CONVERSATIONS], chat=True), tokenizer, template)
    stops = stop_ids(tokenizer, template)
    answers = [tokenizer.decode(reference_greedy(model, ids, 4, stops), skip_special_tokens=True) for ids in prompts]
    assert generation_metrics(model, tokenizer, rows, template, Sampling(max_new_tokens=4)) == score_generations(answers, ["Paris"] * 3)


def test_a_prompt_is_rendered_as_training_rendered_it(chat_lm):
    _, tokenizer, template = chat_lm
    trained = tokenize_row(parse_records([("t", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})]).rows[0],
                           tokenizer, template)
    prompt = prompt_ids(parse_prompts([("p", {"prompt": "Hi"})], chat=True), tokenizer, template)[0]
    first_answer_token = trained.labels.index(next(label for label in trained.labels if label != -100))
    assert trained.input_ids[:first_answer_token] == prompt
    plain = prompt_ids(parse_prompts([("p", {"prompt": "Hi"})], chat=False), tokenizer)[0]
    assert plain == tokenizer("Hi")["input_ids"] and tokenizer.decode(plain) == "Hi"  # no template: the text as it is


# ---------------------------------------------------------------- the rows of `sparta generate --file`


def test_prompt_rows_and_their_errors():
    rows = parse_prompts([("f line 1", {"prompt": "Hi", "completion": "ignored", "id": 7}),
                          ("f line 2", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ref"}]}),
                          ("f line 3", {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]})], chat=True)
    assert [row.messages for row in rows] == [({"role": "user", "content": "Hi"},), ({"role": "user", "content": "Q"},),
                                              ({"role": "system", "content": "S"}, {"role": "user", "content": "Q"})]
    assert rows[0].prompt == "Hi" and all(row.prompt_messages == len(row.messages) for row in rows)
    user = {"role": "user", "content": "Q"}
    cases = [({"prompt": "Q", "messages": [user]}, "f line 1: the row has both `messages` and `prompt`: keep one"),
             ({"text": "Q"}, r"f line 1: no `prompt` or `messages` to generate from \(it has: `text`\)"),
             ({"prompt": " "}, "f line 1: `prompt` is empty"),
             ({"prompt": [user, {"role": "assistant", "content": "A"}]}, "f line 1: `prompt` must open with a user turn .* and end with"),
             ({"messages": [{"role": "tool", "content": "Q"}]}, "f line 1: messages item 1 has role \"tool\""),
             ({"messages": "[{\"role\": \"user\"}]"}, "f line 1: messages item 1 is not a"),
             ({"messages": [{"role": "assistant", "content": "A"}]}, "f line 1: `messages` must open with a user turn")]
    for record, message in cases:
        with pytest.raises(SpartaError, match=message):
            parse_prompts([("f line 1", record)], chat=True)
    with pytest.raises(SpartaError, match="has no rows"):
        parse_prompts([], chat=True)


def test_generate_overwrite_replaces_its_own_output_and_never_a_users_file(tiny_chat_lm_dir, tmp_path):
    from sparta_cli.generate_cmd import run_generate

    out, mine = tmp_path / "out.jsonl", tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"prompt": "my own rows", "answer": "kept"}) + "\n")
    first = run_generate(str(tiny_chat_lm_dir), prompt="Hi", output=out, sampling=Sampling(max_new_tokens=2))
    again = run_generate(str(tiny_chat_lm_dir), prompt="Hello", output=out, sampling=Sampling(max_new_tokens=2), overwrite=True)
    assert [json.loads(line) for line in out.read_text().splitlines()] == again != first
    with pytest.raises(SpartaError, match="is not an earlier `sparta generate` result"):
        run_generate(str(tiny_chat_lm_dir), prompt="Hi", output=mine, overwrite=True)
    assert json.loads(mine.read_text())["answer"] == "kept"


def test_sparta_generate_writes_jsonl_safely(tiny_chat_lm_dir, tmp_path, capsys):
    from sparta_cli.generate_cmd import run_generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"messages": CONVERSATIONS[2]}) + "\n")
    out = tmp_path / "out.jsonl"
    records = run_generate(str(tiny_chat_lm_dir), file=prompts, output=out, sampling=Sampling(max_new_tokens=3))
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    assert [record["prompt"] for record in records] == ["Hi", CONVERSATIONS[2]]
    with pytest.raises(SpartaError, match="exists: pass --overwrite"):
        run_generate(str(tiny_chat_lm_dir), file=prompts, output=out)
    for output, message in ((prompts, "is the input"), (Path(tiny_chat_lm_dir) / "x.jsonl", "is inside the input"),
                            (tmp_path, "is a folder")):
        with pytest.raises(SpartaError, match=message):
            run_generate(str(tiny_chat_lm_dir), file=prompts, output=output, overwrite=True)
    with pytest.raises(SpartaError, match="needs one input: --prompt TEXT or --file"):
        run_generate(str(tiny_chat_lm_dir), prompt="x", file=prompts)
    with pytest.raises(SpartaError, match="a base model takes model.\\* settings only"):
        run_generate(str(tiny_chat_lm_dir), prompt="x", overrides=["task.name=sst2"])
    capsys.readouterr()
    assert run_generate(str(tiny_chat_lm_dir), prompt="Hi", sampling=Sampling(max_new_tokens=3)) == records[:1]
    assert json.loads(capsys.readouterr().out) == records[0]  # no --output: the rows on stdout


# ---------------------------------------------------------------- a run's prompts, rendered as it trained


def test_a_run_trained_on_string_prompts_generates_from_the_plain_prompt_it_trained_on(tiny_chat_lm_dir, tmp_path):
    """prompt_completion rows of strings, task.format left out: the run records the format and that no chat
    template rendered its rows, so `sparta generate` gives the model the prompt's plain ids (the tokenizer's,
    as training tokenised it), not the chat template's rendering; a run written before it recorded that
    (format null, no `chat`) is taken as chat, as before."""
    from transformers import AutoTokenizer

    from sparta_cli.config import build_recipe
    from sparta_cli.generate_cmd import load_generator, prompt_rows, prompt_template, resolve_target
    from sparta_cli.merge import merge_runs
    from sparta_cli.train import train

    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in ((3, 4), (10, 20), (7, 7), (41, 1))]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = train(build_recipe({"model": {"name_or_path": str(tiny_chat_lm_dir)}, "adapter": {"method": "sparta", "density": 0.5, "targets": ["v", "o"]},
                              "task": {"type": "sft", "train_file": str(data)}, "data": {"max_length": 32},
                              "training": {"batch_size": 4, "max_steps": 1, "log_every": 1}, "seed": 3, "output_dir": str(tmp_path / "run")}))
    config_path = run / "adapter_config.json"
    task = json.loads(config_path.read_text())["task"]
    assert (task["format"], task["chat"]) == ("prompt_completion", False)

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_lm_dir)
    plain = tokenizer("3+4=", add_special_tokens=True)["input_ids"]  # the reference, by hand
    trained = tokenize_row(parse_records([("t", rows[0])]).rows[0], tokenizer)
    assert trained.input_ids[:len(plain)] == plain and all(label == -100 for label in trained.labels[:len(plain)])
    generator = load_generator(resolve_target(str(run)))
    assert generator.template is None
    assert prompt_ids(prompt_rows("3+4=", None, chat=False), generator.tokenizer, generator.template) == [plain]
    merge_runs([run], output=tmp_path / "merged")  # its merge records that, so the checkpoint generates as the run does
    assert load_generator(resolve_target(str(tmp_path / "merged"))).template is None

    # a run written before runs recorded `chat` renders as it did then: format null meant chat
    config = json.loads(config_path.read_text())
    config["task"] = {key: value for key, value in config["task"].items() if key != "chat"} | {"format": None}
    config_path.write_text(json.dumps(config))
    old = resolve_target(str(run))
    template = prompt_template(tokenizer, old.template_file, old.chat)  # what load_generator renders with
    assert old.chat and template == tokenizer.chat_template
    chat = prompt_ids(prompt_rows("3+4=", None, chat=True), tokenizer, template)[0]
    assert chat == tokenizer.apply_chat_template([{"role": "user", "content": "3+4="}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"] and chat != plain
