"""Load test of `mmlm serve` on loopback: N concurrent clients for S seconds; latency p50/p99, throughput, errors.

    python benchmarks/bench_serve.py [--endpoint chat|embeddings|both] [--clients 50] [--seconds 60]
                                     [--model DIR] [--max-tokens 8-128] [--threads 1]
                                     [--batching continuous static] [--rounds 1]

The server runs as its own process (`mmlm serve`), as in production; each client sends its next request as
soon as the last is answered. chat: one image + a question per request (the tiny random LLaVA unless --model),
greedy; `--max-tokens` is one number, or a range LO-HI: each request then asks for LO, 2 LO, 4 LO, ... HI new
tokens, drawn at random (8-128: 8, 16, 32, 64 or 128), and "short" requests are those asking for LO.
embeddings: 4 texts + 1 image per request (the tiny random CLIP). Chat runs once per `--batching` mode per
round, each mode its own server started once, the modes alternated (ABBA...) so that a shared machine's drift
falls on both; prints one JSON line per run, then one per mode with the median and range over the rounds.
`mean_batch_rows` is requests per `generate` call with static batching, running rows per decoding step with
continuous batching. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=None)  # the clients share the machine with the server: no PNG encoding per request
def png_uri(seed: int, size: int = 64) -> str:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def token_choices(spec: str) -> list[int]:
    """"16" -> [16]; "8-128" -> [8, 16, 32, 64, 128]."""
    lo, _, hi = spec.partition("-")
    choices = [int(lo)]
    while hi and choices[-1] * 2 <= int(hi):
        choices.append(choices[-1] * 2)
    return choices


def request_body(endpoint: str, k: int, max_tokens: int) -> tuple[str, dict]:
    if endpoint == "chat":
        question = ["what shape is this?", "what colour is the object?", "how many objects are there?"][k % 3]
        return "/v1/chat/completions", {"max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_uri(k % 16)}}, {"type": "text", "text": question}]}]}
    texts = [f"a photo of a {c} {s}." for c, s in zip(["red", "blue", "green", "white"],
                                                       ["circle", "star", "square", "cross"][k % 4:] + ["circle"] * 4)]
    return "/v1/embeddings", {"input": texts + [png_uri(k % 16)], "encoding_format": "base64"}


async def client(url: str, endpoint: str, k: int, until: float, choices: list[int], http: httpx.AsyncClient,
                 latencies: list, errors: list, tokens: list) -> None:
    n, rng = 0, np.random.default_rng(k)
    while time.monotonic() < until:
        max_tokens = int(rng.choice(choices))
        path, body = request_body(endpoint, k * 1000 + n, max_tokens)
        start = time.monotonic()
        try:
            r = await http.post(url + path, json=body)
            if r.status_code != 200:
                errors.append(f"{time.monotonic() - start:.1f}s: HTTP {r.status_code}: {r.text[:200]}")
            else:
                latencies.append((time.monotonic() - start, max_tokens))
                if endpoint == "chat":
                    tokens.append(r.json()["usage"]["completion_tokens"])
        except httpx.HTTPError as e:
            errors.append(f"{time.monotonic() - start:.1f}s: {type(e).__name__}: {e!r}")
        n += 1


async def load(url: str, endpoint: str, clients: int, seconds: float, choices: list[int]) -> dict:
    latencies: list[tuple[float, int]] = []
    errors: list[str] = []
    tokens: list[int] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        before = (await http.get(url + "/health")).json()
        start = time.monotonic()
        await asyncio.gather(*(client(url, endpoint, k, start + seconds, choices, http, latencies, errors, tokens)
                               for k in range(clients)))
        wall = time.monotonic() - start
        after = (await http.get(url + "/health")).json()
    lat = np.array([t for t, _ in latencies]) * 1000
    short = np.array([t for t, m in latencies if m == choices[0]]) * 1000
    batches = after["batches"] - before["batches"]
    out = {"endpoint": endpoint, "clients": clients, "seconds": round(wall, 1), "requests": len(latencies),
           "errors": len(errors), "throughput_rps": round(len(latencies) / wall, 2),
           "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
           "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
           "max_ms": round(float(lat.max()), 1) if len(lat) else None,
           "short_requests": len(short),
           "short_p50_ms": round(float(np.percentile(short, 50)), 1) if len(short) else None,
           "short_p99_ms": round(float(np.percentile(short, 99)), 1) if len(short) else None,
           "mean_batch_rows": round((after["rows"] - before["rows"]) / batches, 2) if batches else None}
    if endpoint == "chat":
        out["completion_tokens_per_s"] = round(sum(tokens) / wall, 1)
    if errors:
        out["first_errors"] = errors[:3]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, threads: int | None, log: Path, batching: str) -> tuple[subprocess.Popen, str]:
    """`mmlm serve` in its own process; batching "MODE" or "MODE:MAX_BATCH" (e.g. "static:32")."""
    port = free_port()
    mode, _, max_batch = batching.partition(":")
    cmd = [sys.executable, "-m", "mmlm", "serve", "--model", str(model), "--port", str(port), "--batching", mode]
    if max_batch:
        cmd += ["--max-batch", max_batch]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # a pipe nobody reads would fill
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mmlm serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("mmlm serve did not start within 120 s")


SUMMARY = ["throughput_rps", "completion_tokens_per_s", "p50_ms", "p99_ms", "short_p50_ms", "short_p99_ms"]


def summarize(batching: str, runs: list[dict]) -> dict:
    """The median of each figure over the rounds, and its range [min, max]."""
    out = {"summary": batching, "rounds": len(runs)}
    for key in SUMMARY:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = {"median": round(float(np.median(values)), 1), "range": [min(values), max(values)]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", choices=["chat", "embeddings", "both"], default="both")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--model", type=Path, default=None, help="serve this model (default: tiny random LLaVA / CLIP)")
    p.add_argument("--max-tokens", default="8-128", help="chat: N, or LO-HI (LO, 2 LO, ... HI at random)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (0: torch's default)")
    p.add_argument("--batching", nargs="+", default=["continuous", "static"], metavar="MODE[:MAX_BATCH]",
                   help="chat: the servers to measure, each once per round: continuous or static, with the server's "
                        "default --max-batch or the one given (e.g. static:32)")
    p.add_argument("--rounds", type=int, default=1, help="chat: runs of each batching mode, alternated")
    args = p.parse_args(argv)
    from mmlm.serve.tiny import tiny_clip, tiny_llava

    choices = token_choices(args.max_tokens)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for endpoint in (["chat", "embeddings"] if args.endpoint == "both" else [args.endpoint]):
            model = args.model or (tiny_llava if endpoint == "chat" else tiny_clip)(Path(tmp) / f"tiny-{endpoint}")
            modes = args.batching if endpoint == "chat" else ["continuous"]  # embeddings batch at admission
            servers = {}
            try:
                for mode in modes:
                    log = Path(tmp) / f"server-{endpoint}-{mode}.log"
                    servers[mode] = (*start_server(model, args.threads, log, mode), log)
                runs: dict[str, list[dict]] = {mode: [] for mode in modes}
                for round_ in range(args.rounds if endpoint == "chat" else 1):
                    for mode in (modes if round_ % 2 == 0 else modes[::-1]):
                        proc, url, log = servers[mode]
                        result = asyncio.run(load(url, endpoint, args.clients, args.seconds, choices))
                        result.update(model=str(args.model or f"tiny random ({endpoint})"), server_threads=args.threads,
                                      cpus=os.cpu_count(), round=round_)
                        if endpoint == "chat":
                            result.update(batching=mode, max_tokens=args.max_tokens)
                        print(json.dumps(result), flush=True)
                        if result["errors"]:
                            print(f"server log ({endpoint}, {mode}), last lines:\n{log.read_text()[-3000:]}",
                                  file=sys.stderr)
                        failed |= result["errors"] > 0 or result["requests"] == 0
                        runs[mode].append(result)
                if endpoint == "chat":
                    for mode in modes:
                        print(json.dumps(summarize(mode, runs[mode])), flush=True)
            finally:
                for proc, _, _ in servers.values():
                    proc.terminate()
                    proc.wait(30)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
