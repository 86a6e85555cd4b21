"""The FastAPI app: routes, admission of a chat request to its worker, the answer as one object or as
server-sent events, and OpenAI-shaped errors for every refusal (never FastAPI's 422 body or a traceback).

    POST /v1/chat/completions   GET /v1/models   GET /v1/models/{id}   GET /health   GET /metrics
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nectar_runtime.errors import GenerationError
from nectar_runtime.serve import protocol
from nectar_runtime.serve.config import ServeConfig
from nectar_runtime.serve.metrics import Metrics
from nectar_runtime.serve.models import Entry, PromptTooLong, close, workers
from nectar_runtime.serve.protocol import ApiError
from nectar_runtime.serve.workers import Done, Event, Failed, Job, QueueFull, Started, Stopping, Text

RETRY_AFTER_S = "1"
GRACE_S = 0.25                  # beyond the deadline, for the worker's own timeout event to arrive first


@dataclass
class ServeState:
    """What the routes share: the config, the model ids, the metrics, and whether requests are taken now."""

    config: ServeConfig
    entries: dict[str, Entry]
    metrics: Metrics
    phase: str = "starting"     # starting | ready | stopping
    created: int = 0

    def start(self) -> None:
        for worker in workers(self.entries):
            worker.start()
        self.metrics.gauge(self._depths)
        self.created, self.phase = int(time.time()), "ready"

    def stop(self) -> None:
        self.phase = "stopping"
        close(self.entries)

    def _depths(self) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        rows = []
        for worker in workers(self.entries):
            waiting, running = worker.depth()
            rows += [("nectar_queue_depth", (("backend", worker.name),), waiting),
                     ("nectar_running", (("backend", worker.name),), running)]
        return rows


class Channel:
    """Events from a worker thread to the request's coroutine, through the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def send(self, event: Event) -> None:
        """Called by the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:        # the loop has closed: nobody is listening any more
            pass

    async def next(self, job: Job) -> Event | None:
        """The next event, or None once the request's deadline (and a grace) passed without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), max(job.deadline - time.monotonic(), 0) + GRACE_S)
        except asyncio.TimeoutError:
            return None


