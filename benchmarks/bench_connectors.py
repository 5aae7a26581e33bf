"""LLaVA's connector against Flamingo's, decoding: the same questions about a clip and its soundtrack, greedy, 32
new tokens, batch 1 and 8, each model's tokens/s (prefill included), A/B alternated over rounds in one process.

    .venv/bin/python benchmarks/bench_connectors.py --llava runs/llava-media-s2/final --flamingo runs/flamingo-s2/final
        [--threads 2] [--rounds 3] [--new-tokens 32]

Both runs come from configs/llava-media-shapes.yaml and configs/llava-media-flamingo.yaml (same towers, data, LLM).
Prints one JSON line per (model, batch) and the ratio flamingo / llava.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mmlm
from mmlm.data.conversation import encode_prompt
from mmlm.data.media import MediaProcessor
from mmlm.data.media_sets import media_conversation
from mmlm.formats import load_preprocess, load_tokenizer
from mmlm.generation import generate


def inputs(path: str, batch: int) -> tuple:
    """The model, and its left-padded prompts and media for `batch` clip + sound questions."""
    model, tok = mmlm.load(path).eval(), load_tokenizer(path)
    mc = model.config
    records = [media_conversation("val", i, "video+audio", n_questions=1) for i in range(batch)]
    prompts = [encode_prompt(r["conversations"][:1], tok, mc.template, mc.image_token_id, mc.image_tokens,
                             media=mc.placeholders()) for r in records]
    T = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    media = MediaProcessor.for_model(mc, load_preprocess(path))(videos=[r["videos"][0] for r in records],
                                                                 audios=[r["audios"][0] for r in records])
    return model, ids, mask, media


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llava", required=True)
    ap.add_argument("--flamingo", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tps: dict[tuple[str, int], float] = {}
    for batch in (1, 8):
        setups = {name: inputs(path, batch) for name, path in (("llava", args.llava), ("flamingo", args.flamingo))}
        times: dict[str, list[float]] = {name: [] for name in setups}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name in (list(setups) if r % 2 else list(setups)[::-1]):  # A/B alternated
                model, ids, mask, media = setups[name]
                t = time.perf_counter()
                generate(model, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=[], **media)
                if r:
                    times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            tps[(name, batch)] = batch * args.new_tokens / statistics.median(ts)
            print(json.dumps({"model": name, "batch": batch, "prompt_tokens": setups[name][1].shape[1],
                              "tokens_per_s": round(tps[(name, batch)], 1),
                              "spread": [round(batch * args.new_tokens / t, 1) for t in (max(ts), min(ts))]}))
    print(json.dumps({"flamingo_over_llava": {b: round(tps[("flamingo", b)] / tps[("llava", b)], 2) for b in (1, 8)}}))


if __name__ == "__main__":
    main()
