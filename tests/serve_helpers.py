"""Shared by the server tests: run an app on a free loopback port in a thread; images as data: URIs."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from PIL import Image


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` as `mmlm serve` does (its uvicorn settings: timeouts, keep-alive) on 127.0.0.1, a free port,
    until the block ends; yields the base URL."""
    import uvicorn

    from mmlm.serve.edge import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, app.state.service.config, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def png_bytes(size=(40, 30), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
