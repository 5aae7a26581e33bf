"""Where a decoding step's weight reads go: SmolLM2-135M's linear layers (30 blocks x qkv, output, gate-up, down,
and the vocabulary projection) timed alone, as `mmlm.quantize` stores them (int4 Q4_1 blocks, int8 head) through
mmlm's compiled loops (`mmlm/native.py`) and through PyTorch's weight-only kernels (what runs without a C compiler),
and as dense bf16 / fp32, at 1 and 8 rows; beside the machine's memory read bandwidth. Each layer's weights are
read once per call, as decoding reads them; `--cold` first streams 256 MB through the cache, as a whole decoding
step does between two reads of the same layer.

    .venv/bin/python benchmarks/bench_int4_linears.py [--threads 1 2] [--cold]

Prints one JSON line per (threads, rows, storage): milliseconds per decoding step and the weight bytes it reads
over that time (GB/s); and one line per thread count with the read bandwidth of a 64 MB sum.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mmlm import native
from mmlm.quant import QuantLinear

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152
KV = 3 * 64  # 3 key/value heads of 64
BLOCK = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]


def _median_ms(fn, repeats: int, before=None) -> float:
    times = []
    for r in range(repeats + 2):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        if r >= 2:  # two warm-ups
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _torch_kernels(build):
    """`build()` with mmlm's compiled loops out of sight: QuantLinears in PyTorch's own layouts and kernels."""
    kernels, native.kernels = native.kernels, lambda: None
    try:
        return build()
    finally:
        native.kernels = kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cold", action="store_true", help="evict the caches before each timed step")
    args = ap.parse_args()
    torch.manual_seed(0)
    linears = [torch.nn.Linear(k, n, bias=False) for _ in range(LAYERS) for n, k in BLOCK]
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    stores = {
        "int4 blocks + int8 head": ([QuantLinear(m, 4) for m in linears], QuantLinear(head, 8)),
        "same, PyTorch's kernels": _torch_kernels(lambda: ([QuantLinear(m, 4) for m in linears], QuantLinear(head, 8))),
        "bf16": ([torch.nn.Linear(m.in_features, m.out_features, bias=False, dtype=torch.bfloat16) for m in linears],
                 torch.nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.bfloat16)),
        "fp32": (linears, head),
    }
    stored = sum(b.nbytes for m in stores["int4 blocks + int8 head"][0] for b in m.buffers()) + VOCAB * HIDDEN + VOCAB * 2
    weight_bytes = {"int4 blocks + int8 head": stored, "same, PyTorch's kernels": stored,
                    "bf16": 2 * (sum(m.weight.numel() for m in linears) + VOCAB * HIDDEN),
                    "fp32": 4 * (sum(m.weight.numel() for m in linears) + VOCAB * HIDDEN)}
    flush = torch.ones(64 * 1024 * 1024, dtype=torch.float32)  # 256 MB
    evict = (lambda: flush.add_(1.0)) if args.cold else None
    for threads in args.threads:
        torch.set_num_threads(threads)
        big = torch.ones(16 * 1024 * 1024)  # 64 MB
        ms = _median_ms(lambda: big.sum(), args.repeats)
        print(json.dumps({"threads": threads, "read_bandwidth_gb_s": round(0.064 / (ms / 1e3), 1),
                          "what": "sum of a 64 MB float32 tensor"}))
        for rows in (1, 8):
            for name, (blocks, vocab) in stores.items():
                dtype = torch.bfloat16 if name == "bf16" else torch.float32
                x = torch.randn(rows, HIDDEN, dtype=dtype)
                xi = torch.randn(rows, INTERMEDIATE, dtype=dtype)

                def step(blocks=blocks, vocab=vocab, x=x, xi=xi) -> None:
                    with torch.inference_mode():
                        for m in blocks:
                            m(xi if m.in_features == INTERMEDIATE else x)
                        vocab(x)

                ms = _median_ms(step, args.repeats, evict)
                print(json.dumps({"threads": threads, "rows": rows, "weights": name, "cold": args.cold,
                                  "ms_per_step": round(ms, 2), "weight_mb": round(weight_bytes[name] / 1e6, 1),
                                  "gb_s": round(weight_bytes[name] / 1e9 / (ms / 1e3), 1),
                                  "tokens_per_s_if_nothing_else": round(rows / (ms / 1e3), 1)}))


if __name__ == "__main__":
    main()
