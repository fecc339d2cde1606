"""The HTTP layer (FastAPI): OpenAI-style JSON in and out, every refusal a 4xx naming the problem.

Imported only by `serve()`, after it has checked that the optional `serve` extra is installed."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from sparta_cli.errors import SpartaError
from sparta_cli.generation import stop_ids
from sparta_cli.serve.completions import (
    Job,
    StreamedText,
    chat_row,
    check_settings,
    completion_prompts,
    completion_response,
    event_chunk,
    new_id,
    prompt_ids,
    run_jobs,
)
from sparta_cli.serve.metrics import ServerMetrics
from sparta_cli.serve.registry import ADAPTER_NAME, BASE_NAME, RequestError, ServedModel, ServedModels, run_folder_under
from sparta_cli.serve.scheduler import Scheduler
from sparta_cli.sft import SftRow
from sparta_cli.tasks.files import holds_lone_surrogate

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 256 inputs of ~4 KB each
MAX_INPUTS = 256  # inputs per request


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
            413: "request_too_large"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}


def create_app(served: ServedModels, *, max_batch: int, max_wait_s: float, api_key: str | None = None) -> FastAPI:
    """The ASGI app; its lifespan starts the worker and, on shutdown, drains it."""
    metrics = ServerMetrics()
    run_batch = (lambda entry, jobs: run_jobs(served, entry, jobs)) if served.causal_lm else served.run  # generate, or classify
    scheduler = Scheduler(run_batch, max_batch, max_wait_s, metrics.batch,  # classification mixes SpaRTA adapters in a batch
                          run_mixed=None if served.causal_lm else served.run_mixed, mixes=served.mixes)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()  # uvicorn has answered every in-flight request by now

    app = FastAPI(title="sparta serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse(error_body(status, message), status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return refuse(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return refuse(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return refuse(400, "; ".join(str(error.get("msg")) for error in exc.errors()))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return refuse(500, f"internal error ({type(exc).__name__}); the server keeps serving")

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return refuse(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(served, scheduler.queued()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [entry.describe() for entry in served.entries.values()]}

    async def answered(entry: ServedModel, items: list[Any]) -> list[Any]:
        """The worker's results for `items`; pending on `entry` meanwhile, so an unload waits for them.
        Called with no await since `served.get`: an unload then sees this request pending."""
        future = scheduler.submit(entry, items)
        entry.pending.add(future)
        try:
            return await asyncio.wrap_future(future)
        finally:
            entry.pending.discard(future)

    @app.post("/v1/classify")
    async def classify(request: Request):
        with recorded(metrics) as outcome:
            payload = parse_json(await read_body(request))
            entry = served.get(payload.get("model"))
            outcome.name = entry.name
            if entry.causal:
                raise RequestError(400, f"`{entry.name}` is a causal LM, which writes text, not labels: "
                                        "use POST /v1/completions or /v1/chat/completions")
            if entry.task is None:
                raise RequestError(400, f"model `{BASE_NAME}` has no trained classification head: its answers would be random; "
                                        f"name an adapter ({', '.join(n for n in served.entries if n != BASE_NAME)})")
            inputs = check_inputs(payload.get("input"))
            outcome.count = len(inputs)
            results = await answered(entry, entry.encode(inputs, served.tokenizer))
            return {"object": "list", "model": entry.name, "data": [{"index": i, **result} for i, result in enumerate(results)]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation(request, chat=True)

    async def generation(request: Request, chat: bool):
        """OpenAI's completions (a prompt or a list of them) or chat completions (one conversation)."""
        with recorded(metrics) as outcome:
            payload = parse_json(await read_body(request))
            entry = served.get(payload.get("model"))
            outcome.name = entry.name
            if not entry.causal:
                raise RequestError(400, f"`{entry.name}` is a classifier, which predicts labels, not text: use POST /v1/classify")
            settings = check_settings(payload)
            field = "messages" if chat else "prompt"
            if field not in payload:
                raise RequestError(400, f"the body has no `{field}`: send " + ('{"messages": [{"role": "user", "content": TEXT}]}' if chat
                                                                               else '{"prompt": TEXT}'))
            rows = ([chat_row(payload["messages"], entry)] if chat else
                    [SftRow(f"prompt[{i}]", prompt=text) for i, text in enumerate(completion_prompts(payload["prompt"]))])
            prompts = [prompt_ids(row, entry, served.tokenizer, i) for i, row in enumerate(rows)]
            outcome.count = len(prompts)
            kind = "chat.completion" if chat else "text_completion"
            request_id = new_id("chatcmpl" if chat else "cmpl")
            if settings.stream:
                if len(prompts) > 1:
                    raise RequestError(400, f"`stream` takes one prompt, not {len(prompts)}: send one request per prompt")
                outcome.streamed = True  # the stream records itself when it ends
                return StreamingResponse(stream(entry, Job(prompts[0], settings), kind, request_id, outcome.start),
                                         media_type="text/event-stream")
            answers = await answered(entry, [Job(prompt, settings) for prompt in prompts])
            metrics.generated(entry.name, sum(answer.completion_tokens for answer in answers))
            return completion_response(kind, request_id, entry.name, answers)

    def stream(entry: ServedModel, job: Job, kind: str, request_id: str, start: float):
        """Server-sent events: a chunk per piece of text the tokens make, the finish reason, `[DONE]`.
        The job is queued now (no await since `served.get`); the worker hands over each token."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        job.on_token = lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token)
        future = scheduler.submit(entry, [job])
        entry.pending.add(future)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))  # after every token
        text = StreamedText(served.tokenizer, stop_ids(served.tokenizer, entry.template), job.settings.stop)

        async def events():
            created, status, sent_tokens = int(time.time()), 200, 0
            try:
                if kind == "chat.completion":
                    yield sse(event_chunk(kind, request_id, created, entry.name, "", role=True))
                while (token := await tokens.get()) is not None:
                    piece = text.add(token)
                    if text.done:
                        job.cancel.set()  # a stop token or string: the worker ends at the next token
                    if piece:
                        yield sse(event_chunk(kind, request_id, created, entry.name, piece))
                try:
                    answer = future.result()[0]
                except Exception as exc:  # noqa: BLE001 - the stream is open: the error goes in it
                    status = 500
                    yield sse(error_body(500, f"generation failed ({type(exc).__name__}); the server keeps serving"))
                else:
                    sent_tokens = answer.completion_tokens
                    if answer.text[text.sent:]:
                        yield sse(event_chunk(kind, request_id, created, entry.name, answer.text[text.sent:]))
                    yield sse(event_chunk(kind, request_id, created, entry.name, finish_reason=answer.finish_reason))
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()  # also when the client left mid-stream
                entry.pending.discard(future)
                metrics.generated(entry.name, sent_tokens)
                metrics.request(entry.name, status, time.perf_counter() - start, 1 if status == 200 else 0)

        return events()

    if served.adapters_dir is not None:
        add_admin_routes(app, served)
    return app


class Outcome:
    """What a request's metrics record: the model it named, its status, how many inputs it answered."""

    def __init__(self) -> None:
        self.start, self.name, self.status, self.count, self.streamed = time.perf_counter(), "unknown", 200, 0, False


