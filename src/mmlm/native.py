"""mmlm's one compiled piece: the weight-only matmuls of `csrc/weight_only.c` (and its loops for sampling a UNet),
built on first use.

Decoding reads every weight once per token, so it runs at the speed the weights stream in; PyTorch's CPU int4
kernel reads them at a fifth of the machine's bandwidth (benchmarks/bench_int4_linears.py). The C file's loops
read llama.cpp's Q4_1 blocks and int8 rows at memory speed. It is compiled with the machine's C compiler
(`cc -O3 -march=native -fopenmp`, 1.6 s on a 2-core Xeon) into a cache folder keyed by the source, the flags, the
compiler and the CPU's features, so a process loads it in milliseconds after the first build. The build takes
AVX-512 VNNI loops, AVX2 ones or plain C, whichever the CPU has (`kernels().mmlm_simd()`: 2, 1, 0). `kernels()`
returns None when no compiler is found, the build fails or MMLM_NATIVE=0, and mmlm then uses PyTorch's own
kernels (`quant.py`).

OpenMP: the library is linked against libgomp by soname, so in a process that imported torch it shares PyTorch's
already-loaded runtime and threads rather than starting its own.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "weight_only.c"
# tried in order; the first that builds is kept (a compiler without OpenMP or -march=native still builds)
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])



class Linear(ctypes.Structure):
    """A QuantLinear as `csrc/weight_only.c` reads it (its `Linear`)."""
    _fields_ = [("bits", ctypes.c_int64), ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64),
                ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None
_simd: int | None = None


def cache_dir() -> Path:
    """Where built libraries are kept: $MMLM_CACHE, else $XDG_CACHE_HOME/mmlm, else ~/.cache/mmlm."""
    if os.environ.get("MMLM_CACHE"):
        return Path(os.environ["MMLM_CACHE"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmlm" / "native"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu() -> str:
    """What -march=native compiles for: the CPU's feature flags (Linux), else the platform's names for it. Part of
    the cache key, so a cache folder shared between machines (a home directory) never hands one CPU's build to
    another that lacks its instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def build(cc: str, flag_sets=FLAG_SETS) -> Path:
    """The library's path, building it if the cache lacks it, with the first of `flag_sets` that compiles;
    RuntimeError with each compiler's complaint when none does."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    source = SOURCE.read_bytes()
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), cc.encode(),
                                         sys.platform.encode(), _cpu().encode()])).hexdigest()[:16]
        target = cache_dir() / f"weight_only-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: concurrent
            out = Path(tmp) / target.name                             # processes never load half a file
            done = subprocess.run([cc, *flags, "-shared", "-fPIC", "-std=c11", str(SOURCE), "-o", str(out), "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(out, target)
                return target
            errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-400:]}")
    raise RuntimeError("; ".join(errors))


def load(path: Path) -> ctypes.CDLL:
    """A built library with its functions' argument types declared."""
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mmlm_q4_1_matmul.argtypes = [p, i64, i64, p, i64, p, i32]
    lib.mmlm_q4_1_matmul.restype = ctypes.c_int
    lib.mmlm_q4_1_dequantize.argtypes = [p, i64, i64, p, i32, i32]
    lib.mmlm_int8_matmul.argtypes = [p, i64, i64, p, p, i64, p, i32]
    lib.mmlm_int8_matmul.restype = ctypes.c_int
    lib.mmlm_rms_norm.argtypes = [p, i64, i64, p, ctypes.c_float, p]
    lib.mmlm_decode_attention.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, p, i64, i64, i64, i64, i64, i64, p,
                                          p, i32]
    lp = ctypes.POINTER(Linear)
    lib.mmlm_decoder_layer.argtypes = [p, i64, i64, p, p, ctypes.c_float, lp, lp, lp, lp, p, p, p, p, i64, i64, i64,
                                       p, i64, i64, i64, i64, i64, i32]
    lib.mmlm_decoder_layer.restype = ctypes.c_int
    for fn in (lib.mmlm_q4_1_dequantize, lib.mmlm_rms_norm, lib.mmlm_decode_attention):
        fn.restype = None
    lib.mmlm_attention.argtypes = [p, i64, i64, i64, p, i64, i64, i64, p, i64, i64, i64, i64, i64, i64, i64, i64, p,
                                   i32]
    lib.mmlm_attention.restype = ctypes.c_int
    lib.mmlm_attention_tiled.argtypes = [p, i64, i64, i64, p, i64, i64, i64, p, i64, i64, i64, i64, i64, i64, i64,
                                         i64, i32, p, i32]
    lib.mmlm_attention_tiled.restype = ctypes.c_int
    lib.mmlm_winograd_input.argtypes = [p, i64, i64, i64, i64, p, i32]
    lib.mmlm_winograd_output.argtypes = [p, i64, i64, i64, i64, p, p, p, p, i32]
    lib.mmlm_winograd_input.restype = ctypes.c_int
    lib.mmlm_winograd_output.restype = None
    lib.mmlm_winograd_conv.argtypes = [p, i64, i64, i64, i64, p, i64, i64, i64, p, p, p, p, i32]
    lib.mmlm_winograd_conv.restype = ctypes.c_int
    lib.mmlm_linear.argtypes = [p, i64, i64, p, i64, p, p, p, i32, i32]
    lib.mmlm_linear.restype = None
    lib.mmlm_geglu.argtypes = [p, i64, i64, p, i32]
    lib.mmlm_geglu.restype = None
    lib.mmlm_group_norm_silu.argtypes = [p, i64, i64, i64, i64, p, p, ctypes.c_float, i32, p, i32]
    lib.mmlm_group_norm_silu.restype = None
    lib.mmlm_simd.restype = ctypes.c_int
    return lib


