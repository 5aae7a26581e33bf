"""`mmlm serve` under hostile input: no request can take the server from the others.

The principle: the work a request can cause before it is refused is bounded and counted. Each test names the
finding it keeps fixed; each asserts the status, the JSON error with its `param`, and, where the attack is
about time, that `/health` keeps answering within a second. Every server is on 127.0.0.1; the image servers
(dripping, redirecting, huge) are local threads. Sizes are scaled down from the attacks found (10 MB prompts,
700 k parts) so that the suite runs in seconds; the full-size figures are in docs/serving.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_helpers import data_uri, png_bytes, running  # noqa: E402

from mmlm.serve import ServeConfig, create_app  # noqa: E402
from mmlm.serve.tiny import tiny_clip, tiny_llava  # noqa: E402

CHAT, IMAGE_PARAM = "/v1/chat/completions", "messages.0.content.0.image_url"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("hostile") / "tiny-llava")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("hostile") / "tiny-clip")


def chat(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def image_chat(url, **extra):
    return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}], **extra)


def assert_error(r, status, code, param):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert "Traceback" not in r.text and " at 0x" not in r.text
    return error


class HealthWatch:
    """Polls /health every 50 ms in a thread while the block runs; `worst` is its slowest answer (s)."""

    def __init__(self, url: str):
        self.url, self.worst, self.failures, self._stop = url, 0.0, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=5) as c:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    ok = c.get(self.url + "/health").status_code == 200
                except httpx.HTTPError as e:
                    ok = False
                    self.failures.append(repr(e))
                self.worst = max(self.worst, time.monotonic() - t)
                if not ok:
                    self.failures.append("status")
                time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def check(self):
        assert not self.failures and self.worst < 1.0, (self.worst, self.failures[:3])


def hold_model_thread(model):
    """Blocks the model thread at its next forward pass until `release()` (any batching mode); `release.entered` is
    set once the model thread is held."""
    gate, entered = threading.Event(), threading.Event()

    def hold(*args):
        entered.set()
        gate.wait(120)  # (returns None: the module's inputs are left as they are)

    handles = [m.register_forward_pre_hook(hold) for m in model.modules()]

    def release():
        gate.set()
        for h in handles:
            h.remove()

    release.entered = entered
    return release


def wait_for(predicate, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- 1. bounded work before refusal

def spy_tokenizer(app):
    """Records the characters of every text the service hands to its tokenizer."""
    tokenizer, seen = app.state.service.tokenizer, []
    encode_batch = tokenizer.encode_batch

    def spy(texts):
        seen.extend(len(t) for t in texts)
        return encode_batch(texts)

    tokenizer.encode_batch = spy
    return seen


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(llava_dir):
    """Finding 1: a 10 MB prompt was tokenized in full (seconds, +1.6 GB) before the context check."""
    app = create_app(llava_dir)
    seen = spy_tokenizer(app)
    limit = app.state.service.max_text_chars
    with running(app) as url:
        start = time.monotonic()
        r = httpx.post(url + CHAT, json=chat("describe the image " * 100_000), timeout=30)  # 1.9 MB of text
        took = time.monotonic() - start
        error = assert_error(r, 400, "context_length_exceeded", "messages")
        assert "1900000 characters" in error["message"]
        # parts of text are measured together, whitespace included (it is tokenized too)
        parts = [{"type": "text", "text": "x" * (limit // 3)} for _ in range(4)]
        assert_error(httpx.post(url + CHAT, json=chat(parts)), 400, "context_length_exceeded", "messages")
        assert_error(httpx.post(url + CHAT, json=chat(" " * 100_000 + "hi")), 400, "context_length_exceeded",
                     "messages")
        assert httpx.post(url + CHAT, json=chat("x" * 100)).status_code == 200
    assert max(seen) <= limit  # nothing longer than the bound was ever tokenized
    assert took < 5


def test_embedding_and_classify_texts_are_measured_before_tokenizing(clip_dir):
    app = create_app(clip_dir)
    seen = spy_tokenizer(app)
    limit = app.state.service.max_text_chars
    with running(app) as url:
        r = httpx.post(url + "/v1/embeddings", json={"input": ["a red circle", "x" * 1_000_000]})
        assert_error(r, 400, "context_length_exceeded", "input.1")
        r = httpx.post(url + "/v1/classify", json={"image": data_uri(png_bytes()), "labels": ["a", "b" * 500_000]})
        assert_error(r, 400, "context_length_exceeded", "labels.1")
        r = httpx.post(url + "/v1/classify", json={"image": data_uri(png_bytes()), "labels": ["a"] * 1000,
                                                   "template": "{} " + "x" * 500_000})
        assert_error(r, 400, "context_length_exceeded", "template")  # before 1000 copies of it are made
    assert max(seen, default=0) <= limit


def test_a_body_of_many_tiny_parts_is_refused_after_a_bounded_parse(llava_dir):
    """Finding 1: 700 k empty text parts (18 MB) blocked the event loop 2.7 s, /health included."""
    app = create_app(llava_dir, ServeConfig(max_json_values=5_000, max_parts=100))
    body = json.dumps(chat([{"type": "text", "text": ""}] * 300_000)).encode()  # 9 MB
    with running(app) as url, HealthWatch(url) as watch:
        for _ in range(3):
            start = time.monotonic()
            r = httpx.post(url + CHAT, content=body, headers={"Content-Type": "application/json"}, timeout=30)
            assert_error(r, 400, "too_many_values", None)
            assert time.monotonic() - start < 3
        parts = [{"type": "text", "text": "a"}] * 200  # under the value budget, over the parts limit
        assert_error(httpx.post(url + CHAT, json=chat(parts)), 400, "too_many_parts", "messages")
    watch.check()


@pytest.mark.slow
def test_preparation_runs_on_the_bounded_pool_within_the_deadline(llava_dir):
    """Finding 1: decoding and tokenizing ran on the default thread pool, outside the deadline and any count."""
    app = create_app(llava_dir, ServeConfig(prep_threads=1, timeout_s=1.0))
    service, threads, started = app.state.service, [], []
    build = service.job

    def slow(*args):
        threads.append(threading.current_thread().name)
        started.append(time.monotonic())
        time.sleep(2.0)  # an image that takes long to decode
        return build(*args)

    service.job = slow
    with running(app) as url:
        statuses = []

        def post():
            statuses.append(httpx.post(url + CHAT, json=chat("hi"), timeout=30))

        clients = [threading.Thread(target=post) for _ in range(3)]
        start = time.monotonic()
        for c in clients:
            c.start()
        for c in clients:
            c.join(30)
        took = time.monotonic() - start
        for r in statuses:
            assert_error(r, 504, "timeout", None)
        assert took < 2.0  # answered at the deadline, not when the preparation ended
        wait_for(lambda: app.state.admission.waiting == 0, "the count to empty")
        time.sleep(1.5)
        assert len(started) == 1  # one thread: the others' preparation never started (their deadline passed)
        service.job = build
        assert httpx.post(url + CHAT, json=chat("hi")).status_code == 200
    assert threads and all(name.startswith("mmlm-prep") for name in threads)


def test_the_queue_counts_requests_from_arrival(llava_dir):
    """Finding 1: the queue limit counted only jobs already prepared; a body still arriving was not counted."""
    app = create_app(llava_dir, ServeConfig(max_queue=2, body_timeout_s=5))
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for s in slow:  # two requests whose bodies are still on their way
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
        wait_for(lambda: httpx.get(url + "/health").json()["queue"] == 2, "two waiting requests")
        r = httpx.post(url + CHAT, json=chat("hi"))
        assert_error(r, 429, "queue_full", None)
        assert r.headers["retry-after"] == "1"
        for s in slow:
            s.close()  # they leave: the count falls and requests are served again
        wait_for(lambda: httpx.get(url + "/health").json()["queue"] == 0, "the queue to empty")
        assert httpx.post(url + CHAT, json=chat("hi")).status_code == 200


def test_abandoned_streams_leave_the_queue_count_at_once(llava_dir):
    """Finding 6: abandoned streams stayed counted until the model thread reached them (/health showed 64/64)."""
    app = create_app(llava_dir, ServeConfig(max_queue=4, max_batch=1))
    release = hold_model_thread(app.state.service.model)
    body = chat("hi", stream=True, max_tokens=4)
    try:
        with running(app) as url:
            blocker = threading.Thread(target=lambda: httpx.post(url + CHAT, json=chat("hi"), timeout=60))
            blocker.start()
            # held in the blocker's forward (queue 0 alone also holds before the blocker has even arrived: then a
            # stream would be taken instead, and the late blocker would stay in the count for good)
            wait_for(lambda: release.entered.is_set() and httpx.get(url + "/health").json()["queue"] == 0,
                     "the model thread to take the first request")
            streams = []
            for _ in range(4):  # they wait behind the held model thread, then their clients leave
                client = httpx.Client(timeout=30)
                stream = client.stream("POST", url + CHAT, json=body)
                lines = stream.__enter__().iter_lines()  # kept: a dropped iterator closes the connection
                next(lines)
                streams.append((client, stream, lines))
            assert httpx.get(url + "/health").json()["queue"] == 4
            assert_error(httpx.post(url + CHAT, json=chat("hi")), 429, "queue_full", None)
            for client, stream, _ in streams:
                stream.__exit__(None, None, None)
                client.close()
            # well inside the model thread's hold (120 s): a count that waited for the model thread would not drop
            wait_for(lambda: httpx.get(url + "/health").json()["queue"] == 0, "the abandoned streams to leave", 30)
            assert app.state.service.worker.depth == 0  # the worker does not count them either
            release()
            blocker.join(60)
            assert httpx.post(url + CHAT, json=chat("hi"), timeout=30).status_code == 200
    finally:
        release()


# ----------------------------------------------------------------------------- 2. remote images

class ImageServer:
    """A local HTTP server for image fetches: mode ok | drip | redirect | notfound | huge | hang."""

    def __init__(self, mode: str = "ok"):
        self.mode, self.requests, self.connections = mode, [], 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/image.png"

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(30)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                self.requests.append(head.decode("latin-1"))
                png = png_bytes(size=(32, 32))
                if self.mode == "ok":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(png)
                                 + png)
                elif self.mode == "redirect":
                    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/\r\nContent-Length: 0\r\n\r\n"
                                 % self.port)
                elif self.mode == "notfound":
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                elif self.mode == "huge":  # chunked: no length to refuse up front
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    while not self.stop.is_set():
                        conn.sendall(b"10000\r\n" + b"\0" * 0x10000 + b"\r\n")
                elif self.mode == "drip":  # a byte every 0.2 s: no single read ever waits long
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png))
                    for byte in png:
                        if self.stop.wait(0.2):
                            return
                        conn.sendall(bytes([byte]))
                elif self.mode == "hang":
                    self.stop.wait(60)
            except OSError:
                return

    def close(self):
        self.stop.set()
        self.sock.close()


@contextmanager
def image_server(mode: str = "ok"):
    server = ImageServer(mode)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def remote_server(llava_dir):
    """Remote images allowed, loopback included (the test image servers are local), short fetch deadlines."""
    app = create_app(llava_dir, ServeConfig(allow_remote=True, allow_private_remote=True, fetch_timeout_s=1.5,
                                            max_image_bytes=200_000))
    with running(app) as url:
        yield url, app


def test_a_remote_image_is_fetched_and_answered(remote_server):
    url, _ = remote_server
    with image_server("ok") as images:
        r = httpx.post(url + CHAT, json=image_chat(images.url()), timeout=30)
    assert r.status_code == 200, r.text
    assert images.requests[0].startswith("GET /image.png HTTP/1.1\r\n")


@pytest.mark.slow
def test_a_dripping_image_server_meets_one_deadline_per_fetch(remote_server):
    """Finding 2: the 10 s timeout was per read, so a byte every 2 s held the chat (8 of them: ~50 s)."""
    url, _ = remote_server
    with image_server("drip") as images, HealthWatch(url) as watch:
        start = time.monotonic()
        r = httpx.post(url + CHAT, json=image_chat(images.url()), timeout=30)
        took = time.monotonic() - start
    assert_error(r, 400, "image_fetch_failed", IMAGE_PARAM)
    assert 1.4 < took < 3.0  # the 1.5 s deadline, not the 20 s the drip lasts
    watch.check()


@pytest.mark.parametrize("mode", ["redirect", "notfound", "hang", "closed"])
def test_fetch_failures_read_the_same(remote_server, mode):
    """Finding 2: the error told an open port from a closed one; a redirect is never followed."""
    url, _ = remote_server
    if mode == "closed":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        target = f"http://127.0.0.1:{sock.getsockname()[1]}/image.png"
        sock.close()
        r = httpx.post(url + CHAT, json=image_chat(target), timeout=30)
    else:
        with image_server(mode) as images:
            r = httpx.post(url + CHAT, json=image_chat(images.url()), timeout=30)
            assert images.connections == 1  # one try: no redirect was followed
    error = assert_error(r, 400, "image_fetch_failed", IMAGE_PARAM)
    assert error["message"] == f"{IMAGE_PARAM}: fetching the image failed"


def test_a_remote_image_is_capped_while_it_streams(remote_server):
    url, _ = remote_server
    with image_server("huge") as images:
        start = time.monotonic()
        r = httpx.post(url + CHAT, json=image_chat(images.url()), timeout=30)
    assert_error(r, 413, "image_too_large", IMAGE_PARAM)
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("host", ["127.0.0.1", "0x7f000001", "2130706433", "127.1", "0177.0.0.1", "localhost",
                                  "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"])
def test_loopback_in_any_spelling_is_not_fetched(llava_dir, host, private_refusing_server):
    """Finding 2: loopback, private and link-local addresses were fetched (SSRF)."""
    url = private_refusing_server
    with image_server("ok") as images:
        r = httpx.post(url + CHAT, json=image_chat(images.url(host)), timeout=30)
        assert images.connections == 0
    error = assert_error(r, 400, "image_source_not_allowed", IMAGE_PARAM)
    assert "not allowed" in error["message"]


@pytest.fixture(scope="module")
def private_refusing_server(llava_dir):
    app = create_app(llava_dir, ServeConfig(allow_remote=True, fetch_timeout_s=2))
    with running(app) as url:
        yield url


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png",
                                    "http://192.168.1.1/x.png", "http://[fe80::1]/x.png", "http://224.0.0.1/x.png"])
def test_private_link_local_and_multicast_addresses_are_not_fetched(private_refusing_server, target):
    r = httpx.post(private_refusing_server + CHAT, json=image_chat(target), timeout=30)
    assert_error(r, 400, "image_source_not_allowed", IMAGE_PARAM)


def test_credentials_in_an_image_url_are_refused(private_refusing_server):
    with image_server("ok") as images:
        r = httpx.post(private_refusing_server + CHAT, json=image_chat(f"http://user:pw@127.0.0.1:{images.port}/x"))
        assert images.connections == 0
    assert_error(r, 400, "image_source_not_allowed", IMAGE_PARAM)


def test_public_address_rule():
    import ipaddress

    from mmlm.serve.fetch import public_address

    for bad in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
                "224.0.0.1", "255.255.255.255", "240.0.0.1", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
                "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::", "64:ff9b::7f00:1"]:
        assert not public_address(ipaddress.ip_address(bad)), bad
    for good in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]:
        assert public_address(ipaddress.ip_address(good)), good


def test_a_fetch_connects_to_the_address_it_checked(monkeypatch):
    """DNS rebinding: the name is resolved once; the connection goes to that address, not to a second lookup."""
    from mmlm.serve import fetch as fetch_module

    lookups = []
    real = asyncio.BaseEventLoop.getaddrinfo

    async def getaddrinfo(self, host, port, **kw):
        lookups.append(host)
        if len(lookups) > 1:  # a rebinding resolver's second answer
            return await real(self, "10.0.0.1", port, **kw)
        return await real(self, "127.0.0.1", port, **kw)

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    with image_server("ok") as images:
        got = asyncio.run(fetch_module.fetch(f"http://rebind.test:{images.port}/a.png", "image", 100_000, 5,
                                             allow_private=True))
        assert got == png_bytes(size=(32, 32)) and lookups == ["rebind.test"]
        assert f"Host: rebind.test:{images.port}" in images.requests[0]
        with pytest.raises(Exception) as refused:  # without --allow-private-remote: refused before connecting
            asyncio.run(fetch_module.fetch(f"http://rebind.test:{images.port}/a.png", "image", 100_000, 5))
        assert refused.value.code == "image_source_not_allowed" and images.connections == 1


# ----------------------------------------------------------------------------- 3. no 500s

@pytest.fixture(scope="module")
def local_server(llava_dir, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "red.png").write_bytes(png_bytes())
    app = create_app(llava_dir, ServeConfig(local_dir=str(allowed)))
    with running(app) as url:
        yield url


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 5e-5])
def test_a_tiny_temperature_is_greedy_not_nan(local_server, temperature):
    """Finding 3: temperature 1e-300 answered 500 "probability tensor contains inf/nan" (the whole batch)."""
    greedy = httpx.post(local_server + CHAT, json=chat("what shape?", max_tokens=8, temperature=0), timeout=30)
    tiny = httpx.post(local_server + CHAT, json=chat("what shape?", max_tokens=8, temperature=temperature), timeout=30)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


@pytest.mark.parametrize("path", ["red.png\0.jpg", "file:///red%00.png", "x" * 5000 + ".png", "a/" * 3000 + "b"])
def test_odd_local_paths_are_a_400(local_server, path):
    """Finding 3: a NUL byte in a local image path was a 500 (so was a name too long for the filesystem)."""
    r = httpx.post(local_server + CHAT, json=image_chat(path))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == IMAGE_PARAM


@pytest.mark.parametrize("body, param", [
    ({"image": data_uri(png_bytes()), "labels": ["ok", "x\ud800"]}, "labels.1"),
    ({"image": data_uri(png_bytes()), "labels": ["a"], "template": "\udfff {}"}, "template"),
    ({"image": data_uri(png_bytes()), "labels": ["a"], "model": "\ud800"}, "model"),
    ({"image": data_uri(png_bytes()), "labels": ["a"], "extra": {"deep": ["\ud83d"]}}, "extra.deep.0"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field_before_any_work(clip_dir, body, param):
    """Finding 3: a lone surrogate in a label failed when the response was serialised: 500, after the work."""
    app = create_app(clip_dir)
    with running(app) as url:
        raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as \\ud800, as a client sends it
        r = httpx.post(url + "/v1/classify", content=raw, headers={"Content-Type": "application/json"})
        assert_error(r, 400, "invalid_value", param)
        assert app.state.service.worker.batches == 0  # refused before any model work


def test_a_lone_surrogate_in_chat_text_and_stop(local_server):
    for body, param in [(chat("hi \ud800"), "messages.0.content"), (chat("hi", stop=["\udc00"]), "stop.0"),
                        (chat([{"type": "text", "text": "\ud800"}]), "messages.0.content.0.text")]:
        r = httpx.post(local_server + CHAT, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert_error(r, 400, "invalid_value", param)


# ----------------------------------------------------------------------------- 4. auth

@pytest.fixture(scope="module")
def keyed_server(llava_dir):
    app = create_app(llava_dir, ServeConfig(api_key="sesame"))
    with running(app) as url:
        yield url


def test_auth_comes_before_the_body_and_says_how(keyed_server):
    """Finding 4: malformed JSON was answered 400 before auth answered 401; 401 had no WWW-Authenticate."""
    url = keyed_server
    r = httpx.post(url + CHAT, content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 401, "invalid_api_key", None)
    assert r.headers["www-authenticate"] == "Bearer"
    for header in ["Bearer wrong", "Bearer", "Basic c2VzYW1l", "sesame", "Bearer sesame2", "Bearer sesam", "Bearer  x"]:
        assert httpx.get(url + "/v1/models", headers={"Authorization": header}).status_code == 401, header
    assert httpx.get(url + "/v1/models", headers={"Authorization": "bearer sesame"}).status_code == 200
    # a body that never comes: 401 from the headers alone, at once
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 401")
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200


def test_the_key_is_compared_in_constant_time(keyed_server, monkeypatch):
    import mmlm.serve.edge as edge

    calls = []
    real = edge.hmac.compare_digest
    monkeypatch.setattr(edge.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert httpx.get(keyed_server + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert calls


def test_an_empty_key_is_an_error_and_keys_come_from_env_or_file(monkeypatch, tmp_path, llava_dir, capsys):
    """Finding 4: --api-key "" silently turned auth off; the key could only be given on the command line."""
    from mmlm.cli import main

    with pytest.raises(ValueError, match="empty"):
        ServeConfig(api_key="")
    seen = {}
    monkeypatch.setattr("mmlm.serve.app.serve", lambda model, host, port, config, insecure: seen.update(config=config))
    monkeypatch.delenv("MMLM_API_KEY", raising=False)
    args = ["serve", "--model", str(llava_dir)]
    assert main([*args, "--api-key", ""]) == 2 and "empty" in capsys.readouterr().err
    monkeypatch.setenv("MMLM_API_KEY", "from-env")
    assert main(args) == 0 and seen["config"].api_key == "from-env"
    assert main([*args, "--api-key", "x"]) == 2 and "one way" in capsys.readouterr().err
    monkeypatch.setenv("MMLM_API_KEY", "  ")
    assert main(args) == 2
    monkeypatch.delenv("MMLM_API_KEY")
    (tmp_path / "key").write_text("from-file\n")
    assert main([*args, "--api-key-file", str(tmp_path / "key")]) == 0 and seen["config"].api_key == "from-file"
    (tmp_path / "empty").write_text("\n")
    assert main([*args, "--api-key-file", str(tmp_path / "empty")]) == 2


def test_serving_the_network_without_a_key_needs_insecure(monkeypatch, llava_dir, caplog):
    """Finding 4: --host 0.0.0.0 without a key gave no warning."""
    import uvicorn

    from mmlm.serve.app import serve

    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: ran.append(self.config))
    with pytest.raises(ValueError, match="--insecure"):
        serve(llava_dir, host="0.0.0.0")
    serve(llava_dir, host="0.0.0.0", insecure=True)
    assert "without an API key" in caplog.text
    serve(llava_dir, host="0.0.0.0", config=ServeConfig(api_key="k"))
    serve(llava_dir, host="127.0.0.1")
    serve(llava_dir, host="localhost")
    assert len(ran) == 4


def test_a_keyless_server_answers_only_hosts_it_knows(llava_dir):
    """Finding 4: the Host header was not checked (DNS rebinding against a key-less localhost server)."""
    app = create_app(llava_dir, ServeConfig(allowed_hosts=("mybox.lan",)))
    with running(app) as url:
        port = url.rsplit(":", 1)[1]
        for host in ["evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io"]:
            r = httpx.get(url + "/v1/models", headers={"Host": host})
            assert_error(r, 400, "invalid_host", None)
            assert httpx.get(url + "/", headers={"Host": host}).status_code == 400
        for host in [f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "LOCALHOST", "mybox.lan:8000", "192.168.1.7",
                     "app.localhost"]:
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
    keyed = create_app(llava_dir, ServeConfig(api_key="k"))
    with running(keyed) as url:  # with a key, the key decides
        assert httpx.get(url + "/v1/models", headers={"Host": "evil.example", "Authorization": "Bearer k"}
                         ).status_code == 200


# ----------------------------------------------------------------------------- 5. slow clients

def closed_within(port: int, send: bytes, drip: bytes, every: float, limit: float) -> tuple[bool, bytes]:
    """Connects, sends `send`, then a byte of `drip` (if any) every `every` s; whether the server closed the
    connection within `limit` s, and what it sent."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(send)
        s.settimeout(every)
        got, start, k = b"", time.monotonic(), 0
        while time.monotonic() - start < limit:
            try:
                data = s.recv(4096)
                if not data:
                    return True, got
                got += data
            except socket.timeout:
                pass
            except ConnectionResetError:
                return True, got
            if drip:
                try:
                    s.sendall(drip[k % len(drip):k % len(drip) + 1])
                except OSError:
                    return True, got
                k += 1
        return False, got


