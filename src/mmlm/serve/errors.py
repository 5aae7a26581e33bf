"""OpenAI-style errors: every failure the client sees is `{"error": {"message", "type", "param", "code"}}`.

Handlers turn request validation errors, unknown routes and any unexpected exception into that shape;
an unexpected exception is logged on the server and the client only learns that it was internal.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mmlm.serve")

# OpenAI's error types, by HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error", 504: "timeout_error"}


class APIError(Exception):
    """A failure to report to the client: HTTP status, a message naming the problem, the field (`param`)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})
        if status in (429, 503):
            self.headers.setdefault("Retry-After", "1")

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def _loc(loc: Any) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def invalid(errors: list[dict[str, Any]]) -> APIError:
    """The first of pydantic's validation errors as a 400 naming its field (`param`)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = _loc(first.get("loc", ()))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"{where}: {first.get('msg', 'invalid value')}{more}", "invalid_value", where)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.code, e.param, e.headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {errors[0].get('msg')}", "invalid_json")
        error = invalid(errors)
        return error_response(error.status, error.message, error.code, error.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else "request failed"
        if e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(e.status_code, message, {404: "not_found", 405: "method_not_allowed"}.get(
            e.status_code, "http_error"), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)  # the trace stays here
        return error_response(500, "internal server error", "internal_error")