def kernels() -> ctypes.CDLL | None:
    """The compiled library (built and loaded once per process), or None where it cannot be had (`error()`)."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("MMLM_NATIVE", "").strip().lower() in ("0", "false", "no", "off"):
                raise RuntimeError("turned off by MMLM_NATIVE")
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (cc, gcc, clang or $CC)")
            lib = load(build(cc))
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _error = str(e)
        _tried = True
        return _lib


def simd() -> int:
    """Which loops the loaded build has (`mmlm_simd`: 2 AVX-512 VNNI, 1 AVX2, 0 plain C), -1 without a build;
    asked once per process."""
    global _simd
    if _simd is None:
        lib = kernels()
        _simd = -1 if lib is None else lib.mmlm_simd()
    return _simd


def _ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's address for an optional pointer argument (NULL for None)."""
    return None if t is None else t.data_ptr()


def error() -> str | None:
    """Why `kernels()` is None (None when it is not, or was not asked yet)."""
    return _error


def q4_1_matmul(x: torch.Tensor, blocks: torch.Tensor, out_features: int, lib: ctypes.CDLL | None = None
                ) -> torch.Tensor:
    """x (M, K) float32 contiguous, blocks (N, K / 32 * 20) uint8, Q4_1 in groups of four -> (M, N) float32."""
    y = torch.empty(x.shape[0], out_features)
    if not (lib or _lib).mmlm_q4_1_matmul(x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(), out_features,
                                 y.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"no memory to round a ({x.shape[0]}, {x.shape[1]}) input to int8")
    return y


