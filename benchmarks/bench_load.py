"""Peak memory and time of `mmlm.load(dtype=...)` on a big random Llama, written without ever holding it in memory.

    python benchmarks/bench_load.py --dir /tmp/llama-3b [--dtype bf16] [--keep]

The model has Llama 3.2 3B's shapes (3.21 B parameters, tied embeddings) unless --layers / --width / ... say
otherwise. Its config.json is transformers' LlamaConfig; its weights are random bfloat16 tensors written as
sharded safetensors (model.safetensors.index.json) one tensor at a time: the header of each shard is written from
the shapes of a model built on the meta device, then each tensor's bytes are drawn and appended, so writing needs
a few hundred MB whatever the model's size. The load then runs in a fresh subprocess (`bench_common.load_peak`:
the kernel's VmHWM after the load minus VmRSS just before it) and prints one JSON line. The files are deleted
afterwards unless --keep. Needs ~2 bytes per parameter of disk (6.4 GB for 3B): check `df -h` first.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import struct
import time
from pathlib import Path

import torch

from mmlm.bench_common import load_peak

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def llama_config(args: argparse.Namespace):
    import transformers

    return transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.mlp,
                                    num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                    num_key_value_heads=args.kv_heads, max_position_embeddings=8192,
                                    rope_theta=500000.0, tie_word_embeddings=args.tied, dtype="bfloat16")


def write_random_checkpoint(directory: Path, cfg, shard_bytes: int = 2 * 10**9, seed: int = 0) -> int:
    """A transformers-layout directory of random bf16 shards for `cfg`, written tensor by tensor; returns bytes."""
    import transformers

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        if size + n > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    directory.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(directory)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            n = 2 * torch.Size(shapes[name]).numel()
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
        with open(directory / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                numel = torch.Size(shapes[name]).numel()
                for start in range(0, numel, 1 << 24):  # 16 M values (32 MB) at a time
                    count = min(1 << 24, numel - start)
                    std = 1.0 if "norm" in name else 0.02
                    f.write((torch.randn(count, generator=g) * std).to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
        total += 8 + len(raw) + offset
    index = {"metadata": {"total_size": sum(2 * torch.Size(s).numel() for s in shapes.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="where to write the random checkpoint (deleted after)")
    p.add_argument("--dtype", default="bf16", help="the dtype to load into (bf16, fp16, fp32)")
    p.add_argument("--keep", action="store_true", help="keep the files (a second run then skips writing them)")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--mlp", type=int, default=8192)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    write_s = 0.0
    if not (args.dir / "model.safetensors.index.json").is_file():
        t = time.perf_counter()
        write_random_checkpoint(args.dir, llama_config(args))
        write_s = time.perf_counter() - t
    files = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    try:
        (r,) = load_peak((args.dir, args.dtype))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    print(json.dumps({"bench": "load", **r, "files": files, "peak_over_files": round(r["peak"] / files, 3),
                      "peak_over_weights": round(r["peak"] / r["weights"], 3), "write_s": round(write_s, 1),
                      "cpu": cpu, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