def create_app(state: ServeState) -> FastAPI:
    """The app over loaded entries; its lifespan starts the workers and stops them (a uvicorn or a Ray replica)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            state.stop()

    # FastAPI's own OpenTelemetry is off: /metrics is the server's telemetry, and spans would cost every chunk
    app = FastAPI(title="nectar-export serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                             "auto_configure": False})
    _error_handlers(app)
    _routes(app, state)
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = protocol.validation_error(list(exc.errors()) or [{"msg": "invalid request"}])
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse(protocol.error_body("internal error; see the server's log", "server_error"),
                            status_code=500)


def _routes(app: FastAPI, state: ServeState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        request.state.model = ""                    # set once the model id is known to exist
        try:
            response = await _chat(state, request)
        except ApiError as exc:
            state.metrics.inc("nectar_requests_total", model=request.state.model, status=str(exc.status))
            raise
        state.metrics.inc("nectar_requests_total", model=request.state.model, status=str(response.status_code))
        return response

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state, e) for e in state.entries.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return _model_card(state, _entry(state, model_id))

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = state.phase == "ready"
        return JSONResponse({"status": "ok" if ready else state.phase, "models": list(state.entries),
                             "pid": os.getpid()},
                            status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(state: ServeState, entry: Entry) -> dict[str, Any]:
    return {"id": entry.name, "object": "model", "created": state.created, "owned_by": "nectar-export",
            "kind": entry.kind, "window": entry.window, "backend": entry.worker.name}


def _entry(state: ServeState, model: str) -> Entry:
    entry = state.entries.get(model)
    if entry is None:
        known = ", ".join(state.entries)
        raise ApiError(404, f"the model {model[:200]!r} does not exist; this server has {known}", param="model",
                       code="model_not_found")
    return entry


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, at most `limit` bytes (413 beyond)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes, more than this server's {limit}",
                       code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"the request body is larger than this server's {limit} bytes",
                           code="request_too_large")
        parts.append(part)
    return b"".join(parts)


async def _chat(state: ServeState, request: Request) -> Response:
    """Admit the request to its worker, wait for it to start, then answer it whole or as a stream."""
    if state.phase != "ready":
        raise ApiError(503, f"the server is {state.phase}; retry shortly", code=state.phase,
                       headers={"Retry-After": RETRY_AFTER_S})
    body = protocol.parse_request(await read_body(request, state.config.max_body_bytes))
    protocol.unsupported(body)
    entry = _entry(state, body.model)
    request.state.model = entry.name
    job, channel = _admit(state, entry, body)
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        await _started(job, channel)
    except BaseException:
        job.cancel.set()
        raise
    finally:
        watcher.cancel()
    cid = protocol.completion_id()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(job, channel, cid, entry.name, include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _whole(request, job, channel, cid, entry.name)


def _admit(state: ServeState, entry: Entry, body: protocol.ChatRequest) -> tuple[Job, Channel]:
    """The Job of a checked request, queued on its entry's worker (429 when the queue is full)."""
    question, stops = protocol.question(body), protocol.stops(body)
    try:
        prompt = entry.prompt_ids(question)
        sampling = protocol.sampling(body, entry.window - len(prompt) + 1)
    except PromptTooLong as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except GenerationError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    channel = Channel()
    job = Job(entry, prompt, sampling, stops, time.monotonic() + state.config.timeout_s, channel.send)
    try:
        entry.worker.submit(job)
    except QueueFull:
        raise ApiError(429, f"{entry.worker.name}'s queue is full ({state.config.queue} waiting); retry shortly",
                       code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from None
    except Stopping:
        raise ApiError(503, "the server is stopping", code="stopping", headers={"Retry-After": RETRY_AFTER_S}) from None
    return job, channel


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Set the job's cancel flag when the client goes away while the request waits or runs."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel.set()


async def _started(job: Job, channel: Channel) -> Started:
    """Wait for the worker to take the job: its Started event, or the refusal that replaced it."""
    event = await channel.next(job)
    if isinstance(event, Started):
        return event
    raise _ended_early(job, event)


def _ended_early(job: Job, event: Event | None) -> ApiError:
    """The error for a job that ended without an answer: a timeout, a stop, the worker's failure."""
    job.cancel.set()
    if event is None or (isinstance(event, Done) and event.finish == "timeout"):
        return ApiError(504, f"the request took longer than this server's timeout of "
                             f"{job.deadline - job.arrived:.3g} s", code="timeout")
    if isinstance(event, Failed):
        return ApiError(503 if event.code == "stopping" else 500, event.message, code=event.code)
    return ApiError(499, "the client closed the request", code="cancelled")      # nginx's code: nobody reads it


async def _whole(request: Request, job: Job, channel: Channel, cid: str, model: str) -> Response:
    """The chat.completion object once the answer is done."""
    texts: list[str] = []
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        while isinstance(event := await channel.next(job), Text):
            texts.append(event.text)
    finally:
        watcher.cancel()
        job.cancel.set()                    # a no-op once done; stops the worker if this coroutine was cancelled
    if not isinstance(event, Done) or event.finish in ("timeout", "cancelled"):
        raise _ended_early(job, event)
    return JSONResponse(protocol.completion(cid, model, "".join(texts), event))


async def _stream(job: Job, channel: Channel, cid: str, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent chunks: the role, the text deltas, the finish reason, the usage if asked, then [DONE]."""
    try:
        yield protocol.sse(protocol.chunk(cid, model, {"role": "assistant", "content": ""}))
        while isinstance(event := await channel.next(job), Text):
            yield protocol.sse(protocol.chunk(cid, model, {"content": event.text}))
        if isinstance(event, Done) and event.finish not in ("timeout", "cancelled"):
            yield protocol.sse(protocol.chunk(cid, model, {}, protocol.finish_reason(event)))
            if include_usage:
                yield protocol.sse(protocol.chunk(cid, model, {}, usage_=protocol.usage(event), choices=False))
        else:
            yield protocol.sse(_ended_early(job, event).body())
        yield protocol.sse("[DONE]")
    finally:
        job.cancel.set()                    # the client left (the response's task was cancelled) or it ended