@pytest.mark.slow  # waits out the header and keep-alive timeouts
def test_slow_headers_and_idle_connections_are_closed(llava_dir):
    """Finding 5: 16 connections sending headers slowly stayed open 30 s+ (no read timeout)."""
    app = create_app(llava_dir, ServeConfig(header_timeout_s=1.0, keep_alive_s=15))
    with running(app) as url, HealthWatch(url) as watch:
        port = int(url.rsplit(":", 1)[1])
        results = [None] * 16

        def attack(k):
            if k % 2:  # connects and sends nothing
                results[k] = closed_within(port, b"", b"", 0.2, 4)
            else:
                results[k] = closed_within(port, b"POST /v1/chat/completions HTTP/1.1\r\n", b"X-Slow: aaaa\r\n", 0.2, 4)

        threads = [threading.Thread(target=attack, args=(k,)) for k in range(16)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert all(closed for closed, _ in results), results
        assert time.monotonic() - start < 3
        # keep-alive as before: an idle connection between requests stays usable
        with httpx.Client() as c:
            assert c.get(url + "/health").status_code == 200
            time.sleep(2)
            assert c.get(url + "/health").status_code == 200
    watch.check()


@pytest.mark.slow
def test_a_slow_body_gets_408_and_the_connection_closes(llava_dir):
    """Finding 5: bodies sent slowly held their connection (and a place) for as long as the client liked."""
    app = create_app(llava_dir, ServeConfig(body_timeout_s=1.0))
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n")
        start = time.monotonic()
        closed, got = closed_within(port, head, b" ", 0.1, 4)
        assert closed and time.monotonic() - start < 2.5
        assert got.startswith(b"HTTP/1.1 408") and b"body_timeout" in got and b"connection: close" in got.lower()
        assert httpx.get(url + "/health").json()["queue"] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(model_dir, *flags: str):
    """`mmlm serve` in its own process on 127.0.0.1; yields (url, process)."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MMLM_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "mmlm.cli", "serve", "--model", str(model_dir), "--port", str(port),
                             "--threads", "1", *flags], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


@pytest.mark.slow  # waits out the shutdown timeout in a subprocess
def test_sigterm_with_a_half_sent_body_ends_within_the_shutdown_timeout(llava_dir):
    """Finding 5: SIGTERM waited forever on a half-sent body (no graceful-shutdown bound)."""
    with server_process(llava_dir, "--shutdown-timeout", "1", "--body-timeout", "60", "--timeout", "60") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"messages\"")
            wait_for(lambda: httpx.get(url + "/health").json()["queue"] == 1, "the half-sent request")
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
            assert time.monotonic() - start < 4


# ----------------------------------------------------------------------------- 6. silently accepted

@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}), ("functions", [{"name": "f"}]),
    ("function_call", "auto"), ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    ("response_format", {"type": "json_object"}), ("logprobs", True), ("top_logprobs", 3),
    ("logit_bias", {"1": 5}), ("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("modalities", ["audio"]),
    ("audio", {"voice": "x"}), ("prediction", {"type": "content", "content": "x"}),
])
def test_unsupported_openai_fields_are_refused_naming_them(local_server, field, value):
    """Finding 6: tools, json_schema, logprobs ... were ignored with 200."""
    r = httpx.post(local_server + CHAT, json=chat("hi", **{field: value}))
    assert_error(r, 400, "unsupported_parameter", field)


def test_defaults_of_unsupported_fields_are_accepted(local_server):
    r = httpx.post(local_server + CHAT, json=chat("hi", tools=[], tool_choice="none", response_format={"type": "text"},
                                                  logprobs=False, logit_bias={}, presence_penalty=0, n=1,
                                                  modalities=["text"], user="u", metadata={"a": "b"}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("max_tokens", "5"), ("max_tokens", 2.5),
                                          ("temperature", True), ("temperature", "0.5"), ("stream", "yes"),
                                          ("seed", False), ("n", True), ("top_p", "1")])
def test_types_are_strict(local_server, field, value):
    """Finding 6: max_tokens: true was taken as 1."""
    assert_error(httpx.post(local_server + CHAT, json=chat("hi", **{field: value})), 400, "invalid_value", field)


def test_image_errors_show_no_heap_addresses(local_server):
    """Finding 6: image errors showed `<_io.BytesIO object at 0x…>`."""
    for data in [b"hello, I am text", png_bytes()[:60], b"GIF89a" + b"\0" * 20]:
        error = assert_error(httpx.post(local_server + CHAT, json=image_chat(data_uri(data))), 400, "invalid_image",
                             IMAGE_PARAM)
        assert "0x" not in error["message"] and "object at" not in error["message"]


def test_the_default_model_id_names_the_run(tmp_path):
    """Build 5: the default id was the directory's name, `final` for every training run."""
    from mmlm.serve.service import model_id

    assert model_id(tmp_path / "runs" / "shapes-clip" / "final") == "shapes-clip"
    assert model_id(tmp_path / "runs" / "llava-s2" / "checkpoints" / "step-00000300") == "llava-s2-step-300"
    assert model_id(tmp_path / "models" / "SmolLM2-135M-Instruct-Q8_0.gguf") == "SmolLM2-135M-Instruct-Q8_0"
    assert model_id(tmp_path / "tiny-llava") == "tiny-llava"
    run = tiny_llava(tmp_path / "my-run" / "final")
    app = create_app(run)
    with running(app) as url:
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "my-run"
        assert httpx.get(url + "/health").json()["model"] == "my-run"  # the page shows /health's model


# ----------------------------------------------------------------------------- neighbours

@pytest.mark.parametrize("raw, code", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', "invalid_json"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_json"),
    (b'{"max_tokens": 1' + b"0" * 10_000 + b"}", "invalid_json"),
    (b"[1, 2, 3]", "invalid_json"),
    (b"", "invalid_json"),
])
def test_hostile_json(local_server, raw, code):
    r = httpx.post(local_server + CHAT, content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, code, None)


