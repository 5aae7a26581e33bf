"""The HTTP app: OpenAI-compatible routes and the web page at `/`.

    POST /v1/chat/completions   LLaVA or LM: text + image_url parts; stream=true answers server-sent events
    POST /v1/embeddings         CLIP: texts and images (videos, audio clips: a video or audio CLIP) -> L2-normalised
                                embeddings (float or base64)
    POST /v1/classify           CLIP: one image (video, audio clip) + candidate labels -> probabilities (zero-shot)
    POST /v1/images/generations text-to-image: a prompt -> n PNGs (base64), seeded and bounded in steps and n
    GET  /v1/models, /health, /

A request's way in (`admit`): the edge checks its Host header and key (edge.py); it is counted from its
arrival (admission.py, 429 when full); its body is read within a deadline (body.py); it is parsed, and later
its images (videos, audio) decoded and its text tokenized, on the bounded pre-processing pool, within the
request's deadline; its remote images and videos are fetched on the event loop (fetch.py); then its job joins the
model thread's queue
(engine.py). The event loop itself only reads headers and bodies and streams answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from .admission import Admission, Ticket
from .body import read_body
from .edge import Guard, is_loopback, uvicorn_config
from .engine import Job, QueueFull
from .errors import APIError, install_error_handlers
from .fetch import fetch
from .schemas import ErrorResponse
from .service import ENDPOINTS, ServeConfig, Service

log = logging.getLogger("mmlm.serve")
PAGE = Path(__file__).parent / "static" / "index.html"
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what} for status, what in [
        (400, "bad request: the error names the field (`param`)"), (401, "missing or wrong API key"),
        (404, "unknown model"), (408, "the body did not arrive in time"), (413, "body or image too large"),
        (415, "the body is not JSON"), (429, "the queue is full: retry later"),
        (504, "the request did not finish in time")]}


def create_app(model_path: str | Path, config: ServeConfig | None = None, **service_kwargs: Any) -> FastAPI:
    """The app serving one model (loaded now; its worker thread starts now and stops with the app)."""
    service = Service(model_path, config, **service_kwargs)
    cfg = service.config
    admission = Admission(cfg.max_queue, cfg.prep_threads)
    fetch_slots = asyncio.Semaphore(cfg.max_fetches)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()
        admission.close()

    app = FastAPI(title="mmlm", version="0.1.0", lifespan=lifespan,
                  description=f"OpenAI-compatible API for {service.name} ({service.kind})")
    app.state.service, app.state.admission = service, admission
    install_error_handlers(app)
    _document_bodies(app)
    app.add_middleware(Guard, api_key=cfg.api_key, allowed_hosts=tuple(cfg.allowed_hosts))

    async def fetch_media(sources: list[tuple[str, str, int]], ticket: Ticket) -> dict[str, bytes]:
        """The remote images' and videos' bytes by param, fetched at once (at most `max_fetches` server-wide)."""

        async def one(param: str, url: str, max_bytes: int) -> tuple[str, bytes]:
            async with fetch_slots:
                timeout = min(cfg.fetch_timeout_s, ticket.remaining())
                return param, await fetch(url, param, max_bytes, timeout, cfg.allow_private_remote)

        tasks = [asyncio.ensure_future(one(*source)) for source in sources]
        try:
            return dict(await ticket.within_deadline(asyncio.gather(*tasks)))
        finally:
            for task in tasks:
                task.cancel()

    async def admit(request: Request, endpoint: str) -> tuple[Any, Any, Job]:
        """The request from its arrival to its job in the model thread's queue: (request, what the service
        made, the job). Every step is bounded and within the request's deadline; see the module docstring."""
        service.check_endpoint(endpoint)
        ticket = admission.enter(cfg.timeout_s)
        try:
            body = await read_body(request, cfg.max_body_bytes,
                                   min(ticket.deadline, time.monotonic() + cfg.body_timeout_s))
            req = await ticket.prepare(service.parse, endpoint, body)
            del body
            fetched = await fetch_media(service.remote_media(req), ticket) if cfg.allow_remote else {}
            made = await ticket.prepare(service.job, endpoint, req, fetched)
            job = made[0] if isinstance(made, tuple) else made
            job.on_leave = ticket.leave  # the model thread taking the job ends its wait
            job.bind(asyncio.get_running_loop(), ticket.remaining())
            try:
                service.worker.submit(job)
            except QueueFull as e:
                raise APIError(429, f"the server is busy: {e}; retry shortly", "queue_full") from None
            return req, made, job
        except BaseException:
            ticket.leave()
            raise

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

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        w = service.worker
        return {"status": "ok", "model": service.name, "kind": service.kind, "media": list(service.media),
                "queue": admission.waiting,
                "max_queue": admission.max_queue, "batches": w.batches, "rows": w.rows, "auth": cfg.api_key is not None}

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "mmlm", "kind": service.kind}]}

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES, openapi_extra=_body_doc("/v1/chat/completions"))
    async def chat_completions(request: Request) -> Any:
        req, _, job = await admit(request, "/v1/chat/completions")
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

    @app.post("/v1/embeddings", responses=ERROR_RESPONSES, openapi_extra=_body_doc("/v1/embeddings"))
    async def embeddings(request: Request) -> Any:
        _, (_, tokens), job = await admit(request, "/v1/embeddings")
        vectors = await result(job)
        return {"object": "list", "model": service.name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/classify", responses=ERROR_RESPONSES, openapi_extra=_body_doc("/v1/classify"))
    async def classify(request: Request) -> Any:
        _, _, job = await admit(request, "/v1/classify")
        out = await result(job)
        data = [{"index": i, "label": label, "probability": p, "logit": z}
                for i, (label, p, z) in enumerate(zip(out["labels"], out["probabilities"], out["logits"]))]
        best = max(data, key=lambda d: d["probability"])
        return {"object": "classification", "model": service.name, "label": best["label"], "data": data}

    @app.post("/v1/images/generations", responses=ERROR_RESPONSES,
              openapi_extra=_body_doc("/v1/images/generations"))
    async def images_generations(request: Request) -> Any:
        _, _, job = await admit(request, "/v1/images/generations")
        pngs = await result(job)
        return {"created": int(time.time()), "data": [{"b64_json": png} for png in pngs]}

    return app


def _body_doc(endpoint: str) -> dict[str, Any]:
    """The route's request body in the OpenAPI schema (routes read their bodies themselves, see `admit`)."""
    ref = {"$ref": f"#/components/schemas/{ENDPOINTS[endpoint].__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _document_bodies(app: FastAPI) -> None:
    """The request bodies' schemas join the OpenAPI schema's components; FastAPI documents validation errors
    as 422, this server answers them with 400 in OpenAI's shape."""
    make_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = make_schema()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in ENDPOINTS.values():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
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
          log_level: str = "info", insecure: bool = False) -> None:
    """Run the server until interrupted (`mmlm serve`).

    Bound beyond loopback without an API key, anyone on the network can use it: refused unless `insecure`."""
    import uvicorn

    config = config or ServeConfig()
    if not is_loopback(host):
        if config.api_key is None and not insecure:
            raise ValueError(f"--host {host} serves the network without an API key: give one (MMLM_API_KEY, "
                             "--api-key-file) or pass --insecure")
        if config.api_key is None:
            log.warning("serving %s without an API key: anyone who can reach it can use it", host)
        config.allowed_hosts = (*config.allowed_hosts, host)
    uvicorn.Server(uvicorn_config(create_app(model_path, config), host, port, config, log_level)).run()