@contextmanager
def recorded(metrics: ServerMetrics) -> Iterator[Outcome]:
    """One request's metrics, however it ends: a refusal's status, 500 for anything else; a streamed
    response records itself when its stream ends."""
    outcome = Outcome()
    try:
        yield outcome
    except RequestError as exc:
        outcome.status = exc.status
        raise
    except Exception:
        outcome.status = 500
        raise
    finally:
        if not outcome.streamed:
            metrics.request(outcome.name, outcome.status, time.perf_counter() - outcome.start,
                            outcome.count if outcome.status == 200 else 0)


def sse(event: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def add_admin_routes(app: FastAPI, served: ServedModels) -> None:
    """POST /v1/adapters and DELETE /v1/adapters/{name}: runs loaded from, and only from, --adapters-dir."""
    assert served.adapters_dir is not None
    root = served.adapters_dir

    @app.post("/v1/adapters", status_code=201)
    async def load(request: Request):
        payload = parse_json(await read_body(request), needs="path")
        folder = run_folder_under(root, payload["path"])
        name = payload.get("name", folder.name)
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name == BASE_NAME:
            raise RequestError(400, f"name {str(name)[:80]!r}: use letters, digits, `.`, `_` or `-` (at most 64), not `{BASE_NAME}`")
        served.check_name_free(name)
        try:  # reading and checking the files happens here, off the event loop and off the model worker
            entry = await asyncio.to_thread(served.load_run, name, folder)
        except SpartaError as exc:
            raise RequestError(400, str(exc)) from None
        try:
            served.add(entry)
        except RequestError:  # the name was taken while it loaded: let its PEFT layers go again
            await asyncio.to_thread(served.retire, entry)
            raise
        return entry.describe()

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        entry = served.remove(name)  # new requests naming it get 404 from here on
        pending = tuple(entry.pending)
        await asyncio.gather(*(asyncio.wrap_future(future) for future in pending), return_exceptions=True)
        await asyncio.to_thread(served.retire, entry)  # between batches: the base back if it was applied
        return {"id": entry.name, "object": "model", "deleted": True, "answered_first": len(pending)}


async def read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it passes MAX_BODY_BYTES, whatever Content-Length claims."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {int(declared):,} bytes is over the limit of {MAX_BODY_BYTES:,}: send fewer or shorter inputs")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"request body is over the limit of {MAX_BODY_BYTES:,} bytes: send fewer or shorter inputs")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, needs: str = "model") -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not JSON ({exc}): send {{\"model\": NAME, \"input\": [TEXT, ...]}}") from None
    except RecursionError:
        raise RequestError(400, "the body nests too deeply to read: send {\"model\": NAME, \"input\": [TEXT, ...]}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object: {\"model\": NAME, \"input\": [TEXT, ...]}")
    if holds_lone_surrogate(payload):  # JSON's "\ud800" escapes: no tokenizer or response encoder takes one
        raise RequestError(400, "the body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff unpaired): send valid Unicode text")
    if needs == "model" and "model" not in payload:
        raise RequestError(400, "the body has no `model`: name an adapter (GET /v1/models lists them)")
    if needs == "path" and "path" not in payload:
        raise RequestError(400, "the body has no `path`: name a run folder under --adapters-dir, e.g. {\"path\": \"sst2-d0.05\"}")
    return payload


def check_inputs(value: Any) -> list[Any]:
    """`input`: a text, or a list of texts (or text pairs), 1 to MAX_INPUTS of them."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise RequestError(400, f"`input` is {type(value).__name__}: send a string or a list of strings (or [text, text] pairs)")
    if not value:
        raise RequestError(400, "`input` is empty: send at least one text")
    if len(value) > MAX_INPUTS:
        raise RequestError(400, f"`input` has {len(value)} items, over the limit of {MAX_INPUTS} per request: split it")
    return value
