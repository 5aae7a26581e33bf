"""What every `mmlm bench` shares: transformers as the reference, A/B timing, rates, the quantized and compiled
contenders, and this process's memory."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch

Emit = Callable[[dict], None]


def print_row(row: dict) -> None:
    """The default `emit`: one JSON line, flushed at once."""
    print(json.dumps(row), flush=True)


def require_transformers():
    """The transformers module (quiet), or a clear error when it is not installed."""
    try:
        import transformers
    except ImportError:
        raise NotImplementedError("`mmlm bench` compares against transformers, which is not installed: "
                                  "pip install 'mmlm[interop]' (or pip install transformers)") from None
    transformers.logging.set_verbosity_error()
    return transformers


@torch.inference_mode()
def quant_accuracy(ref, quant, ids: torch.Tensor, mask: torch.Tensor, **inputs) -> dict:
    """What weight quantization changes, teacher-forced on the same tokens: the share of positions whose argmax
    (the greedy choice) is unchanged, and the largest logit change relative to the largest float32 logit."""
    a = ref(ids, attention_mask=mask, **inputs).logits[mask.bool()]
    b = quant(ids, attention_mask=mask, **inputs).logits[mask.bool()]
    return {"top1_agree": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
            "max_logit_err_rel": round(float((a - b).abs().max() / a.abs().max()), 4), "positions": len(a)}


def add_contenders(runs: dict[str, Callable[[], Any]], ours, quantized: dict[str, Any],
                   gen: Callable[[Any, bool], torch.Tensor], ref: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   compile: bool, out: Callable[[dict], None], **inputs) -> None:
    """Add to `runs` mmlm with each quantized model ("mmlm-int4", ...) and, with `compile`, every mmlm model through
    torch.compile ("...-compiled"); report each quantized model's accuracy (on the prompt + the fp32 continuation
    `ref`) and each compile's first call. `gen(model, compile)` generates the benchmark's tokens."""
    for mode, qmodel in quantized.items():
        out({"bench": "quant_accuracy", "library": f"mmlm-{mode}",
             **quant_accuracy(ours, qmodel, torch.cat([ids, ref], 1), torch.cat([mask, torch.ones_like(ref)], 1),
                              **inputs)})
        runs[f"mmlm-{mode}"] = lambda m=qmodel: gen(m, False)
    if compile:  # compiles once per model and batch size
        for lib, m in [("mmlm", ours)] + [(f"mmlm-{k}", v) for k, v in quantized.items()]:
            t0 = time.perf_counter()
            c = gen(m, True)
            out({"bench": "compile", "library": f"{lib}-compiled", "first_call_s": round(time.perf_counter() - t0, 1),
                 "same_tokens": torch.equal(c, ref)})
            runs[f"{lib}-compiled"] = lambda m=m: gen(m, True)


# ----------------------------------------------------------------------------- timing

def synchronize() -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously: a timer must not stop before the kernels do)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_ab(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each run, alternating the order every repeat (A B, B A, ...) after one warm-up each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            synchronize()
            t0 = time.perf_counter()
            runs[name]()
            synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def rates(items: int, seconds: list[float], unit: str = "per_s") -> dict[str, float]:
    """items/s: median, spread (max - min) / median, min, max (keys `{unit}_median`, ...)."""
    r = sorted(items / s for s in seconds)
    med = r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) / 2
    digits = 1 if r[0] >= 10 else 3  # slow rates (a sampling run's images/s) keep three decimals
    return {f"{unit}_median": round(med, digits), "spread": round((r[-1] - r[0]) / med, 3),
            f"{unit}_min": round(r[0], digits), f"{unit}_max": round(r[-1], digits)}


# ----------------------------------------------------------------------------- memory

def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size (MB), from /proc (0 where there is none)."""
    return _status_mb("VmRSS") or 0.0


def peak_mb() -> float:
    """Highest resident set size of this process so far (MB). Linux's VmHWM, not ru_maxrss: ru_maxrss survives
    exec, so a subprocess would report its parent's peak."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes
    return peak / (1024 * 1024)


# `load_peak`'s subprocess: argv = [path, dtype, path, dtype, ...]; one JSON line per load.
_LOAD_PEAK = r"""
import gc, json, sys, time
import torch, mmlm, mmlm.formats

def status():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}

args = sys.argv[1:]
for path, dtype in zip(args[::2], args[1::2]):
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        reset = True
    except OSError:  # the figure is then an upper bound: VmHWM also holds the imports' peak
        reset = False
    before = status()
    t = time.perf_counter()
    model = mmlm.load(path, dtype=dtype)
    seconds = time.perf_counter() - t
    after = status()
    params = list({id(p): p for p in model.parameters()}.values())
    print(json.dumps({"path": path, "dtype": dtype, "reset": reset, "seconds": round(seconds, 3),
                      "rss_before": before["VmRSS"], "peak": after["VmHWM"] - before["VmRSS"],
                      "params": sum(p.numel() for p in params),
                      "weights": sum(p.numel() * p.element_size() for p in params),
                      "dtypes": sorted({str(p.dtype) for p in params})}), flush=True)
    del model, params
"""


def load_peak(*loads: tuple[Any, str], timeout: float = 1800) -> list[dict]:
    """Peak memory of `mmlm.load(path, dtype=dtype)` for each (path, dtype), in turn in one fresh subprocess (Linux).

    `peak` (bytes) is the highest resident set size during the load minus the resident set size just before it:
    the kernel's high-water mark VmHWM is reset (5 written to /proc/self/clear_refs) after torch and mmlm are
    imported, and read after the load. Resident memory counts the model's tensors, every temporary and every page
    of the memory-mapped files the process holds, so `peak` is what a machine needs free for the load, beyond the
    fixed cost of the imports (`rss_before`). `reset` False (clear_refs not writable): `peak` is an upper bound.
    Also: `seconds`, `params`, `weights` (bytes of the loaded parameters) and their `dtypes`."""
    import subprocess
    import sys

    argv = [str(x) for load in loads for x in load]
    out = subprocess.run([sys.executable, "-c", _LOAD_PEAK, *argv], check=True, capture_output=True, text=True,
                         timeout=timeout)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
