"""`mmlm <command>`: a thin argparse layer over typed functions that are callable from Python too."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence


def cmd_convert(args: argparse.Namespace) -> int:
    from .formats import convert

    out = convert(args.format, args.src, args.out, config=args.config)
    print(json.dumps({"converted": str(args.src), "format": args.format, "out": str(out)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .formats import export_diffusers, export_hf_checkpoint

    out = (export_diffusers if args.format == "diffusers" else export_hf_checkpoint)(args.src, args.out)
    print(json.dumps({"exported": str(args.src), "format": args.format, "out": str(out)}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .train.recipes import KINDS, load_recipe

    cfg = load_recipe(args.model, args.config, args.overrides)
    try:  # under torchrun the run joins the process group (train.loop.start_process)
        KINDS[args.model].train(cfg, args.out, resume=not args.no_resume)
        grouped = distributed.world().enabled
    finally:
        distributed.shutdown()  # a failing rank leaves the group at once; torchrun then stops the others
    if grouped and os.environ.get("TORCHELASTIC_RUN_ID"):
        # A torchrun worker whose run is finished and written leaves without the interpreter's teardown: there
        # gloo's threads can abort the process (SIGABRT, "terminate called without an active exception"), which
        # torchrun reports as a failed run (seen in tests under load, never at a run's end otherwise).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.media_sets import write_media_dataset
    from .data.shapes import write_shapes

    if args.dataset != "shapes":  # the video and audio sets: real mp4 / wav files + CSVs
        summary = write_media_dataset(args.dataset, args.out, train=args.train, val=args.val, novel=args.novel,
                                      seed=args.seed, frames=args.frames, image_size=args.image_size)
        print(json.dumps(summary, default=str))
        return 0
    summary = write_shapes(args.out, train=args.train, val=args.val, novel=args.novel, seed=args.seed,
                           image_size=args.image_size, fmt=args.format)
    print(json.dumps(summary, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.cli import eval_retrieval, eval_vqa, eval_zeroshot

    if args.task == "generation":
        from .eval.generation import eval_generation

        if args.judge is None:
            raise ValueError("eval generation needs --judge CLIP_DIR (a CLIP that scores the images)")
        result = eval_generation(args.model, args.judge, per_group=args.limit or 8, steps=args.steps,
                                 guidance=args.guidance, seed=args.seed, out=args.out, dtype=args.dtype,
                                 device=args.device)
        print(json.dumps(result))
        return 0
    if args.data is None:
        raise ValueError(f"eval {args.task} needs --data")
    if args.task == "vqa":
        result = eval_vqa(args.model, args.data, template=args.template, limit=args.limit, weights=args.weights,
                          answers=args.answers, dtype=args.dtype, device=args.device)
    elif args.task == "zeroshot":
        result = eval_zeroshot(args.model, args.data, classes=args.classes, templates=args.templates,
                               limit=args.limit, dtype=args.dtype, device=args.device)
    else:
        result = eval_retrieval(args.model, args.data, limit=args.limit, dtype=args.dtype, device=args.device)
    print(json.dumps(result))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import chat

    chat(args.model, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, top_p=args.top_p, seed=args.seed, image=args.image, template=args.template,
         weights=args.weights, dtype=args.dtype, device=args.device, compile=args.compile,
         video=args.video, audio=args.audio)
    return 0


def _image_size(text: str | None) -> tuple[int, int] | None:
    """`--size WxH` -> (height, width); None when not given."""
    if text is None:
        return None
    found = re.fullmatch(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", text.strip())
    if not found:
        raise ValueError(f"--size must be WIDTHxHEIGHT in pixels (e.g. 32x32), got {text!r}")
    return int(found.group(2)), int(found.group(1))


def cmd_generate(args: argparse.Namespace) -> int:
    from . import generate_image, load
    from .image_generation import MAX_STEPS, save_images

    if args.n < 1 or args.n > 64:
        raise ValueError(f"--n must be from 1 to 64, got {args.n}")
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if not 1 <= args.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be from 1 to {MAX_STEPS}, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    size = _image_size(args.size)
    pipe = load(args.model, dtype=args.dtype, device=args.device)
    if not hasattr(pipe, "unet"):
        raise ValueError(f"--model {args.model} is not a text-to-image model")
    height, width = size or (None, None)
    if size is not None:
        cfg = pipe.config
        step = (cfg.vae.downscale if cfg.vae is not None else 1) * 2 ** (len(cfg.unet.block_out_channels) - 1)
        if height % step or width % step or max(size) > 16 * cfg.image_size:
            raise ValueError(f"--size {args.size}: this model draws sides that are multiples of {step} px, up to "
                             f"{16 * cfg.image_size} (its native size is {cfg.image_size}x{cfg.image_size})")
    if pipe.tokenizer is not None:
        try:
            pipe.tokenizer([args.prompt], context_length=min(pipe.tokenizer.context_length, pipe.config.text.context_length),
                           truncate=False)
        except ValueError as e:
            raise ValueError(f"--prompt is too long for the model: {e}") from None
    images = generate_image(pipe, [args.prompt] * args.n, steps=args.steps, guidance=args.guidance, seed=args.seed,
                            scheduler=args.scheduler, negative_prompt=args.negative_prompt, height=height, width=width)
    print(json.dumps({"prompt": args.prompt, "images": [str(p) for p in save_images(images, args.out)]}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServeConfig, serve
    except ImportError as e:
        raise ValueError(f"the server needs the serve extra: pip install 'mmlm[serve]' ({e})") from None

    config = ServeConfig(name=args.name, template=args.template, local_dir=args.allow_local_dir,
                         allow_remote=args.allow_remote_images, allow_private_remote=args.allow_private_remote,
                         max_queue=args.max_queue, max_batch=args.max_batch, batching=args.batching,
                         timeout_s=args.timeout,
                         api_key=_api_key(args), allowed_hosts=tuple(args.allowed_host), weights=args.weights,
                         max_body_bytes=args.max_body_mb * 1024 * 1024, max_text_chars=args.max_text_chars,
                         body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
                         shutdown_timeout_s=args.shutdown_timeout, fetch_timeout_s=args.fetch_timeout,
                         max_generated_images=args.max_generated_images, max_image_steps=args.max_image_steps)
    config.dtype, config.device = args.dtype, args.device
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    serve(args.model, host=args.host, port=args.port, config=config, insecure=args.insecure)
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, --api-key or MMLM_API_KEY (one at most); an empty one is an error."""
    given = {name: value for name, value in [("--api-key-file", args.api_key_file), ("--api-key", args.api_key),
                                             ("MMLM_API_KEY", os.environ.get("MMLM_API_KEY"))] if value is not None}
    if len(given) > 1:
        raise ValueError(f"give the API key one way, not {' and '.join(given)}")
    if "--api-key-file" in given:
        lines = Path(given["--api-key-file"]).read_text(encoding="utf-8").splitlines()
        given["--api-key-file"] = lines[0].strip() if lines else ""
    for name, key in given.items():
        if not key.strip():
            raise ValueError(f"the API key from {name} is empty")
        return key.strip()
    return None


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart

    quickstart(args.out, minutes=args.minutes, steps=args.steps, overrides=args.overrides or None,
               eval_size=args.eval_size, llava=not args.no_llava, generation=args.generation,
               generation_steps=args.generation_steps)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .assets import copy_recipe, list_recipes

    if args.action == "copy":
        print(copy_recipe(args.name, args.out))
        return 0
    recipes = list_recipes()
    width = max(map(len, recipes))
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(args.what, models=args.model, quick=args.quick, threads=args.threads, memory=not args.no_memory,
              compile=args.compile, weights=tuple(args.weights or ["int4"]), device=args.device)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan

    plan(args.config, gpus=args.gpus, gpu_memory=args.gpu_memory, peak_tflops=args.peak_tflops,
         utilization=args.utilization, link_gb_s=args.link_gb_s, reserve=args.reserve,
         dataset_sizes=tuple(args.dataset_size), overrides=args.overrides)
    return 0


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """--dtype and --device: where `mmlm.load` puts the weights (streamed from the files, no float32 copy)."""
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="load the weights in this dtype (default float32)")
    p.add_argument("--device", default=None, help="load the weights onto this device: cpu (default), cuda, cuda:N, auto")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmlm", description="CLIP and LLaVA from scratch: train, convert, evaluate, serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert an OpenAI / open_clip / Hugging Face checkpoint into mmlm format")
    c.add_argument("format", choices=["openai", "open_clip", "hf"])
    c.add_argument("src", type=Path, help="state dict file (openai, open_clip) or model directory (hf)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--config", type=Path, default=None,
                   help="architecture: open_clip model JSON (required for open_clip) or mmlm config.json")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("export", help="export an mmlm checkpoint to another format")
    e.add_argument("format", choices=["hf", "diffusers"],
                   help="hf: a transformers model dir; diffusers: a StableDiffusionPipeline dir (text-to-image models)")
    e.add_argument("src", type=Path)
    e.add_argument("--out", type=Path, required=True)
    e.set_defaults(func=cmd_export)

    gi = sub.add_parser("generate", help="text-to-image: PNGs from a diffusers pipeline dir or an mmlm text-to-image run")
    gi.add_argument("--model", required=True, help="a diffusers StableDiffusionPipeline dir or an mmlm checkpoint dir")
    gi.add_argument("--prompt", required=True)
    gi.add_argument("--out", type=Path, required=True, help="img.png (with --n > 1: img-0.png, img-1.png, ...)")
    gi.add_argument("--n", type=int, default=1, help="images for the prompt (default 1)")
    gi.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    gi.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale; <= 1 turns it off (default: the model's, 7.5 for SD pipelines)")
    gi.add_argument("--seed", type=int, default=0)
    gi.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm", "euler"])
    gi.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels (default: the model's native size)")
    gi.add_argument("--negative-prompt", default="", help="what guidance steers away from (default: the empty prompt)")
    add_load_flags(gi)
    gi.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a model from a YAML recipe (resumes when --out holds a checkpoint)")
    t.add_argument("model", choices=["clip", "llava", "diffusion", "vae"])
    t.add_argument("--config", type=Path, default=None, help="recipe YAML (see configs/)")
    t.add_argument("--out", type=Path, required=True, help="run directory")
    t.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-3")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="write a dataset to disk")
    d.add_argument("dataset", choices=["shapes", "moving-shapes", "sounds", "spoken"])
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--train", type=int, default=10_000)
    d.add_argument("--val", type=int, default=1000)
    d.add_argument("--novel", type=int, default=1000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--format", choices=["files", "tar"], default="files")
    d.add_argument("--frames", type=int, default=8, help="moving-shapes: frames per clip (8-16)")
    d.set_defaults(func=cmd_data)

    v = sub.add_parser("eval", help="evaluate a CLIP (zeroshot, retrieval) or LLaVA (vqa) model; prints one JSON object")
    v.add_argument("task", choices=["zeroshot", "retrieval", "vqa", "generation"])
    v.add_argument("--model", type=Path, required=True)
    v.add_argument("--data", default=None,
                   help="zeroshot: 'shapes', 'shapes-novel', 'fashion_mnist' or a CSV with image (video, audio),label "
                        "columns; retrieval: 'shapes' or a CSV/TSV with image (a video / audio CLIP: video / audio),"
                        "caption columns (a file may repeat); "
                        "vqa: shapes | shapes-novel | media-shapes | media-shapes-novel | a LLaVA conversation JSON with "
                        "reference answers")
    v.add_argument("--classes", default=None, help="zeroshot on a CSV: JSON/text file of class names (default: labels seen)")
    v.add_argument("--templates", default=None, help="zeroshot: text file, one prompt template with {} per line")
    v.add_argument("--limit", type=int, default=0,
                   help="evaluate at most this many images (0 = all); generation: prompts per group (0 = 8)")
    v.add_argument("--judge", type=Path, default=None, help="generation: the CLIP that judges the images")
    v.add_argument("--steps", type=int, default=50, help="generation: sampling steps")
    v.add_argument("--guidance", type=float, default=None,
                   help="generation: classifier-free guidance scale (default: the model's)")
    v.add_argument("--seed", type=int, default=0, help="generation: the prompts' scenes and the noise")
    v.add_argument("--out", type=Path, default=None,
                   help="generation: where generation.json and generation_grid.png go (default: the model's run)")
    v.add_argument("--weights", default=None, choices=["int8", "int4"],
                   help="vqa: answer with the LM's weights quantized (measures what quantization costs)")
    v.add_argument("--template", default=None, choices=["plain", "vicuna_v1", "chat"],
                   help="vqa: the conversation template (default: the one the model was tuned with, from its config)")
    v.add_argument("--answers", type=Path, default=None,
                   help="vqa: also write every question's answer, reference and verdict to this JSON-lines file")
    v.set_defaults(func=cmd_eval)
    add_load_flags(v)

    h = sub.add_parser("chat", help="chat with a language model or, with --image, a LLaVA (one answer with --prompt, "
                                    "else interactive); streams")
    h.add_argument("--model", type=Path, required=True, help="a .gguf file or a model directory with tokenizer.json")
    h.add_argument("--prompt", default=None, help="answer this one message and exit")
    h.add_argument("--system", default=None, help="system message (default: the chat template's own, if any)")
    h.add_argument("--max-new-tokens", type=int, default=256)
    h.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    h.add_argument("--top-p", type=float, default=1.0)
    h.add_argument("--seed", type=int, default=None)
    h.add_argument("--image", type=Path, default=None, help="LLaVA: the image to talk about")
    h.add_argument("--video", type=Path, default=None, help="LLaVA that reads video: the clip to talk about")
    h.add_argument("--audio", type=Path, default=None, help="LLaVA that reads sound: the sound (wav, mp3, ...)")
    h.add_argument("--weights", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="quantize the LM's weights for faster decoding on a CPU; auto (default): a Q4/Q8 GGUF runs at "
                        "its own precision (int4/int8), anything else as loaded; none: as loaded (float32)")
    h.add_argument("--template", default=None, choices=["plain", "vicuna_v1", "chat"],
                   help="LLaVA: the conversation template (default: the one it was tuned with, from its config)")
    h.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step: ~20 s once, then ~1.5x the eager tokens/s on a CPU (SmolLM2 int4)")
    h.set_defaults(func=cmd_chat)
    add_load_flags(h)

    b = sub.add_parser("bench", help="speed against transformers in the same run; prints JSON lines (needs transformers)")
    b.add_argument("what", choices=["decode", "clip", "llava", "data", "generation", "all"],
                   help="decode: LM greedy generate() tokens/s, prefill tokens/s, peak memory; clip: bench-vit train step "
                        "(fp32, bf16) and image/text embedding; llava: tiny LLaVA decode and prefill; data: the CLIP "
                        "input pipeline per DataLoader worker count; generation: 50-step guided DDIM text-to-image "
                        "against diffusers; all: every one")
    b.add_argument("--quick", action="store_true", help="fewer tokens and repeats (about a minute less)")
    b.add_argument("--model", action="append", choices=["tiny", "smollm2-135m"], default=None,
                   help="benchmark only this model (repeatable; default: both)")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. the cores)")
    b.add_argument("--weights", action="append", choices=["int8", "int4"], default=None,
                   help="decode/llava: add mmlm with the LM quantized (repeatable; default: int4)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    b.add_argument("--compile", action="store_true",
                   help="decode/llava: add mmlm with its decode step torch.compile'd (compiles per model and batch size: seconds to minutes)")
    b.add_argument("--device", default=None,
                   help="decode/clip/llava: run both libraries on this device: cpu (default), cuda, cuda:N, auto")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat, embeddings, zero-shot) and a web page at /")
    s.add_argument("--model", type=Path, required=True, help="a checkpoint dir (CLIP, LLaVA, LM) or a .gguf file")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="the model id clients send (default: the directory name)")
    s.add_argument("--template", default=None, choices=["plain", "vicuna_v1", "chat"],
                   help="LLaVA: the conversation template (default: the one it was tuned with, from its config)")
    s.add_argument("--allow-local-dir", default=None, help="image_url may name files under this directory")
    s.add_argument("--allow-remote-images", action="store_true", help="image_url may be an http(s) URL to fetch")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting before the server answers 429")
    s.add_argument("--max-batch", type=int, default=None,
                   help="generation requests batched together (default: 32 continuous, 8 static)")
    s.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                   help="generation: requests join and leave the running batch at every step (continuous), or a "
                        "batch's requests are fixed when it starts (static)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds per request, queueing included")
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/* (visible in ps: "
                                                   "prefer MMLM_API_KEY or --api-key-file)")
    s.add_argument("--api-key-file", default=None, help="read the API key from the first line of this file")
    s.add_argument("--insecure", action="store_true", help="allow a --host beyond loopback without an API key")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host header name accepted without a key, besides localhost and IP addresses (repeatable)")
    s.add_argument("--allow-private-remote", action="store_true",
                   help="with --allow-remote-images: also fetch from loopback, private and link-local addresses")
    s.add_argument("--max-body-mb", type=int, default=20, help="largest request body, in MiB")
    s.add_argument("--max-text-chars", type=int, default=None,
                   help="characters of text per request (default: the most that can fit the context)")
    s.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's line and headers")
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request's whole body")
    s.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds per remote image, everything included")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds requests in flight get on SIGTERM before they are cut")
    s.add_argument("--max-generated-images", type=int, default=4, help="text-to-image: images per request (n)")
    s.add_argument("--max-image-steps", type=int, default=100, help="text-to-image: sampling steps per request")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. the cores)")
    s.add_argument("--weights", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="LM / LLaVA: quantize the LM's weights for faster decoding on a CPU; auto (default): a Q4/Q8 "
                        "GGUF at its own precision (int4/int8), anything else as loaded; none: as loaded")
    s.set_defaults(func=cmd_serve)
    add_load_flags(s)

    q = sub.add_parser("quickstart", help="the main job: generate shapes, train a small CLIP and a tiny LLaVA, "
                                          "evaluate, report")
    q.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    q.add_argument("--minutes", type=float, default=None,
                   help="train the CLIP for about this many minutes here instead of its recipe's 1100 steps (~7 min on "
                        "2 idle cores); a shorter CLIP gives the LLaVA after it a weaker vision tower")
    q.add_argument("--no-llava", action="store_true", help="stop after the CLIP part")
    q.add_argument("--generation", action="store_true",
                   help="then train a text-to-image UNet on the CLIP's text tower and judge its images with the CLIP "
                        "(the diffusion recipe: about 30 min on 2 idle cores)")
    q.add_argument("--generation-steps", type=int, default=None, help="training steps of the text-to-image UNet")
    q.add_argument("--steps", type=int, default=None, help="train the CLIP for exactly this many steps")
    q.add_argument("--eval-size", type=int, default=1000, help="images per evaluation (LLaVA: at most 500)")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the CLIP recipe (train.* also reach the LLaVA), e.g. train.batch_size=16")
    q.set_defaults(func=cmd_quickstart)

    pl = sub.add_parser("plan", help="per-GPU memory (measured activations), the largest batch and the step and epoch "
                                     "time of a CLIP recipe on N GPUs, for DDP and FSDP2, with and without activation "
                                     "checkpointing")
    pl.add_argument("--config", required=True, help="a CLIP recipe (a path, or a packaged name such as clip-vit-l14)")
    pl.add_argument("--gpus", type=int, default=2)
    pl.add_argument("--gpu-memory", default="24GB", help="memory of each GPU (GB = GiB here), default 24GB (RTX 3090)")
    pl.add_argument("--peak-tflops", type=float, default=71.0,
                    help="the GPU's dense bf16 tensor peak, default 71 (RTX 3090)")
    pl.add_argument("--utilization", type=float, default=0.4, help="the fraction of the peak a step reaches (0.4)")
    pl.add_argument("--link-gb-s", type=float, default=16.0, help="GB/s between the GPUs (16: PCIe 4.0 x16)")
    pl.add_argument("--reserve", default="1.5GB", help="per GPU, kept for the CUDA context and allocator slack")
    pl.add_argument("--dataset-size", type=int, nargs="+", default=[1_000_000, 3_300_000],
                    help="image-text pairs per epoch (default 1M and CC3M's 3.3M)")
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the recipe")
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("recipes", help="list the YAML recipes that ship with mmlm, or copy one out for editing")
    ra = r.add_subparsers(dest="action", metavar="ACTION")
    ra.add_parser("list", help="name and one-line description of each recipe (the default)")
    rc = ra.add_parser("copy", help="write a copy of a recipe to edit and pass to `mmlm train --config`")
    rc.add_argument("name", help="a recipe name, e.g. clip-shapes")
    rc.add_argument("--out", type=Path, default=Path("."), help="directory to write NAME.yaml into")
    r.set_defaults(func=cmd_recipes, action="list")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after options; KEY=VALUE overrides may come anywhere.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func: Callable[[argparse.Namespace], int] = args.func
    from .train.loop import TrainingError

    try:
        return func(args)
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError, TrainingError) as e:
        # Bad input is the user's to fix: say what is wrong, without a traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmlm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
