"""mmlm vs llama.cpp on the same GGUF, on the CPU: decode tokens/s at batch 1 (and mmlm's batch 8, the server's
case), time to first token at several prompt lengths, peak memory, and the greedy tokens side by side.

    bash scripts/make_llamacpp_venv.sh                      # the peer's own venv, once (a few minutes)
    .venv/bin/python benchmarks/bench_llamacpp.py [--gguf smollm2] [--peer .venv-llamacpp/bin/python]
        [--threads 1 2] [--rounds 3] [--new-tokens 128] [--lengths 21 128 512] [--engines mmlm mmlm-int4 ...]

Each engine runs in its own process (llama-cpp-python cannot share mmlm's venv), one process per engine per
round, the engines' order alternated every round; a process loads the model, warms up on every prompt (any
compilation happens there and is reported as `warmup_s`), then measures each prompt once. Figures are medians
over the rounds with their spread. The prompts are token ids (the model's chat template around a user message,
and filler text cut to each length), so both engines read exactly the same tokens; llama.cpp's cache is reset before each run.

Decode tokens/s = (new_tokens - 1) / (time of the last token - time of the first): the prompt is not in it.
Time to first token = prefill + choosing one token, for prompts of each length (a filler text's first n tokens). Engines: "mmlm" (what `mmlm chat` and `mmlm serve` run by
default: `--weights auto`, a Q4 GGUF at 4 bits), "mmlm-fp32" (`--weights none`: widened to float32),
"mmlm-compile" (the default and the decode step torch.compile'd), "llamacpp".
Prints JSON lines: one per engine and setting, then ratios against llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MMLM_ENGINES = ("mmlm", "mmlm-fp32", "mmlm-compile")
CHAT = "Tell me a short story about a robot who learns to paint."  # the decode prompt's user message
FILLER = ("The history of computing is a story of people who wanted machines to do arithmetic for them, and then "
          "found that arithmetic could describe almost anything: weather, music, language and pictures. ")


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- prompts (built by the parent)

def build_prompts(gguf: str, lengths: list[int]) -> dict:
    """{"chat": ids of the chat prompt (the model's chat template around CHAT), "lengths": {n: the first n ids of
    a long filler text}} (prefill speed depends on the count of tokens, not on what they say)."""
    import mmlm

    tok = mmlm.load_tokenizer(gguf)
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT}]))
    body = tok.encode(FILLER * 40)
    if max(lengths) > len(body) or min(lengths) < 1:
        raise ValueError(f"--lengths must be in 1..{len(body)}, got {lengths}")
    return {"chat": chat, "lengths": {str(n): body[:n] for n in lengths}}


# ----------------------------------------------------------------------------- the engines (one per process)

def run_mmlm(spec: dict) -> dict:
    import torch

    from mmlm.generation import generate

    torch.set_num_threads(spec["threads"])
    engine, n_new = spec["engine"], spec["new_tokens"]
    t0 = time.perf_counter()
    from mmlm.formats import load_for_generation

    # as `mmlm chat` / `mmlm serve` load it: a Q4 file read straight into int4 ("auto"), or widened to float32
    model = load_for_generation(spec["gguf"], "none" if engine == "mmlm-fp32" else "auto")
    weights = getattr(model, "quantized", None)
    load_s = time.perf_counter() - t0
    compile = engine.endswith("compile")

    def decode(ids: list[int], batch: int = 1) -> tuple[list[int], float, float]:
        x = torch.tensor([ids] * batch)
        stamps: list[float] = []
        start = time.perf_counter()
        out = generate(model, x, max_new_tokens=n_new, eos_token_id=[], compile=compile,
                       stream=lambda row, token: stamps.append(time.perf_counter()) if row == 0 else None)
        return out[0].tolist(), stamps[0] - start, batch * (n_new - 1) / (stamps[-1] - stamps[0])

    def first_token(ids: list[int]) -> float:
        start = time.perf_counter()
        generate(model, torch.tensor([ids]), max_new_tokens=1, eos_token_id=[])
        return time.perf_counter() - start

    t0 = time.perf_counter()
    decode(spec["chat"])
    for ids in spec["lengths"].values():
        first_token(ids)
    if spec["batch"] > 1:
        decode(spec["chat"], spec["batch"])
    warmup_s = time.perf_counter() - t0
    tokens, _, rate = decode(spec["chat"])
    row = {"weights": weights or "float32", "load_s": load_s, "warmup_s": warmup_s, "decode_tok_s": rate, "tokens": tokens[:32],
           "ttft_s": {n: first_token(ids) for n, ids in spec["lengths"].items()}}
    if spec["batch"] > 1:
        row[f"decode_batch{spec['batch']}_tok_s"] = decode(spec["chat"], spec["batch"])[2]
    row["peak_mb"] = _peak_mb()
    return row


def run_llamacpp(spec: dict) -> dict:
    from llama_cpp import Llama

    n_new, t = spec["new_tokens"], spec["threads"]
    t0 = time.perf_counter()
    longest = max(len(ids) for ids in [spec["chat"], *spec["lengths"].values()])
    llm = Llama(model_path=spec["gguf"], n_ctx=longest + n_new + 8, n_batch=512, n_threads=t, n_threads_batch=t,
                verbose=False)
    load_s = time.perf_counter() - t0

    def run(ids: list[int], n: int) -> tuple[list[int], list[float], float]:
        llm.reset()  # no prompt cache: every run prefills its whole prompt
        out, stamps = [], []
        start = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            out.append(token)
            if len(out) == n:
                break
        return out, stamps, start

    t0 = time.perf_counter()
    run(spec["chat"], n_new)
    for ids in spec["lengths"].values():
        run(ids, 1)
    warmup_s = time.perf_counter() - t0
    tokens, stamps, _ = run(spec["chat"], n_new)
    ttft = {}
    for n, ids in spec["lengths"].items():
        _, s, start = run(ids, 1)
        ttft[n] = s[0] - start
    return {"load_s": load_s, "warmup_s": warmup_s, "decode_tok_s": (n_new - 1) / (stamps[-1] - stamps[0]),
            "tokens": tokens[:32], "ttft_s": ttft, "peak_mb": _peak_mb()}


# ----------------------------------------------------------------------------- the parent

def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _summary(values: list[float]) -> dict:
    med = _median(values)
    return {"median": round(med, 4), "spread": round((max(values) - min(values)) / med, 3) if med else 0.0}


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default="smollm2", help="a .gguf file or an asset name (default smollm2)")
    p.add_argument("--peer", default=str(ROOT / ".venv-llamacpp" / "bin" / "python"),
                   help="the python of the venv holding llama-cpp-python (scripts/make_llamacpp_venv.sh)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--lengths", type=int, nargs="+", default=[21, 128, 512], help="prompt lengths for time to first token")
    p.add_argument("--batch", type=int, default=8, help="mmlm's batched decode (the server's case); 1 = off")
    p.add_argument("--engines", nargs="+", default=["llamacpp", *MMLM_ENGINES],
                   choices=["llamacpp", *MMLM_ENGINES])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # a child: run one engine on the spec file, print one JSON line
        spec = json.loads(Path(args.worker).read_text())
        row = run_llamacpp(spec) if spec["engine"] == "llamacpp" else run_mmlm(spec)
        print("RESULT " + json.dumps(row))
        return 0

    from mmlm.assets import resolve
    from mmlm.bench_common import print_row

    gguf = str(resolve(args.gguf))
    if "llamacpp" in args.engines and not Path(args.peer).is_file():
        raise SystemExit(f"--peer {args.peer} does not exist: run `bash scripts/make_llamacpp_venv.sh` first")
    prompts = build_prompts(gguf, args.lengths)
    print_row({"bench": "llamacpp_setup", "gguf": Path(gguf).name, "chat_prompt_tokens": len(prompts["chat"]),
               "lengths": args.lengths, "new_tokens": args.new_tokens, "rounds": args.rounds, "cpu": _cpu_name(), "mmlm_loops": _loops()})
    engines = list(args.engines)
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            results: dict[str, list[dict]] = {e: [] for e in engines}
            for r in range(args.rounds):
                for engine in engines if r % 2 == 0 else reversed(engines):
                    spec = {**prompts, "engine": engine, "gguf": gguf, "threads": threads,
                            "new_tokens": args.new_tokens, "batch": args.batch}
                    path = Path(tmp) / f"{engine}.json"
                    path.write_text(json.dumps(spec))
                    python = args.peer if engine == "llamacpp" else sys.executable
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                    proc = subprocess.run([python, __file__, "--worker", str(path)], capture_output=True, text=True,
                                          env=env, timeout=1800)
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if proc.returncode or line is None:
                        raise SystemExit(f"{engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                    results[engine].append(json.loads(line[len("RESULT "):]))
            _report(results, threads, args, print_row)
    return 0


def _report(results: dict[str, list[dict]], threads: int, args, emit) -> None:
    med: dict[str, dict] = {}
    for engine, rows in results.items():
        row = {"bench": "llamacpp", "engine": engine, "threads": threads,
               "decode_tok_s": _summary([r["decode_tok_s"] for r in rows]),
               "ttft_s": {n: _summary([r["ttft_s"][n] for r in rows]) for n in rows[0]["ttft_s"]},
               "peak_mb": round(max(r["peak_mb"] for r in rows)), "load_s": round(_median([r["load_s"] for r in rows]), 2),
               "warmup_s": round(_median([r["warmup_s"] for r in rows]), 2)}
        key = f"decode_batch{args.batch}_tok_s"
        if key in rows[0]:
            row[key] = _summary([r[key] for r in rows])
        med[engine] = row
        emit(row)
    if "llamacpp" not in med:
        return
    peer = med["llamacpp"]
    peer_tokens = results["llamacpp"][0]["tokens"]
    for engine in [e for e in med if e != "llamacpp"]:
        row = med[engine]
        out = {"bench": "llamacpp", "engine": f"{engine}/llamacpp", "threads": threads,
               "decode_ratio": round(row["decode_tok_s"]["median"] / peer["decode_tok_s"]["median"], 2),
               "ttft_ratio": {n: round(peer["ttft_s"][n]["median"] / row["ttft_s"][n]["median"], 2)
                              for n in row["ttft_s"]},  # > 1: mmlm's first token comes sooner
               "first_differing_token": _first_difference(results[engine][0]["tokens"], peer_tokens),
               "peak_mb_ratio": round(row["peak_mb"] / peer["peak_mb"], 2)}
        key = f"decode_batch{args.batch}_tok_s"
        if key in row:
            out[f"batch{args.batch}_total_vs_peer_batch1"] = round(row[key]["median"] / peer["decode_tok_s"]["median"], 2)
        emit(out)


def _loops() -> str:
    """Which of mmlm's compiled loops this machine runs (csrc/weight_only.c's `mmlm_simd`)."""
    from mmlm import native
    lib = native.kernels()
    return f"none ({native.error()})" if lib is None else ("plain C", "AVX2", "AVX-512 VNNI")[lib.mmlm_simd()]


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
