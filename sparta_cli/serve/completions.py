"""POST /v1/completions and /v1/chat/completions on a causal-LM server: OpenAI's request checked, the
prompt rendered as `sparta generate` renders it, the model worker's generation, OpenAI's answer.

A completion's prompt is plain text (the tokenizer's ids, its BOS included: `sft.generation_prompt`
of a text row); a chat's messages go through the run's chat template and end in its generation
prompt, as training and `sparta generate` render them. The worker (`run_jobs`) runs a batch of one
adapter's jobs under the model lock: greedy, unstreamed jobs in one left-padded batch (each cut to its
own max_tokens: a greedy row's tokens do not depend on the rows beside it), a sampled or a streamed
job alone (so a seed reproduces its answer, and a streamer sees one row)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sparta_cli.errors import SpartaError
from sparta_cli.generation import DEFAULT_MAX_NEW_TOKENS, Sampling, completion_ids, generate_ids, pad_id_of, stop_ids
from sparta_cli.serve.registry import RequestError, ServedModel, ServedModels
from sparta_cli.sft import SftRow, generation_prompt, parse_prompts

MAX_TOKENS = 2048  # most tokens one request may ask for
MAX_PROMPTS = 256  # prompts per completions request
MAX_STOPS = 4  # stop strings per request, as OpenAI allows


@dataclass(frozen=True)
class Settings:
    """A request's generation settings, checked."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool


@dataclass(eq=False)
class Job:
    """One prompt to answer. `on_token` (streaming) gets each generated id from the worker thread;
    setting `cancel` ends the generation at the next token (a stop string was met, the client left)."""

    prompt: list[int]
    settings: Settings
    on_token: Callable[[int], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # generated tokens, the stop token included


# ---------------------------------------------------------------- the request


def _number(payload: dict[str, Any], key: str, default: float) -> float:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"`{key}` is {type(value).__name__}: send a number")
    return float(value)


def _integer(payload: dict[str, Any], key: str, default: int) -> int:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"`{key}` is {type(value).__name__}: send an integer")
    return value


def check_settings(payload: dict[str, Any]) -> Settings:
    """max_tokens, temperature, top_p, seed, stop, n (1 only) and stream, each refused (400) naming the fix."""
    max_tokens = _integer(payload, "max_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise RequestError(400, f"`max_tokens` {max_tokens} is not from 1 to {MAX_TOKENS}: ask for fewer tokens")
    temperature = _number(payload, "temperature", 0.0)
    if not 0 <= temperature < float("inf"):  # also refuses NaN, which JSON parsing lets through
        raise RequestError(400, f"`temperature` {temperature} is negative or not finite: use 0 (greedy) or more")
    top_p = _number(payload, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise RequestError(400, f"`top_p` {top_p} is not in (0, 1]: use e.g. 0.9, or 1 for no cut")
    seed = payload.get("seed")
    seed = random.randrange(1 << 31) if seed is None else _integer(payload, "seed", 0)
    if not 0 <= seed < 1 << 63:
        raise RequestError(400, f"`seed` {seed} is not from 0 to 2**63 - 1: use a smaller one")
    n = _integer(payload, "n", 1)
    if n != 1:
        raise RequestError(400, f"`n` {n}: this server answers each prompt once (n: 1); send the request again for more")
    stop = payload.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, f"`stop` must be a non-empty string or a list of at most {MAX_STOPS} of them")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"`stream` is {type(stream).__name__}: send true or false")
    return Settings(max_tokens, temperature, top_p, seed, tuple(stops), stream)


def completion_prompts(value: Any) -> list[str]:
    """`prompt`: a text or a list of 1 to MAX_PROMPTS texts, none empty."""
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list):
        raise RequestError(400, f"`prompt` is {type(value).__name__}: send a string or a list of strings")
    if not prompts:
        raise RequestError(400, "`prompt` is an empty list: send at least one prompt")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(400, f"`prompt` has {len(prompts)} items, over the limit of {MAX_PROMPTS} per request: split it")
    for position, text in enumerate(prompts):
        if not isinstance(text, str):
            raise RequestError(400, f"prompt[{position}] is {type(text).__name__}, not a string")
        if not text.strip():
            raise RequestError(400, f"prompt[{position}] is empty: write the prompt")
    return prompts


def chat_row(messages: Any, entry: ServedModel) -> SftRow:
    """`messages`, checked as the SFT layer checks a prompt file's rows: roles system/user/assistant,
    text content, opening with a user turn (after a system message) and ending in the turn to answer."""
    if entry.template is None:
        raise RequestError(400, f"`{entry.name}` has no chat template (it was trained on plain text, or its tokenizer has none): "
                                "use POST /v1/completions")
    if not isinstance(messages, list):  # the SFT layer would read a string as JSON (a parquet column's): not here
        raise RequestError(400, f"`messages` is {type(messages).__name__}: send a list of {{\"role\": ..., \"content\": ...}} objects")
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        raise RequestError(400, "`messages` ends with an assistant turn: end with the user turn to answer")
    try:
        return parse_prompts([("the request", {"messages": messages})], chat=True)[0]
    except SpartaError as exc:
        raise RequestError(400, str(exc).removesuffix(": fix that row")) from None


