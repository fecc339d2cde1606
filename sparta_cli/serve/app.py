"""The HTTP layer (FastAPI): OpenAI-style JSON in and out, every refusal a 4xx naming the problem.

Imported only by `serve()`, after it has checked that the optional `serve` extra is installed."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from sparta_cli.errors import SpartaError
from sparta_cli.serve.metrics import ServerMetrics
from sparta_cli.serve.registry import ADAPTER_NAME, BASE_NAME, RequestError, ServedModels, run_folder_under
from sparta_cli.serve.scheduler import Scheduler

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
    scheduler = Scheduler(served.run, max_batch, max_wait_s, metrics.batch)

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

    @app.post("/v1/classify")
    async def classify(request: Request):
        start = time.perf_counter()
        name, status, count = "unknown", 200, 0
        try:
            payload = parse_json(await read_body(request))
            entry = served.get(payload.get("model"))
            name = entry.name
            if entry.task is None:
                raise RequestError(400, f"model `{BASE_NAME}` has no trained classification head: its answers would be random; "
                                        f"name an adapter ({', '.join(n for n in served.entries if n != BASE_NAME)})")
            inputs = check_inputs(payload.get("input"))
            count = len(inputs)
            features = entry.encode(inputs, served.tokenizer)
            future = scheduler.submit(entry, features)  # no await since `get`: an unload sees this request pending
            entry.pending.add(future)
            try:
                results = await asyncio.wrap_future(future)
            finally:
                entry.pending.discard(future)
            return {"object": "list", "model": entry.name, "data": [{"index": i, **result} for i, result in enumerate(results)]}
        except RequestError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            metrics.request(name, status, time.perf_counter() - start, count if status == 200 else 0)

    if served.adapters_dir is not None:
        add_admin_routes(app, served)
    return app


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
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object: {\"model\": NAME, \"input\": [TEXT, ...]}")
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
