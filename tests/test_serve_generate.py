"""`sparta serve` on a causal LM (issue 23 with the SFT work): /v1/completions and /v1/chat/completions
for SFT adapters (SpaRTA swapped in place, LoRA through PEFT) and `base` on one tiny chat Llama, against
a real server on 127.0.0.1: greedy answers under concurrent mixed traffic equal `sparta generate` on
each run alone, token for token; streamed deltas add up to the answer; every refusal is a 4xx naming it."""

from __future__ import annotations

import json
import random
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import import_or_require
from run_factory import make_run
from test_serve import KEY, metric, sparta, start_server, stop_server

from sparta_cli.config import build_recipe
from sparta_cli.generation import Sampling

httpx = import_or_require("httpx")
import_or_require("fastapi")
import_or_require("uvicorn")
import_or_require("peft")

MAX_TOKENS = 8
QUESTIONS = [(3, 4), (10, 20), (7, 7), (41, 1), (5, 50), (12, 30), (9, 0), (2, 2)]
PROMPTS = ["3+4", "10+20", "a longer question: what is 41+1?", "9+0=" * 30]  # the last one is over data.max_length=64: cut
CHATS = [[{"role": "user", "content": "7+7"}],
         [{"role": "system", "content": "Add."}, {"role": "user", "content": "5+50"}],
         [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "12+30"}]]
MODELS = ("sp", "lora", "base")


def _chat_file(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                                     {"role": "assistant", "content": str(a + b)}]}) + "\n" for a, b in QUESTIONS))
    return path


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_chat_lm_dir, tiny_bert_nodropout_dir) -> dict[str, Path]:
    """A SpaRTA and a LoRA SFT run (4 steps each, ~3 s), a copy of the SpaRTA run that drops over-long
    rows, and a classification run, all under one folder (the server's --adapters-dir)."""
    from sparta_cli.train import train

    root = tmp_path_factory.mktemp("serve-sft")
    train_file = _chat_file(root / "train.jsonl")
    adapters = {"sp": {"method": "sparta", "density": 0.5, "targets": ["v", "o"]}, "lora": {"method": "lora", "r": 4, "targets": ["q", "v"]}}
    runs = {}
    for name, adapter in adapters.items():
        runs[name] = train(build_recipe({
            "model": {"name_or_path": str(tiny_chat_lm_dir)}, "adapter": adapter,
            "task": {"type": "sft", "train_file": str(train_file)}, "data": {"max_length": 64},
            "training": {"batch_size": 4, "lr": 0.05, "max_steps": 4, "log_every": 4}, "seed": 3, "output_dir": str(root / name)}))
    shutil.copytree(runs["sp"], root / "drop")
    recipe = yaml.safe_load((root / "drop" / "config.yaml").read_text())
    recipe["data"].update(max_length=40, overlong="drop")
    (root / "drop" / "config.yaml").write_text(yaml.safe_dump(recipe))
    runs["drop"] = root / "drop"
    runs["cls"] = make_run(root / "cls", str(tiny_bert_nodropout_dir), seed=1)
    return runs


@pytest.fixture(scope="module")
def reference(sft_runs, tiny_chat_lm_dir, tmp_path_factory) -> dict[str, dict[str, list[str]]]:
    """Per model, greedy answers of each run loaded alone: chats through `sparta generate` itself, plain
    prompts through the generation it runs (generate_cmd's loader, `generation.generate`), the over-long
    one cut to its last 64 tokens for a run, as its data.overlong: truncate says."""
    from sparta_cli.generate_cmd import load_generator, resolve_target, run_generate
    from sparta_cli.generation import generate
    from sparta_cli.sft import SftRow, generation_prompt

    tmp = tmp_path_factory.mktemp("serve-sft-reference")
    chats = tmp / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in CHATS))
    sampling = Sampling(max_new_tokens=MAX_TOKENS)
    answers = {}
    for name in MODELS:
        target = str(tiny_chat_lm_dir if name == "base" else sft_runs[name])
        chat = [row["completion"] for row in run_generate(target, file=chats, output=tmp / f"{name}.jsonl", sampling=sampling)]
        generator = load_generator(resolve_target(target))
        ids = [generation_prompt(SftRow("p", prompt=text), generator.tokenizer)[0] for text in PROMPTS]
        cut = [row if name == "base" else row[-64:] for row in ids]  # the base has no run, so no data.max_length
        plain = generate(generator.model, generator.tokenizer, cut, sampling, generator.template)
        answers[name] = {"chat": chat, "completion": plain}
    assert len(ids[-1]) > 64 and all(any(texts["completion"]) and any(texts["chat"]) for texts in answers.values())
    return answers


