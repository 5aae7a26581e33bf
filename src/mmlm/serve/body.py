"""A request body -> a validated request, each step bounded before anything in it is trusted.

`read_body` (event loop): the bytes, at most `max_bytes`, all of them before a deadline, so a client that
sends slowly is answered 408 and its connection closed instead of holding a place forever.

`parse` (a pre-processing thread, admission.py): UTF-8 JSON holding at most `max_values` values, counted
*while* parsing, so a body of a million tiny parts costs the parse of `max_values` values before its 400,
not of the million (the C parser would hold the interpreter for the whole body); no NaN or Infinity; no
string with a lone surrogate (it cannot be written back as UTF-8, so it would fail after the work, as a 500);
then the pydantic model, strict: `true` is not an integer and "5" is not a number.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import re
import time
from json.decoder import JSONArray, JSONObject
from json.scanner import py_make_scanner
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .errors import APIError, invalid

M = TypeVar("M", bound=BaseModel)
_SURROGATE = re.compile("[\ud800-\udfff]")
CLOSE = {"Connection": "close"}  # the rest of a refused body is not read: the connection cannot be reused


class _TooManyValues(Exception):
    pass


class _NotJSON(ValueError):
    pass


async def read_body(request: Request, max_bytes: int, deadline: float) -> bytearray:
    """The request's body: 415 unless JSON, 413 past `max_bytes`, 408 if it has not all arrived by `deadline`."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise APIError(415, f"the body must be JSON (Content-Type: application/json), not {kind!r}",
                       "unsupported_media_type", headers=CLOSE)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes):
        raise _too_large(max_bytes)
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise APIError(408, "the request body did not arrive in time", "body_timeout", headers=CLOSE) from None
        if message["type"] == "http.disconnect":
            raise APIError(400, "the client closed the connection", "client_disconnected", headers=CLOSE)
        body += message.get("body", b"")
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
        if not message.get("more_body", False):
            return body  # not copied to bytes: one copy of a large body fewer


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {max_bytes} bytes", "body_too_large",
                    headers=CLOSE)


def parse(raw: bytes | bytearray, model: type[M], max_values: int) -> M:
    """`raw` as a `model`, or an APIError naming the problem (and the field, `param`, where there is one).

    A bytearray is emptied once decoded, so that a large body is not held twice while it is parsed."""
    large = len(raw) > TRIM_BYTES
    try:
        text = raw.decode("utf-8")
        if isinstance(raw, bytearray):
            raw.clear()
        data = _bounded_decoder(max_values).decode(text)
        del text
    except _TooManyValues:
        raise APIError(400, f"the request body holds more than {max_values} JSON values", "too_many_values") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", "invalid_json") from None
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8", "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of more than 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    finally:
        if large:
            release_memory()
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    check_strings(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid(e.errors(include_url=False)) from None


TRIM_BYTES = 1 << 20
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim): the allocator keeps what a large body
    used in its per-thread arenas, and the server's resident memory would only grow."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _bounded_decoder(max_values: int) -> json.JSONDecoder:
    """The standard library's pure-Python JSON scanner (strings still scanned in C), counting every value."""
    count = 0

    def counted(scan_once: Callable[[str, int], Any]) -> Callable[[str, int], Any]:
        def scan(string: str, idx: int) -> Any:
            nonlocal count
            count += 1
            if count > max_values:
                raise _TooManyValues
            return scan_once(string, idx)

        return scan

    def no_constant(name: str) -> None:
        raise _NotJSON(f"{name} is not a JSON value")

    decoder = json.JSONDecoder(parse_constant=no_constant)
    decoder.parse_object = lambda s_end, strict, scan_once, *hooks: JSONObject(s_end, strict, counted(scan_once), *hooks)
    decoder.parse_array = lambda s_end, scan_once: JSONArray(s_end, counted(scan_once))
    decoder.scan_once = py_make_scanner(decoder)
    return decoder


def check_strings(data: Any) -> None:
    """400 naming the field of the first string (or key) holding a lone surrogate (e.g. "\\ud800")."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            bad = not value.isascii() and _SURROGATE.search(value)
        elif isinstance(value, dict):
            bad = any(not k.isascii() and _SURROGATE.search(k) for k in value)
            stack.extend((v, f"{path}.{k}" if path else k) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            bad = False
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in reversed(list(enumerate(value))))
        else:
            bad = False
        if bad:
            where = path or "body"
            raise APIError(400, f"{where}: the text holds a lone surrogate (not valid Unicode)", "invalid_value", where)