def q4_1_dequantize(blocks: torch.Tensor, out_features: int, in_features: int,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The (N, K) matrix the blocks store, in bfloat16 or float32."""
    w = torch.empty(out_features, in_features, dtype=dtype)
    _lib.mmlm_q4_1_dequantize(blocks.data_ptr(), out_features, in_features, w.data_ptr(),
                              int(dtype == torch.bfloat16), torch.get_num_threads())
    return w


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, lib: ctypes.CDLL | None = None
                ) -> torch.Tensor:
    """x (M, K) float32 contiguous, weight (N, K) int8, scales (N,) bfloat16 -> (M, N) float32; x read as two int8
    digits per block of 32 where K % 32 == 0 (`quant.round_to_int8_blocks`)."""
    y = torch.empty(x.shape[0], weight.shape[0])
    (lib or _lib).mmlm_int8_matmul(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), scales.data_ptr(),
                          weight.shape[0], y.data_ptr(), torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """weight x / sqrt(mean(x^2) + eps) over the last dim; x float32 contiguous, weight (n,) float32 contiguous."""
    y = torch.empty_like(x)
    n = x.shape[-1]
    (lib or _lib).mmlm_rms_norm(x.data_ptr(), x.numel() // n, n, weight.data_ptr(), eps, y.data_ptr())
    return y


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for one query per row and head: q (B, H, 1, d), k, v (B, Hkv, S, d) float32
    with unit stride along d (k, v contiguous along S too), mask None or (B or 1, S) bool. -> (B, H, 1, d)."""
    B, H, _, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty(B, 1, H, d)  # (B, H, d) memory: the caller's transpose + reshape to (B, 1, H d) is a view
    scores = torch.empty(B * H * S)
    mp, mb = (0, 0) if mask is None else (mask.data_ptr(), mask.stride(0) if mask.shape[0] > 1 else 0)
    (lib or _lib).mmlm_decode_attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                               v.data_ptr(), v.stride(0), v.stride(1), mp, mb, B, H, Hkv, S, d, out.data_ptr(),
                               scores.data_ptr(), torch.get_num_threads())
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, no mask: q (B, H, T, d), k, v (B, H, S, d) float32 with unit stride along d
    -> (B, H, T, d), d <= 64 (`mmlm_attention`: many queries, a small head dim), stored (B, T, H, d) so that
    the caller's transpose back to (B, T, H d) is a view."""
    B, H, T, d = q.shape
    S = k.shape[2]
    if d > 64:
        raise ValueError(f"head dim {d}: the many-query attention loop takes at most 64")
    out = torch.empty(B, T, H, d)
    if not (lib or _lib).mmlm_attention(q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3], v.data_ptr(),
                                        *v.stride()[:3], B, H, T, S, d, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"no memory to transpose {S} keys of {d} dims for attention")
    return out.transpose(1, 2)


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, no mask or causal (the T queries the last T of the S positions): q (B, H, T, d),
    k, v (B, H, S, d) float32 with unit stride along d -> (B, H, T, d) (`mmlm_attention_tiled`: small matmuls per
    head, blocks of 48 queries and 256 keys), stored (B, T, H, d) so that the caller's transpose back to (B, T, H d)
    is a view."""
    B, H, T, d = q.shape
    S = k.shape[2]
    if causal and T > S:
        raise ValueError(f"{T} queries, {S} keys: causal tiled attention takes no more queries than keys")
    out = torch.empty(B, T, H, d)
    if not (lib or _lib).mmlm_attention_tiled(q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3],
                                              v.data_ptr(), *v.stride()[:3], B, H, T, S, d, int(causal),
                                              out.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"no memory for the scores of {S} keys of {d} dims")
    return out.transpose(1, 2)


def geglu(z: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """h GELU(g) for z = [h, g] (..., 2 n) float32 contiguous -> (..., n)."""
    n = z.shape[-1] // 2
    out = torch.empty(*z.shape[:-1], n)
    (lib or _lib).mmlm_geglu(z.data_ptr(), z.numel() // (2 * n), n, out.data_ptr(), torch.get_num_threads())
    return out


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool = True, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """silu(GroupNorm(x)) (or the norm alone): x (N, C, H, W) float32 stored channels-last, groups <= 256 dividing
    C, weight / bias (C,) float32 contiguous or None -> (N, C, H, W), channels-last."""
    N, C, H, W = x.shape
    y = torch.empty(N, H, W, C)
    (lib or _lib).mmlm_group_norm_silu(x.data_ptr(), N, H * W, C, groups, _ptr(weight), _ptr(bias), eps, int(silu),
                                       y.data_ptr(), torch.get_num_threads())
    return y.permute(0, 3, 1, 2)


def winograd_input(x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (N, H, W, C) float32 contiguous, H and W multiples of 4 -> (36, P, C): Winograd F(4x4, 3x3)'s B^T d B of
    every 4x4 tile's 6x6 patch (zero padding 1), P = N H W / 16 tiles."""
    N, H, W, C = x.shape
    v = torch.empty(36, N * H * W // 16, C)
    if not (lib or _lib).mmlm_winograd_input(x.data_ptr(), N, H, W, C, v.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"no memory for a row of {C} zeros (Winograd's padding)")
    return v


def winograd_output(m: torch.Tensor, shape: tuple[int, int, int], bias: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                    lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """m (36, P, O) float32 contiguous, shape (N, H, W) -> (N, H, W, O): A^T m A per tile, + bias (O,) + shift
    (N, O) + residual (N, H, W, O), all float32 contiguous where given."""
    N, H, W = shape
    O = m.shape[2]
    y = torch.empty(N, H, W, O)
    (lib or _lib).mmlm_winograd_output(m.data_ptr(), N, H, W, O, _ptr(bias), _ptr(shift), _ptr(residual), y.data_ptr(),
                                       torch.get_num_threads())
    return y


def winograd_conv(x: torch.Tensor, u: torch.Tensor, out_channels: int, tiles: int, bias: torch.Tensor | None = None,
                  shift: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                  lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (N, H, W, C) float32 contiguous, H and W multiples of 4, u (36, C, Op) G g G^T with Op = out_channels
    rounded up to 16 (zero columns past them) -> (N, H, W, out_channels): the 3x3 convolution (zero padding 1) in one
    pass, `tiles` (a multiple of 6) 4x4 tiles at a time, + bias (O,) + shift (N, O) + residual (N, H, W, O)."""
    N, H, W, C = x.shape
    y = torch.empty(N, H, W, out_channels)
    if not (lib or _lib).mmlm_winograd_conv(x.data_ptr(), N, H, W, C, u.data_ptr(), out_channels, u.shape[2], tiles,
                                            _ptr(bias), _ptr(shift), _ptr(residual), y.data_ptr(),
                                            torch.get_num_threads()):
        raise MemoryError(f"no memory for Winograd's scratch ({tiles} tiles of {C} channels)")
    return y


ACTIVATIONS = {None: 0, "geglu": 1, "gelu": 2, "quick_gelu": 3}  # csrc/weight_only.c's ACT_*


def linear(x: torch.Tensor, w: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, act: str | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) float32 contiguous, w (P, K, 16) and bias (16 P,) a linear layer packed as `kernels.mlp.packed_linear`
    packs it -> (M, out_features): act(x w^T + bias) + residual (M, out_features; float32 contiguous where given),
    act None, "gelu" (erf's) or "quick_gelu"; with "geglu" h GELU(gate) of x w^T + bias = [h, gate] (no residual)."""
    M, K = x.shape
    y = torch.empty(M, out_features)
    (lib or _lib).mmlm_linear(x.data_ptr(), M, K, w.data_ptr(), out_features, _ptr(bias), _ptr(residual),
                              y.data_ptr(), ACTIVATIONS[act], torch.get_num_threads())
    return y


def linear_struct(layer) -> Linear:
    """A native QuantLinear's buffers as a `Linear` (pointers: valid while the layer's buffers live)."""
    w = layer.blocks if layer.bits == 4 else layer.qweight
    return Linear(layer.bits, layer.out_features, layer.in_features, w.data_ptr(),
                  layer.scales.data_ptr() if layer.bits == 8 else None,
                  _ptr(layer.bias))


def decoder_layer(x: torch.Tensor, norm1: torch.Tensor, norm2: torch.Tensor, eps: float, linears, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, mask: torch.Tensor,
                  heads: int, hidden: int) -> None:
    """One decoding step of a Llama block, x (B, C) float32 updated in place (`mmlm_decoder_layer`): linears the
    (qkv, proj, fc1, fc2) `Linear`s, cos/sin (B, d), the layer's cache (B, Hkv, S, d) with unit strides along its
    last two dims (k and v at the same strides: a window of the pool is fine), mask (B, >= slot + 1) uint8 with
    unit stride along the keys."""
    B, C = x.shape
    kv_heads, d = k_cache.shape[1], k_cache.shape[3]
    if not _lib.mmlm_decoder_layer(x.data_ptr(), B, C, norm1.data_ptr(), norm2.data_ptr(), eps, *linears,
                                   cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                   k_cache.stride(0), k_cache.stride(1), slot, mask.data_ptr(), mask.stride(0), heads,
                                   kv_heads, d, hidden, torch.get_num_threads()):
        raise MemoryError("no memory for a decoding step's intermediates")