@pytest.fixture(scope="module")
def server(sft_runs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-sft-server")
    key_file = tmp / "key"
    key_file.write_text(KEY + "\n")
    root = sft_runs["sp"].parent
    process, url, log = start_server(tmp, str(sft_runs["sp"]), f"--adapter=lora={sft_runs['lora']}", f"--adapter=drop={sft_runs['drop']}",
                                     "--adapters-dir", str(root), "--api-key-file", str(key_file), "--max-batch", "4", "--max-wait-ms", "5")
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    yield client, log
    client.close()
    assert stop_server(process) == -signal.SIGTERM, log.read_text()


def complete(client, model: str, prompt, **settings) -> dict:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, **settings})
    assert response.status_code == 200, response.text
    return response.json()


def chat(client, model: str, messages, **settings) -> dict:
    response = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": MAX_TOKENS, **settings})
    assert response.status_code == 200, response.text
    return response.json()


def streamed(client, route: str, body: dict) -> tuple[str, list[dict], str]:
    """The concatenated deltas, the chunk objects, and the last event's data."""
    with client.stream("POST", route, json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(event) for event in events[:-1]]
    pieces = [c["choices"][0]["delta"].get("content", "") if c["object"] == "chat.completion.chunk" else c["choices"][0]["text"]
              for c in chunks]
    return "".join(pieces), chunks, events[-1]


def test_models_lists_the_causal_lm_adapters(server):
    client, _ = server
    listed = {model["id"]: model for model in client.get("/v1/models").json()["data"]}
    assert set(listed) == {"base", "sp", "lora", "drop"}
    assert {listed[name]["type"] for name in listed} == {"generation"} and all(listed[name]["chat"] for name in listed)
    assert listed["sp"]["method"] == "sparta" and listed["lora"]["method"] == "lora" and listed["sp"]["resident_bytes"] > 0


def test_concurrent_mixed_traffic_answers_as_sparta_generate_on_each_run_alone(server, reference):
    client, _ = server
    calls = [(name, "completion", i) for name in MODELS for i in range(len(PROMPTS))]
    calls += [(name, "chat", i) for name in MODELS for i in range(len(CHATS))]
    calls += [(name, "batch", 0) for name in MODELS]  # one request with every prompt
    calls = calls * 2
    random.Random(0).shuffle(calls)

    def call(item):
        name, kind, i = item
        if kind == "chat":
            body = chat(client, name, CHATS[i])
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
            return item, [body["choices"][0]["message"]["content"]], body
        body = complete(client, name, PROMPTS if kind == "batch" else PROMPTS[i])
        assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == list(range(len(body["choices"])))
        return item, [c["text"] for c in body["choices"]], body

    with ThreadPoolExecutor(6) as pool:
        for (name, kind, i), texts, body in pool.map(call, calls):
            expected = reference[name]["chat"][i:i + 1] if kind == "chat" else reference[name]["completion"] if kind == "batch" \
                else reference[name]["completion"][i:i + 1]
            assert texts == expected, (name, kind, i)
            usage = body["usage"]
            assert body["model"] == name and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
            assert 0 < usage["completion_tokens"] <= MAX_TOKENS * len(texts)


