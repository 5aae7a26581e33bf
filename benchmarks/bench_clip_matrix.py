"""CLIP speed across the settings users run: mmlm vs transformers (its SDPA and its eager attention), one process.

    python benchmarks/bench_clip_matrix.py                      # every axis, bf16 only where the CPU has it
    python benchmarks/bench_clip_matrix.py --quick --threads 1 --acts gelu --what train

bench-vit (`mmlm bench clip`'s model: ViT width 256, 4 layers, 64 px; text width 256, 4 layers, context 32;
batch 64), random weights shared by both libraries, across activation (quick_gelu / gelu) x captions (ragged /
filling the context) x threads x precision (fp32 / bf16 autocast) x optimizer (fused / foreach AdamW, train step
only). Each cell times mmlm, transformers with `attn_implementation="sdpa"` and with `"eager"`, alternated, and
judges mmlm against the faster of the two. bf16 is left out on a CPU without bfloat16 instructions (there both
libraries' matmuls run emulated, ~100x slower than fp32): `--precisions bf16` forces it.

Prints one JSON line per cell (`bench_models.bench_clip_matrix`), then a markdown table: the ratios, the FLOPs an
item costs each library (torch's FlopCounterMode on one call) and the share of this machine's fp32 / bf16
1024^3 matmul rate (at the cell's threads) each reaches on its own FLOPs (MFU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmlm.bench_models import MATRIX_AXES, bench_clip_matrix  # noqa: E402
from mmlm.devices import fast_bf16  # noqa: E402


def table(rows: list[dict]) -> str:
    """One line per cell: the settings, each library's rate, mmlm over the faster transformers setting."""
    head = ("| what | act | captions | threads | precision | optimizer | mmlm /s | sdpa /s | eager /s | ratio (vs) | "
            "MFLOP an item: mmlm / peer | MFU: mmlm / peer |")
    lines = [head, "|" + "---|" * 12]
    rows = [r for r in rows if r["bench"] == "clip_matrix"]
    for r in rows:
        p = r["peer"]
        lines.append(f"| {r['what']} | {r['act']} | {r.get('captions', '-')} | {r['threads']} | {r['precision']} | "
                     f"{r.get('optimizer', '-')} | {r['mmlm_per_s']:,} | {r['transformers-sdpa_per_s']:,} | "
                     f"{r['transformers-eager_per_s']:,} | **{r['ratio']:.2f}×** ({p.split('-')[1]}) | "
                     f"{r['mmlm_mflop']:,} / {r[p + '_mflop']:,} | {r['mmlm_mfu']:.2f} / {r[p + '_mfu']:.2f} |")
    low = min(rows, key=lambda r: r["ratio"])
    lines.append(f"\n{len(rows)} cells; ratio {low['ratio']:.2f}× (lowest) to {max(r['ratio'] for r in rows):.2f}×; "
                 f"{sum(r['ratio'] >= r['target'] for r in rows)} at or above {low['target']}×.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acts", nargs="+", default=list(MATRIX_AXES["act"]), choices=MATRIX_AXES["act"])
    ap.add_argument("--captions", nargs="+", default=list(MATRIX_AXES["captions"]), choices=MATRIX_AXES["captions"])
    ap.add_argument("--threads", nargs="+", type=int, default=list(MATRIX_AXES["threads"]))
    ap.add_argument("--precisions", nargs="+", default=None, choices=MATRIX_AXES["precision"],
                    help="default: fp32, and bf16 where the CPU multiplies bfloat16 natively")
    ap.add_argument("--optimizers", nargs="+", default=list(MATRIX_AXES["optimizer"]),
                    choices=MATRIX_AXES["optimizer"])
    ap.add_argument("--what", nargs="+", default=["train", "image", "text"], choices=["train", "image", "text"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="3 repeats a cell instead of 5")
    args = ap.parse_args()
    precisions = args.precisions or (["fp32", "bf16"] if fast_bf16() else ["fp32"])
    rows = bench_clip_matrix(acts=tuple(args.acts), captions=tuple(args.captions), threads=tuple(args.threads),
                             precisions=tuple(precisions), optimizers=tuple(args.optimizers), what=tuple(args.what),
                             batch=args.batch, repeats=3 if args.quick else 5,
                             emit=lambda r: print(json.dumps(r), flush=True))
    print(table(rows))


if __name__ == "__main__":
    main()
