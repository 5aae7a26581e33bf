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

def time_ab(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each run, alternating the order every repeat (A B, B A, ...) after one warm-up each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def rates(items: int, seconds: list[float], unit: str = "per_s") -> dict[str, float]:
    """items/s: median, spread (max - min) / median, min, max (keys `{unit}_median`, ...)."""
    r = sorted(items / s for s in seconds)
    med = r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) / 2
    return {f"{unit}_median": round(med, 1), "spread": round((r[-1] - r[0]) / med, 3),
            f"{unit}_min": round(r[0], 1), f"{unit}_max": round(r[-1], 1)}


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
