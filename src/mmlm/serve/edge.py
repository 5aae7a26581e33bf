"""The HTTP edge, before any route: who may ask (API key, Host header) and how long a client may take to ask.

- `Guard` (ASGI middleware) checks, from the headers alone and before any body is read: the `Host` header of
  a server without a key (a web page of another site reaching a localhost server through DNS rebinding names
  its own host there), then the API key on `/v1/*`, compared in constant time; 401 says `WWW-Authenticate: Bearer`.
- `TimedH11Protocol` is uvicorn's HTTP/1.1 protocol with a header deadline: a connection that has not sent a
  complete request line and headers within `header_timeout_s` of connecting (or of its first byte after a
  previous request) is closed. uvicorn has no such timeout: a client sending a byte now and then held a
  connection forever. The body's deadline is the route's (body.py), idle connections close after keep-alive.
- `uvicorn_config` puts these together with keep-alive and a bounded graceful shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_response

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The name in a Host header, without port, brackets, trailing dot or case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]")[0]
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether a bind address only listens on this machine."""
    name = host_name(host) if not is_ip(host) else host
    return name == "localhost" or (is_ip(name) and ipaddress.ip_address(name).is_loopback)


class Guard:
    """Pure ASGI middleware: the Host allow-list (servers without a key) and the API key (`/v1/*`)."""

    def __init__(self, app: Any, api_key: str | None, allowed_hosts: tuple[str, ...] = ()):
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.allowed = {host_name(h) for h in (*LOCAL_NAMES, *allowed_hosts)}

    def host_allowed(self, header: bytes | None) -> bool:
        # An IP address cannot be a rebinding attacker's name, nor can localhost's (browsers keep it local).
        if header is None:
            return True
        name = host_name(header.decode("latin-1"))
        return name in self.allowed or is_ip(name) or name.endswith(".localhost")

    def authorized(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k: v for k, v in reversed(scope.get("headers") or [])}  # the first of repeated headers
        close = {"Connection": "close"}  # the body, if any, is not read
        if self.key is None and not self.host_allowed(headers.get(b"host")):
            response = error_response(400, "the Host header names a host this server does not answer for (start it "
                                           "with --allowed-host NAME, or with an API key)", "invalid_host", None, close)
            return await response(scope, receive, send)
        if self.key is not None and scope["path"].startswith("/v1/") and not self.authorized(
                headers.get(b"authorization")):
            response = error_response(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key",
                                      None, {"WWW-Authenticate": "Bearer", **close})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request line and headers do not arrive in time."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():
            self._arm()  # the first bytes of a request: its headers are due within the timeout
        super().data_received(data)
        if not self._waiting_for_headers():
            self._disarm()  # a request has begun (its body has its own deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, host: str, port: int, config: Any, log_level: str = "info", **kwargs: Any) -> Any:
    """uvicorn's settings for `app` under `config` (a ServeConfig): the timed protocol, keep-alive, shutdown."""
    import uvicorn

    # Keep idle connections longer than clients do (httpx, and so the openai package, drop theirs after 5 s, as
    # does uvicorn by default): otherwise a client can reuse a connection the server is closing, and fail.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="none",
                          http=functools.partial(TimedH11Protocol, header_timeout_s=config.header_timeout_s),
                          timeout_keep_alive=config.keep_alive_s,
                          timeout_graceful_shutdown=config.shutdown_timeout_s, **kwargs)
