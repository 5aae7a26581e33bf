"""Every speed measurement against transformers, as `mmlm bench all`: LM decode/prefill/memory, CLIP train step
and embeddings, LLaVA decode/prefill, data pipeline (JSON lines; the logic lives in mmlm.bench, mmlm.bench_models).

    python benchmarks/bench_all.py [--quick] [--threads 1] [--compile]

open_clip is compared by benchmarks/bench_openclip.py from its own venv; scale curves by benchmarks/scale_curves.py.
"""

import sys

from mmlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "all", *sys.argv[1:]]))