def test_streamed_deltas_add_up_to_the_answer_and_end_in_done(server, reference):
    client, log = server
    for name in ("sp", "lora"):
        text, chunks, last = streamed(client, "/v1/chat/completions", {"model": name, "messages": CHATS[0], "max_tokens": MAX_TOKENS})
        assert text == reference[name]["chat"][0] and last == "[DONE]"
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
        text, chunks, last = streamed(client, "/v1/completions", {"model": name, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS})
        assert text == reference[name]["completion"][1] and last == "[DONE]" and {c["object"] for c in chunks} == {"text_completion"}
    with client.stream("POST", CHAT, json={"model": "sp", "messages": CHATS[0], "max_tokens": 2000, "stream": True}) as response:
        next(response.iter_lines())  # the client leaves after the first event: the generation is cancelled
    assert chat(client, "sp", CHATS[0])["choices"][0]["message"]["content"] == reference["sp"]["chat"][0]
    assert "Traceback" not in log.read_text()


def test_stop_strings_sampling_seeds_and_generated_token_metrics(server, reference):
    client, _ = server
    answer = reference["sp"]["completion"][0]
    stop = answer[2:4]
    assert len(stop) == 2, answer
    cut = answer[:answer.find(stop)]
    body = complete(client, "sp", PROMPTS[0], stop=[stop, "never in it"])
    assert body["choices"][0]["text"] == cut and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] <= complete(client, "sp", PROMPTS[0])["usage"]["completion_tokens"]
    text, chunks, _ = streamed(client, "/v1/completions", {"model": "sp", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "stop": stop})
    assert text == cut and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    sampled = [complete(client, "lora", PROMPTS[0], temperature=1.0, top_p=0.9, seed=7)["choices"][0]["text"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed reproduces its answer: a sampled request runs alone
    before = metric(client, 'sparta_generated_tokens_total{model="base"}')
    usage = chat(client, "base", CHATS[1])["usage"]
    assert metric(client, 'sparta_generated_tokens_total{model="base"}') == before + usage["completion_tokens"]
    assert metric(client, 'sparta_requests_total{model="base",status="200"}') >= 1


CHAT = "/v1/chat/completions"
DONE = "/v1/completions"


@pytest.mark.parametrize(("route", "body", "status", "says"), [
    (DONE, {"model": "nope", "prompt": "x"}, 404, "unknown model 'nope'"),
    (DONE, {"model": "sp"}, 400, "no `prompt`"),
    (DONE, {"model": "sp", "prompt": 3}, 400, "`prompt` is int"),
    (DONE, {"model": "sp", "prompt": []}, 400, "`prompt` is an empty list"),
    (DONE, {"model": "sp", "prompt": ["x", 1]}, 400, "prompt[1] is int"),
    (DONE, {"model": "sp", "prompt": " "}, 400, "prompt[0] is empty"),
    (DONE, {"model": "sp", "prompt": "x", "max_tokens": 0}, 400, "`max_tokens` 0 is not from 1 to 2048"),
    (DONE, {"model": "sp", "prompt": "x", "max_tokens": 4096}, 400, "`max_tokens` 4096 is not from 1 to 2048"),
    (DONE, {"model": "sp", "prompt": "x", "max_tokens": "8"}, 400, "`max_tokens` is str"),
    (DONE, {"model": "sp", "prompt": "x", "temperature": -1}, 400, "`temperature` -1.0 is negative"),
    (DONE, '{"model": "sp", "prompt": "x", "temperature": Infinity}', 400, "`temperature` inf is negative or not finite"),
    (DONE, '{"model": "sp", "prompt": "x", "top_p": NaN}', 400, "`top_p` nan is not in (0, 1]"),
    (DONE, {"model": "sp", "prompt": "x", "seed": -1}, 400, "`seed` -1 is not from 0"),
    (DONE, {"model": "sp", "prompt": "x", "top_p": 0}, 400, "`top_p` 0.0 is not in (0, 1]"),
    (DONE, {"model": "sp", "prompt": "x", "top_p": 1.5}, 400, "`top_p` 1.5 is not in (0, 1]"),
    (DONE, {"model": "sp", "prompt": "x", "n": 2}, 400, "`n` 2"),
    (DONE, {"model": "sp", "prompt": "x", "stop": [""]}, 400, "`stop` must be"),
    (DONE, {"model": "sp", "prompt": "x", "stream": "yes"}, 400, "`stream` is str"),
    (DONE, {"model": "sp", "prompt": ["x", "y"], "stream": True}, 400, "`stream` takes one prompt, not 2"),
    (DONE, {"model": "drop", "prompt": "word " * 20}, 400, "over data.max_length=40 of `drop`"),
    (DONE, {"model": "sp", "prompt": "x" * (1 << 20)}, 413, "over the limit"),
    (CHAT, {"model": "sp"}, 400, "no `messages`"),
    (CHAT, {"model": "sp", "messages": "hi"}, 400, "`messages` is str: send a list"),
    (CHAT, {"model": "sp", "messages": []}, 400, "`messages` is an empty list"),
    (CHAT, {"model": "sp", "messages": [{"role": "tool", "content": "x"}]}, 400, 'has role "tool"'),
    (CHAT, {"model": "sp", "messages": [{"role": "user", "content": 3}]}, 400, "content that is a number, not text"),
    (CHAT, {"model": "sp", "messages": [{"role": "user"}]}, 400, "item 1 is not a"),
    (CHAT, {"model": "sp", "messages": [{"role": "system", "content": "s"}]}, 400, "must open with a user turn"),
    (CHAT, {"model": "sp", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, 400,
     "ends with an assistant turn"),
    (CHAT, {"model": "sp", "messages": CHATS[0], "temperature": "hot"}, 400, "`temperature` is str"),
    ("/v1/classify", {"model": "sp", "input": ["x"]}, 400, "is a causal LM, which writes text"),
    ("/v1/adapters", {"path": "cls"}, 400, "is a classification run, and this server serves a causal LM"),
])
def test_a_bad_request_gets_a_4xx_naming_the_problem(server, route, body, status, says):
    client, log = server
    response = client.post(route, content=body) if isinstance(body, str) else client.post(route, json=body)  # str: JSON httpx won't write
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"], response.json()
    assert complete(client, "sp", "still serving")["choices"][0]["finish_reason"] in ("stop", "length")
    assert "Traceback" not in log.read_text()


def test_the_api_key_is_needed(server):
    client, _ = server
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for route, body in ((DONE, {"model": "sp", "prompt": "x"}), (CHAT, {"model": "sp", "messages": CHATS[0]})):
            response = httpx.post(f"{client.base_url}{route}", json=body, headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]["message"]


def test_serve_refuses_mixing_causal_lm_and_classification_runs_in_one_line(sft_runs):
    cases = [((str(sft_runs["cls"]), "--adapter", f"sp={sft_runs['sp']}"), "is an SFT run (a causal LM), and this server serves a classifier"),
             ((str(sft_runs["sp"]), "--adapter", f"cls={sft_runs['cls']}"), "is a classification run, and this server serves a causal LM")]
    for args, says in cases:
        result = sparta("serve", *args)
        assert result.exit_code != 0 and says in str(result.exception), (args, result.output, result.exception)


def test_a_merged_sft_checkpoint_and_a_bare_causal_lm_serve_as_base(sft_runs, reference, tiny_chat_lm_dir, tmp_path):
    """In process (no HTTP): the worker's own batch function on what `sparta serve MERGED` and `sparta serve MODEL` load."""
    from sparta_cli.merge import merge_runs
    from sparta_cli.serve.completions import Job, check_settings, prompt_ids, run_jobs
    from sparta_cli.serve.registry import load_served
    from sparta_cli.sft import parse_prompts

    merged = tmp_path / "merged"
    merge_runs([sft_runs["sp"]], output=merged)
    settings = check_settings({"max_tokens": MAX_TOKENS})
    for target, expected in ((merged, reference["sp"]["chat"]), (tiny_chat_lm_dir, reference["base"]["chat"])):
        served = load_served(str(target), [])
        base = served.entries["base"]
        assert served.causal_lm and base.causal and base.template is not None and base.method == ("merged" if target == merged else "base")
        rows = parse_prompts([("chat", {"messages": messages}) for messages in CHATS], chat=True)
        jobs = [Job(prompt_ids(row, base, served.tokenizer), settings) for row in rows]
        assert [answer.text for answer in run_jobs(served, base, jobs)] == expected