def test_non_json_bodies_are_refused_unread(local_server):
    """A page of another site can POST text/plain without asking: it gets 415 before any work."""
    r = httpx.post(local_server + CHAT, content=json.dumps(chat("hi")), headers={"Content-Type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type", None)


def test_long_stop_strings_are_refused(local_server):
    assert_error(httpx.post(local_server + CHAT, json=chat("hi", stop=["x" * 300])), 400, "invalid_value", "stop")


def test_too_many_images_are_not_fetched(llava_dir):
    app = create_app(llava_dir, ServeConfig(allow_remote=True, allow_private_remote=True, max_images=2))
    with running(app) as url, image_server("ok") as images:
        parts = [{"type": "image_url", "image_url": {"url": images.url()}}] * 5
        r = httpx.post(url + CHAT, json=chat(parts))
        assert_error(r, 400, "too_many_images", "messages.0.content.2.image_url")
        assert images.connections <= 2


# ----------------------------------------------------------------------------- the whole attack at once

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_big_prompts_and_dripping_images_do_not_take_the_server(llava_dir):
    """Done when: while 6 clients send big prompts and 8 fetch from a dripping image server, a small chat from
    another client is answered within 2 s of its normal latency and the server's RSS stays under 1.5x idle.

    Scaled down: 6 x 4 MB prompts, fetch deadline 3 s. Full size (10 MB prompts, the default 10 s deadline):
    MMLM_ATTACK_MB=10 MMLM_ATTACK_FETCH_S=10 pytest -m slow -s -k big_prompts tests/test_serve_hostile.py"""
    megabytes, fetch_s = float(os.environ.get("MMLM_ATTACK_MB", 4)), os.environ.get("MMLM_ATTACK_FETCH_S", "3")
    prompt = chat("describe the image " * int(megabytes * 1e6 / 19))
    raw = json.dumps(prompt).encode()
    small = chat("hi", max_tokens=4, temperature=0)
    with server_process(llava_dir, "--allow-remote-images", "--allow-private-remote", "--fetch-timeout", fetch_s) as (
            url, proc), image_server("drip") as images:
        with httpx.Client(timeout=30) as c:
            times = []
            for _ in range(5):
                start = time.monotonic()
                assert c.post(url + CHAT, json=small).status_code == 200
                times.append(time.monotonic() - start)
        normal = sorted(times)[2]
        idle = rss_mb(proc.pid)
        stop, statuses, peak = threading.Event(), [], [idle]

        def big():
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    statuses.append(c.post(url + CHAT, content=raw, headers={"Content-Type": "application/json"})
                                    .json()["error"]["code"])

        def drip():
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    statuses.append(c.post(url + CHAT, json=image_chat(images.url())).json()["error"]["code"])

        def sample():
            while not stop.is_set():
                peak.append(rss_mb(proc.pid))
                time.sleep(0.05)

        attackers = [threading.Thread(target=big) for _ in range(6)] + [threading.Thread(target=drip) for _ in range(8)]
        attackers.append(threading.Thread(target=sample))
        with HealthWatch(url) as watch:
            for t in attackers:
                t.start()
            time.sleep(2)  # the attack is under way
            latencies = []
            with httpx.Client(timeout=30) as c:
                for _ in range(5):
                    start = time.monotonic()
                    r = c.post(url + CHAT, json=small)
                    latencies.append(time.monotonic() - start)
                    assert r.status_code == 200, r.text
                    time.sleep(0.5)
            stop.set()
            for t in attackers:
                t.join(60)
        time.sleep(1)
        after = rss_mb(proc.pid)
    print(f"\n{len(raw) / 1e6:.1f} MB prompts, {fetch_s} s fetches: small chat: normal {normal:.3f} s, under attack max {max(latencies):.3f} s; /health worst "
          f"{watch.worst:.3f} s; RSS idle {idle:.0f} MB, peak {max(peak):.0f} MB, after {after:.0f} MB; "
          f"{len(statuses)} attacking requests: {sorted(set(statuses))}")
    assert set(statuses) <= {"context_length_exceeded", "image_fetch_failed"}
    assert max(latencies) < normal + 2.0
    watch.check()
    assert max(peak) < 1.5 * idle
