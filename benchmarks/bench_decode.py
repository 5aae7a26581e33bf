"""Greedy decode speed of mmlm vs transformers' generate(): the same as `mmlm bench decode [--quick]`.

    python benchmarks/bench_decode.py [--quick] [--model tiny] [--threads N] [--no-memory] [--compile]

Prints JSON lines (one per measurement, then mmlm/transformers ratios); the logic lives in mmlm.bench.
"""

import sys

from mmlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
