"""Shared by the server tests: run an app on a free loopback port in a thread; images as data: URIs."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
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


def moving_square(T: int = 10, size: int = 40) -> np.ndarray:
    """uint8 (T, size, size, 3): a coloured square moving right on a dark background."""
    frames = np.full((T, size, size, 3), 20, np.uint8)
    for t in range(T):
        frames[t, 12:26, 2 * t:2 * t + 12] = (230, 60, 30)
    return frames


def tone(seconds: float = 0.6, rate: int = 22_050, hz: float = 440.0) -> np.ndarray:
    """float32 (S,): a sine at `hz`, `seconds` long at `rate` Hz."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
