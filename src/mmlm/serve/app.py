"""The HTTP app: OpenAI-compatible routes, a body-size limit, and the web page at `/`.

    POST /v1/chat/completions   LLaVA or LM: text + image_url parts; stream=true answers server-sent events
    POST /v1/embeddings         CLIP: texts and images -> L2-normalised embeddings (float or base64)
    POST /v1/classify           CLIP: one image + candidate labels -> probabilities (zero-shot)
    GET  /v1/models, /health, /
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from .engine import Job, QueueFull
from .errors import APIError, error_response, install_error_handlers
from .schemas import ChatCompletionRequest, ClassifyRequest, EmbeddingRequest, ErrorResponse
from .service import ServeConfig, Service

PAGE = Path(__file__).parent / "static" / "index.html"
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what} for status, what in [
        (400, "bad request: the error names the field (`param`)"), (401, "missing or wrong API key"),
        (404, "unknown model"), (413, "body or image too large"), (429, "the queue is full: retry later"),
        (504, "the request did not finish in time")]}


class BodyLimit:
    """Pure ASGI middleware: bodies over `max_bytes` get 413 before any route parses them."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the client to disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        await error_response(413, f"the request body is larger than the limit of {self.max_bytes} bytes",
                             "body_too_large")(scope, receive, send)


def create_app(model_path: str | Path, config: ServeConfig | None = None, **service_kwargs: Any) -> FastAPI:
    """The app serving one model (loaded now; its worker thread starts now and stops with the app)."""
    service = Service(model_path, config, **service_kwargs)
    cfg = service.config

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="mmlm", version="0.1.0", lifespan=lifespan,
                  description=f"OpenAI-compatible API for {service.name} ({service.kind})")
    app.state.service = service
    install_error_handlers(app)
    _document_errors_as_400(app)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)

    async def check_key(request: Request) -> None:
        if cfg.api_key and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")

    async def prepare(make_job: Any, req: Any) -> Any:
        """The request's job, built off the event loop (image decoding, tokenizing); 429 first if the queue is full."""
        if service.worker.depth >= service.worker.max_queue:
            raise APIError(429, f"the server is busy: the queue is full ({service.worker.max_queue} requests "
                                "waiting); retry shortly", "queue_full")
        return await asyncio.to_thread(make_job, req)

    async def submit(job: Job) -> Job:
        job.bind(asyncio.get_running_loop(), cfg.timeout_s)
        try:
            service.worker.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry shortly", "queue_full") from None
        return job

    async def next_event(job: Job) -> tuple[str, Any]:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), max(job.deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            job.cancel()
            raise APIError(504, f"the request did not finish within the server's timeout of {cfg.timeout_s:g} s",
                           "timeout") from None
        if kind == "error":
            if isinstance(value, ValueError):
                raise APIError(400, str(value), "invalid_request")
            raise APIError(500, "internal server error", "internal_error")
        return kind, value

    async def result(job: Job) -> Any:
        try:
            while True:
                kind, value = await next_event(job)
                if kind == "done":
                    return value
        finally:
            job.cancel()  # nothing more is read: a timed-out or disconnected request stops costing work

    deps = [Depends(check_key)]

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        w = service.worker
        return {"status": "ok", "model": service.name, "kind": service.kind, "queue": w.depth,
                "max_queue": w.max_queue, "batches": w.batches, "rows": w.rows}

    @app.get("/v1/models", dependencies=deps)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "mmlm", "kind": service.kind}]}

    @app.post("/v1/chat/completions", dependencies=deps, responses=ERROR_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        job = await submit(await prepare(service.chat_job, req))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, next_event, cid, created, service.name, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        done = await result(job)
        return {"id": cid, "object": "chat.completion", "created": created, "model": service.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]},
                             "logprobs": None, "finish_reason": done["finish_reason"]}],
                "usage": _usage(done)}

    @app.post("/v1/embeddings", dependencies=deps, responses=ERROR_RESPONSES)
    async def embeddings(req: EmbeddingRequest) -> Any:
        job, tokens = await prepare(service.embedding_job, req)
        vectors = await result(await submit(job))
        return {"object": "list", "model": service.name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/classify", dependencies=deps, responses=ERROR_RESPONSES)
    async def classify(req: ClassifyRequest) -> Any:
        out = await result(await submit(await prepare(service.classify_job, req)))
        data = [{"index": i, "label": label, "probability": p, "logit": z}
                for i, (label, p, z) in enumerate(zip(out["labels"], out["probabilities"], out["logits"]))]
        best = max(data, key=lambda d: d["probability"])
        return {"object": "classification", "model": service.name, "label": best["label"], "data": data}

    return app


def _document_errors_as_400(app: FastAPI) -> None:
    """FastAPI documents validation errors as 422; this server answers them with 400 in OpenAI's shape."""
    make_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = make_schema()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _usage(done: dict[str, Any]) -> dict[str, int]:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _sse(job: Job, next_event: Any, cid: str, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role delta, content deltas, the finish reason (+ usage), then [DONE]."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                kind, value = await next_event(job)
            except APIError as e:  # headers are sent: the error travels as an event
                yield f"data: {json.dumps(e.body())}\n\n"
                break
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "done":
                yield chunk({}, value["finish_reason"])
                if include_usage:
                    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(value)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          log_level: str = "info") -> None:
    """Run the server until interrupted (`mmlm serve`)."""
    import uvicorn

    # Keep idle connections longer than clients do (httpx, and so the openai package, drop theirs after 5 s, as
    # does uvicorn by default): otherwise a client can reuse a connection the server is closing, and fail.
    uvicorn.run(create_app(model_path, config), host=host, port=port, log_level=log_level, timeout_keep_alive=15)