def prompt_ids(row: SftRow, entry: ServedModel, tokenizer, position: int = 0) -> list[int]:
    """The ids the model answers, with the run's data.max_length policy: over-long prompts refused
    under `data.overlong: drop`, else cut to their last max_length tokens (the end holds the turn to answer)."""
    try:
        ids = generation_prompt(row, tokenizer, entry.template)[0]
    except SpartaError as exc:
        raise RequestError(400, str(exc)) from None
    if entry.recipe is None or len(ids) <= entry.recipe.data.max_length:
        return ids
    max_length = entry.recipe.data.max_length
    if entry.recipe.data.overlong == "drop":
        raise RequestError(400, f"prompt[{position}] has {len(ids)} tokens, over data.max_length={max_length} of `{entry.name}`, "
                                "whose run drops over-long rows (data.overlong: drop): shorten it")
    return ids[-max_length:]


# ---------------------------------------------------------------- the worker


def run_jobs(served: ServedModels, entry: ServedModel, jobs: list[Job]) -> list[Answer]:
    """Answer one adapter's jobs (the scheduler's worker, one batch): activated under the model lock, so no swap races them."""
    stops = stop_ids(served.tokenizer, entry.template)
    answers: dict[int, Answer] = {}
    batched = [i for i, job in enumerate(jobs) if job.settings.temperature == 0 and job.on_token is None]
    groups = [batched] if batched else []
    groups += [[i] for i in range(len(jobs)) if i not in batched]
    with served.lock:
        served.activate(entry)
        for group in groups:
            rows = _generate(served, [jobs[i] for i in group], stops)
            answers.update({i: answer(jobs[i], row, stops, served.tokenizer) for i, row in zip(group, rows)})
    return [answers[i] for i in range(len(jobs))]


def _generate(served: ServedModels, jobs: list[Job], stops: list[int]) -> list[list[int]]:
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    first = jobs[0].settings
    sampling = Sampling(max_new_tokens=max(job.settings.max_tokens for job in jobs), temperature=first.temperature,
                        top_p=first.top_p, seed=first.seed, batch_size=len(jobs))
    hooks: dict[str, Any] = {}
    if len(jobs) == 1:
        job = jobs[0]

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return job.cancel.is_set()

        hooks["stopping_criteria"] = StoppingCriteriaList([Cancelled()])
        if job.on_token is not None:
            class Tokens(BaseStreamer):
                prompt_seen = False

                def put(self, value):
                    if not self.prompt_seen:  # generate's first call hands over the prompt
                        self.prompt_seen = True
                        return
                    for token in value.reshape(-1).tolist():
                        job.on_token(int(token))

                def end(self):
                    pass

            hooks["streamer"] = Tokens()
    # in the model's own dtype, no autocast: as `sparta generate` runs it
    return generate_ids(served.model, [job.prompt for job in jobs], sampling, stops, pad_id_of(served.tokenizer, stops), **hooks)


def answer(job: Job, generated: list[int], stops: list[int], tokenizer) -> Answer:
    """A generated row as the request's answer: cut at its max_tokens, its first stop id, its first stop string."""
    generated = generated[:job.settings.max_tokens]
    ids = completion_ids(generated, stops)
    stopped = len(ids) < len(generated)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    used = len(ids) + int(stopped)
    cut = stop_cut(text, job.settings.stop)
    if cut is not None:
        text, stopped = text[:cut], True
        used = next(k for k in range(1, len(ids) + 1) if stop_cut(tokenizer.decode(ids[:k], skip_special_tokens=True), job.settings.stop) is not None)
    return Answer(text, "stop" if stopped else "length", len(job.prompt), used)


def stop_cut(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in `text` (None: none is in it)."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return min(found) if found else None


class StreamedText:
    """The text a stream may send so far: the decoded ids, holding back what may yet become a stop
    string, or an unfinished character (a byte of a multi-byte one decodes as U+FFFD)."""

    def __init__(self, tokenizer, stops: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stops, self.stop = tokenizer, stops, stop
        self.ids: list[int] = []
        self.sent = 0
        self.done = False  # a stop token or a stop string came: nothing more is sent

    def add(self, token: int) -> str:
        """The new text `token` lets the stream send."""
        if self.done:
            return ""
        if token in self.stops:
            self.done = True
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = stop_cut(text, self.stop)
        if cut is not None:
            self.done = True
            safe = cut
        else:
            safe = len(text) - max((len(s) - 1 for s in self.stop), default=0)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent:safe], safe
        return piece


# ---------------------------------------------------------------- OpenAI's answer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_response(kind: str, request_id: str, model: str, answers: list[Answer]) -> dict[str, Any]:
    """OpenAI's text_completion or chat.completion object."""
    chat = kind == "chat.completion"
    choices = [{"index": i, **({"message": {"role": "assistant", "content": a.text}} if chat else {"text": a.text, "logprobs": None}),
                "finish_reason": a.finish_reason} for i, a in enumerate(answers)]
    prompt_tokens = sum(a.prompt_tokens for a in answers)
    completion_tokens = sum(a.completion_tokens for a in answers)
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}}


def event_chunk(kind: str, request_id: str, created: int, model: str, text: str | None = None, *, role: bool = False,
          finish_reason: str | None = None) -> dict[str, Any]:
    """One server-sent event's object: a `text_completion` chunk, or a `chat.completion.chunk` with its `delta`."""
    if kind == "chat.completion":
        delta = {**({"role": "assistant"} if role else {}), **({"content": text} if text is not None else {})}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
