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

from sparta_cli.serve.metrics import ServerMetrics
from sparta_cli.serve.registry import BASE_NAME, RequestError, ServedModels
from sparta_cli.serve.scheduler import Scheduler

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 256 inputs of ~4 KB each
MAX_INPUTS = 256  # inputs per request


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(status, "invalid_request_error")
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
            results = await asyncio.wrap_future(scheduler.submit(entry.name, features))
            return {"object": "list", "model": entry.name, "data": [{"index": i, **result} for i, result in enumerate(results)]}
        except RequestError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            metrics.request(name, status, time.perf_counter() - start, count if status == 200 else 0)

    return app


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


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not JSON ({exc}): send {{\"model\": NAME, \"input\": [TEXT, ...]}}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object: {\"model\": NAME, \"input\": [TEXT, ...]}")
    if "model" not in payload:
        raise RequestError(400, "the body has no `model`: name an adapter (GET /v1/models lists them)")
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
