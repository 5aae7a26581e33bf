"""Remote images (`--allow-remote-images`): one bounded HTTP GET per image, on the event loop.

A fetch has one deadline for everything (name lookup, connect, TLS, headers, body), never a per-read
timeout that a server dripping a byte at a time can extend forever; the body is capped while it streams;
redirects are not followed. The host's addresses are resolved first and refused when any is not a public
unicast address (loopback, private, link-local, shared, multicast, reserved, and the IPv4 inside IPv6 forms)
unless the operator allows private addresses; the connection then goes to the address that was checked, so a
second lookup cannot answer differently (DNS rebinding). Errors say "not allowed" or "failed", never why a
connection failed, so a client cannot tell an open port from a closed one.

HTTP/1.1 is spoken with h11 (uvicorn's own parser) over asyncio streams: no proxy settings are read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

import h11

from .errors import APIError

HEADER_BYTES = 16 * 1024  # the most response-header bytes read


def _not_allowed(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: fetching this image URL is not allowed ({why})", "image_source_not_allowed", param)


def _failed(param: str) -> APIError:
    return APIError(400, f"{param}: fetching the image failed", "image_fetch_failed", param)


def public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address (and, for IPv6, no private IPv4 address inside it)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d
            return public_address(ip.ipv4_mapped)
        inner = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None and not public_address(inner):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


async def _resolve(host: str, port: int, param: str, allow_private: bool) -> tuple[str, int]:
    """The address to connect to, after every address the name has was checked."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _failed(param) from None
    addresses = [info[4] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise _failed(param)
    if not allow_private:
        for address in addresses:
            if not public_address(ipaddress.ip_address(address[0].split("%")[0])):
                raise _not_allowed(param, "the host has a loopback, private or reserved address")
    return addresses[0][0], addresses[0][1]


async def _get(url: str, param: str, max_bytes: int, allow_private: bool) -> bytes:
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise APIError(400, f"{param}: not a valid URL", "invalid_image_url", param) from None
    if parts.username is not None or parts.password is not None:
        raise _not_allowed(param, "credentials in the URL")
    if not parts.hostname:
        raise APIError(400, f"{param}: the URL has no host", "invalid_image_url", param)
    ip, port = await _resolve(parts.hostname, port, param, allow_private)
    tls = ssl.create_default_context() if parts.scheme.lower() == "https" else None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        reader, writer = await asyncio.open_connection(ip, port, ssl=tls,
                                                       server_hostname=parts.hostname if tls else None)
    except (OSError, ssl.SSLError):
        raise _failed(param) from None
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=HEADER_BYTES)
    try:
        writer.write(conn.send(h11.Request(method="GET", target=target.encode(), headers=[
            ("Host", parts.netloc), ("User-Agent", "mmlm"), ("Accept", "image/*"), ("Connection", "close")])))
        writer.write(conn.send(h11.EndOfMessage()))
        data = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(64 * 1024))
            elif isinstance(event, h11.Response):
                if event.status_code != 200:  # redirects included: never followed
                    raise _failed(param)
                length = dict(event.headers).get(b"content-length", b"")
                if length.isdigit() and int(length) > max_bytes:
                    raise _too_large(param, int(length), max_bytes)
            elif isinstance(event, h11.Data):
                data += event.data
                if len(data) > max_bytes:
                    raise _too_large(param, len(data), max_bytes)
            elif isinstance(event, h11.EndOfMessage):
                return bytes(data)
            elif isinstance(event, h11.ConnectionClosed):
                raise _failed(param)
            # anything else (an informational 1xx response): read on
    except (OSError, ssl.SSLError, h11.ProtocolError):
        raise _failed(param) from None
    finally:
        writer.close()


def _too_large(param: str, n: int, limit: int) -> APIError:
    return APIError(413, f"{param}: the image is more than {limit} bytes", "image_too_large", param)


async def fetch(url: str, param: str, max_bytes: int, timeout_s: float, allow_private: bool = False) -> bytes:
    """The body of `url` (200 only, at most `max_bytes`), all within `timeout_s`; APIError naming `param` else."""
    try:
        return await asyncio.wait_for(_get(url, param, max_bytes, allow_private), timeout_s)
    except asyncio.TimeoutError:
        raise _failed(param) from None
