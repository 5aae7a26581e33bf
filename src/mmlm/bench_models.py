"""`mmlm bench clip|llava|data`: CLIP training and embedding, LLaVA decoding and the data pipeline, each next
to transformers in the same process.

The model is "bench-vit": a CLIP ViT (width 256, 4 layers, patch 16, 64 px) and text transformer (width 256,
4 layers, context 32), embedding 256, batch 64. transformers' CLIPModel is built at random, saved, and mmlm
loads the same directory, so both run identical weights. Runs alternate A/B (see bench_common.time_ab) and report
median and spread. MFU is the model's FLOPs per second (counted by torch's FlopCounterMode on mmlm's step)
over the matmul peak measured here at the same precision and thread count.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .bench_common import Emit, add_contenders, print_row, rates, require_transformers, synchronize, time_ab
from .quant import quantize

BENCH_VIT_HF = dict(
    vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       image_size=64, patch_size=16),
    text_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=32, vocab_size=49408),
    projection_dim=256,
)
TINY_LLAVA_TEXT = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
IMAGE_TOKEN = 31999  # the last id of the tiny LLaVA's vocabulary marks image positions
TARGETS = {"clip_train": 1.5, "image_embed": 1.5, "text_embed": 1.5, "llava_decode": 3.0, "data_vs_train": 3.0}

def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """FLOP/s of an n x n x n matmul at `dtype` on `device` (the best of `repeats`, after a warm-up)."""
    a, b = torch.randn(n, n).to(device, dtype), torch.randn(n, n).to(device, dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _features(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 5 returns a ModelOutput


def precision_context(precision: str, device_type: str = "cpu"):
    """The autocast context of a benchmark precision on a device type: bf16 autocast, or none (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return torch.autocast(device_type, enabled=False)


# ----------------------------------------------------------------------------- CLIP pair and batch

def clip_pair(workdir: Path, seed: int = 0, hf_config: dict | None = None, device: torch.device | str = "cpu"):
    """(mmlm CLIP, transformers CLIPModel) with the same random weights (bench-vit by default), in eval mode, on
    `device`."""
    transformers = require_transformers()
    import mmlm

    torch.manual_seed(seed)
    hf = transformers.CLIPModel(transformers.CLIPConfig(**(hf_config or BENCH_VIT_HF))).eval()
    hf.save_pretrained(workdir / "bench-vit")
    return mmlm.load(workdir / "bench-vit", device=device), hf.to(device)


def clip_batch(batch: int, seed: int = 0, image_size: int = 64, full: bool = False,
               context: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (B, 3, S, S), input_ids (B, context): random tokens of varied length (captions as they come),
    or with `full` every row filling the context; EOT (the largest id) last."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.zeros(batch, context, dtype=torch.long)
    for row in range(batch):
        n = context - 2 if full else int(torch.randint(4, context - 1, (1,), generator=g))
        ids[row, 0] = 49406
        ids[row, 1 : n + 1] = torch.randint(1, 49000, (n,), generator=g)
        ids[row, n + 1] = 49407
    return pixels, ids


def train_steps(ours, hf, precision: str, lr: float = 1e-5, optimizer: str = "fused"):
    """(one mmlm training step, one transformers training step): forward, CLIP loss, backward, AdamW. Each
    library's own training optimiser: mmlm's (train/optim.py: fused AdamW on plain CPU parameters) and
    transformers Trainer's default for torch >= 2.8 ("adamw_torch_fused"): the same kernel. `optimizer`
    "foreach": both take torch's multi-tensor AdamW instead (what `torch.optim.AdamW` picks by default)."""
    from .train.feature_cache import contrastive_step
    from .train.objectives import contrastive_loss
    from .train.optim import build_optimizer

    ours, hf = copy.deepcopy(ours).train(), copy.deepcopy(hf).train()
    device = next(ours.parameters()).device.type
    if optimizer == "fused":
        opt_ours = build_optimizer(ours, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=lr, fused=True)
    elif optimizer == "foreach":
        opt_ours = torch.optim.AdamW(ours.parameters(), lr=lr, weight_decay=0.0, foreach=True)
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.0, foreach=True)
    else:
        raise ValueError(f"optimizer {optimizer!r}: 'fused' or 'foreach'")

    def loss_fn(img, txt):
        return contrastive_loss("clip", img, txt, ours.logit_scale, ours.logit_bias)

    def step_ours(pixels, ids):
        loss = contrastive_step(ours, pixels, ids, loss_fn, autocast=lambda: precision_context(precision, device))
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def step_hf(pixels, ids):
        with precision_context(precision, device):
            loss = hf(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss.detach()

    return step_ours, step_hf


EMBED_CALLS = 4  # batches per timed embedding repeat


def repeated(fn: Callable[[], Any], precision: str, device_type: str = "cpu") -> Callable[[], None]:
    """One timed embedding repeat: EMBED_CALLS calls of `fn` at `precision` (one ~70 ms call is too short to time
    alone)."""
    def run() -> None:
        with precision_context(precision, device_type):
            for _ in range(EMBED_CALLS):
                fn()
    return run


def bench_clip(quick: bool = False, batch: int = 64, precisions: tuple[str, ...] = ("fp32", "bf16"),
               emit: Emit = print_row, hf_config: dict | None = None, peak_size: int = 1024,
               device: str | None = None) -> list[dict]:
    """CLIP train step and image/text embedding (each per precision), mmlm vs transformers. `hf_config`
    replaces bench-vit (tests run a smaller one); `device` ("cuda", "auto"; default cpu): where both run."""
    from .devices import resolve

    device = resolve(device, "--device")
    repeats = 3 if quick else 5
    rows: list[dict] = []

    def out(row: dict) -> None:
        row = {**row, "model": "bench-vit", "batch": batch, "threads": torch.get_num_threads(), "repeats": repeats,
               **({"device": str(device)} if device.type != "cpu" else {})}
        rows.append(row)
        emit(row)

    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = clip_pair(Path(tmp), hf_config=hf_config, device=device)
    pixels, ids = (t.to(device) for t in clip_batch(batch, image_size=ours.config.vision.image_size))
    with torch.inference_mode():  # same weights, same numbers: a wrong comparison shows here first
        diff = (ours.encode_image(pixels) - _features(hf.get_image_features(pixel_values=pixels))).abs().max().item()
        diff_t = (ours.encode_text(ids) - _features(hf.get_text_features(input_ids=ids))).abs().max().item()
    out({"bench": "clip_parity", "image_max_abs_diff": diff, "text_max_abs_diff": diff_t})

    for precision in precisions:
        peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32, peak_size, device=device)
        step_ours, step_hf = train_steps(ours, hf, precision)
        flops = count_flops(lambda: step_ours(pixels, ids))
        times = time_ab({"mmlm": lambda: step_ours(pixels, ids), "transformers": lambda: step_hf(pixels, ids)}, repeats)
        peak = max(peak, matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32, peak_size,
                                     device=device))  # busy CPU
        med = {}
        for lib, secs in times.items():
            r = rates(batch, secs)
            med[lib] = r["per_s_median"]
            out({"bench": "clip_train", "precision": precision, "library": lib, "unit": "images/s", **r,
                 **({"mfu": round(flops / (batch / r["per_s_median"]) / peak, 3), "step_gflop": round(flops / 1e9, 3),
                     "matmul_peak_tflops": round(peak / 1e12, 3)} if lib == "mmlm" else {})})
        ratio = med["mmlm"] / med["transformers"]
        out({"bench": "clip_train", "precision": precision, "library": "mmlm/transformers", "ratio": round(ratio, 2),
             "target": TARGETS["clip_train"], "met": ratio >= TARGETS["clip_train"]})

    for precision in precisions:
        for what, ours_fn, hf_fn in (
            ("image_embed", lambda: ours.encode_image(pixels), lambda: hf.get_image_features(pixel_values=pixels)),
            ("text_embed", lambda: ours.encode_text(ids), lambda: hf.get_text_features(input_ids=ids)),
        ):
            with torch.inference_mode():
                times = time_ab({"mmlm": repeated(ours_fn, precision, device.type),
                                 "transformers": repeated(hf_fn, precision, device.type)}, repeats)
            med = {}
            for lib, secs in times.items():
                r = rates(batch * EMBED_CALLS, secs)
                med[lib] = r["per_s_median"]
                out({"bench": what, "precision": precision, "library": lib, "unit": "items/s", **r})
            ratio = med["mmlm"] / med["transformers"]
            out({"bench": what, "precision": precision, "library": "mmlm/transformers", "ratio": round(ratio, 2),
                 "target": TARGETS[what], "met": ratio >= TARGETS[what]})
    return rows


MATRIX_AXES = {"act": ("quick_gelu", "gelu"), "captions": ("ragged", "full"), "threads": (1, 2),
               "precision": ("fp32", "bf16"), "optimizer": ("fused", "foreach")}
PEER_ATTENTION = ("sdpa", "eager")  # transformers' attention settings; each cell is judged against the faster


def bench_clip_matrix(acts: tuple[str, ...] = MATRIX_AXES["act"], captions: tuple[str, ...] = MATRIX_AXES["captions"],
                      threads: tuple[int, ...] = MATRIX_AXES["threads"],
                      precisions: tuple[str, ...] = MATRIX_AXES["precision"],
                      optimizers: tuple[str, ...] = MATRIX_AXES["optimizer"],
                      what: tuple[str, ...] = ("train", "image", "text"), batch: int = 64, repeats: int = 5,
                      hf_config: dict | None = None, emit: Emit = print_row) -> list[dict]:
    """bench-vit's CLIP train step and embeddings across the settings a user comparing libraries would try:
    activation (quick_gelu, OpenAI's; gelu, open_clip's for models it trains) x captions (ragged lengths, or
    filling the context) x threads x precision x optimizer (train step: fused or foreach AdamW, the same for
    both), mmlm against transformers with its SDPA and its eager attention, the three A/B/C alternated in one
    process. One JSON row per cell: each library's median items/s and spread, and `ratio` = mmlm over the
    faster transformers setting (`peer`). Image embedding has no captions axis, embeddings no optimizer one."""
    transformers = require_transformers()
    rows: list[dict] = []
    base = hf_config or BENCH_VIT_HF
    before = torch.get_num_threads()

    peaks: dict[tuple[int, str], float] = {}

    def cell(kind: str, runs: dict[str, Callable[[], Any]], items: int, **axes) -> None:
        flops = {lib: count_flops(run) / items for lib, run in runs.items()}  # per item; each run's own FLOPs
        times = time_ab(runs, repeats)
        r = {lib: rates(items, secs) for lib, secs in times.items()}
        peer = max((lib for lib in r if lib != "mmlm"), key=lambda lib: r[lib]["per_s_median"])
        key = (axes["threads"], axes["precision"])
        if key not in peaks:
            peaks[key] = matmul_peak(torch.bfloat16 if axes["precision"] == "bf16" else torch.float32)
        row = {"bench": "clip_matrix", "what": kind, **axes, "batch": batch, "repeats": repeats,
               **{f"{lib}_per_s": v["per_s_median"] for lib, v in r.items()},
               "spread": max(v["spread"] for v in r.values()), "peer": peer,
               "ratio": round(r["mmlm"]["per_s_median"] / r[peer]["per_s_median"], 2), "target": TARGETS["clip_train"],
               # FLOPs an item costs each library, and the share of the matmul peak each reaches at its own FLOPs
               # (three significant digits: a tiny test config's share of the peak is ~0.01)
               **{f"{lib}_mflop": float(f"{flops[lib] / 1e6:.3g}") for lib in r},
               **{f"{lib}_mfu": float(f"{flops[lib] * r[lib]['per_s_median'] / peaks[key]:.3g}") for lib in r},
               "matmul_peak_gflops": round(peaks[key] / 1e9, 1)}
        rows.append(row)
        emit(row)

    try:
        for act in acts:
            cfg = copy.deepcopy(base)
            cfg["vision_config"]["hidden_act"] = cfg["text_config"]["hidden_act"] = act
            with tempfile.TemporaryDirectory() as tmp:
                ours, _ = clip_pair(Path(tmp), hf_config=cfg)
                peers = {f"transformers-{a}": transformers.CLIPModel.from_pretrained(
                    Path(tmp) / "bench-vit", attn_implementation=a).eval() for a in PEER_ATTENTION}
            size = ours.config.vision.image_size
            context = cfg["text_config"]["max_position_embeddings"]
            pixels, ids = clip_batch(batch, image_size=size, full=True, context=context)
            with torch.inference_mode():  # same weights and activation, same numbers
                diff = max(max((ours.encode_image(pixels) - _features(hf.get_image_features(pixel_values=pixels))
                                ).abs().max().item(),
                               (ours.encode_text(ids) - _features(hf.get_text_features(input_ids=ids))).abs().max().item())
                           for hf in peers.values())
            row = {"bench": "clip_matrix_parity", "act": act, "mmlm_act": ours.config.vision.act, "max_abs_diff": diff}
            rows.append(row)
            emit(row)
            for n in threads:
                torch.set_num_threads(n)
                for precision in precisions:
                    axes = {"act": act, "threads": n, "precision": precision}
                    for cap in captions:
                        pixels, ids = clip_batch(batch, image_size=size, full=cap == "full", context=context)
                        for opt in optimizers if "train" in what else ():
                            runs = {"mmlm": train_steps(ours, next(iter(peers.values())), precision, optimizer=opt)[0]}
                            for name, hf in peers.items():
                                runs[name] = train_steps(ours, hf, precision, optimizer=opt)[1]
                            cell("train", {k: (lambda f=f: f(pixels, ids)) for k, f in runs.items()}, batch,
                                 **axes, captions=cap, optimizer=opt)
                        if "text" in what:
                            with torch.inference_mode():
                                cell("text", {"mmlm": repeated(lambda: ours.encode_text(ids), precision),
                                              **{k: repeated(lambda hf=hf: hf.get_text_features(input_ids=ids), precision)
                                                 for k, hf in peers.items()}}, batch * EMBED_CALLS, **axes, captions=cap)
                    if "image" in what:
                        pixels, _ = clip_batch(batch, image_size=size, context=context)
                        with torch.inference_mode():
                            cell("image", {"mmlm": repeated(lambda: ours.encode_image(pixels), precision),
                                           **{k: repeated(lambda hf=hf: hf.get_image_features(pixel_values=pixels),
                                                          precision) for k, hf in peers.items()}},
                                 batch * EMBED_CALLS, **axes)
    finally:
        torch.set_num_threads(before)
    return rows


# ----------------------------------------------------------------------------- LLaVA

def llava_pair(workdir: Path, seed: int = 0, text_config: dict | None = None, device: torch.device | str = "cpu"):
    """(mmlm Llava, transformers LlavaForConditionalGeneration): bench-vit's vision tower (layer -2, CLS
    dropped: 16 image tokens) + a 2-layer MLP projector + the tiny Llama (hidden 256, 4 layers, GQA)."""
    transformers = require_transformers()
    import mmlm

    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**BENCH_VIT_HF["vision_config"]),
                                   text_config=transformers.LlamaConfig(**(text_config or TINY_LLAVA_TEXT)),
                                   image_token_id=IMAGE_TOKEN,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # sharper logits: greedy choices are not near-ties, so both libraries must agree
        hf.lm_head.weight.mul_(20)
    hf.save_pretrained(workdir / "tiny-llava")
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    return mmlm.load(workdir / "tiny-llava", device=device), hf.to(device)


def llava_prompts(batch: int, text_tokens: int, image_tokens: int = 16, seed: int = 0):
    """Left-padded prompts of one image each: 2 text tokens, the image tokens, then the rest of the text
    (rows from text_tokens/2 to text_tokens long); input_ids, attention_mask, pixel_values (B, 3, 64, 64)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        n = text_tokens if batch == 1 else text_tokens // 2 + (text_tokens - text_tokens // 2) * i // (batch - 1)
        text = torch.randint(3, 31000, (n,), generator=g).tolist()
        rows.append(text[:2] + [IMAGE_TOKEN] * image_tokens + text[2:])
    T = max(map(len, rows))
    ids, mask = torch.zeros(batch, T, dtype=torch.long), torch.zeros(batch, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids, mask, torch.randn(batch, 3, 64, 64, generator=g)


def bench_llava(quick: bool = False, batches: tuple[int, ...] = (1, 8), compile: bool = False,
                emit: Emit = print_row, text_config: dict | None = None, weights: tuple[str, ...] = ("int4",),
                device: str | None = None) -> list[dict]:
    """Greedy decode tokens/s (prefill of image + text included, as a chat sees it) and prefill tokens/s.
    `text_config` replaces the tiny Llama (its vocabulary must hold IMAGE_TOKEN); each of `weights` adds mmlm
    with its LM quantized (see bench_decode); `device` as in bench_decode (no quantized weights on a GPU)."""
    from .devices import resolve
    from .generation import generate

    device = resolve(device, "--device")
    if device.type != "cpu":
        weights = ()

    repeats, new_tokens = (3, 32) if quick else (5, 128)
    rows: list[dict] = []

    def out(row: dict) -> None:
        row = {**row, "model": "tiny-llava", "threads": torch.get_num_threads(), "repeats": repeats,
               **({"device": str(device)} if device.type != "cpu" else {})}
        rows.append(row)
        emit(row)

    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = llava_pair(Path(tmp), text_config=text_config, device=device)

    quantized = {mode: quantize(copy.deepcopy(ours), mode) for mode in weights}

    def ours_gen(ids, mask, px, n, comp=False, model=None):
        return generate(model or ours, ids, mask, pixel_values=px, max_new_tokens=n, eos_token_id=[], compile=comp)

    def hf_gen(ids, mask, px, n):
        with torch.inference_mode():
            res = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        return res[:, ids.shape[1]:]

    for batch in batches:
        ids, mask, px = (t.to(device) for t in llava_prompts(batch, 16, seed=batch))
        a, b = ours_gen(ids, mask, px, new_tokens), hf_gen(ids, mask, px, new_tokens)
        out({"bench": "llava_greedy_match", "batch": batch, "same_tokens": a.shape == b.shape and torch.equal(a, b)})
        runs = {"mmlm": lambda: ours_gen(ids, mask, px, new_tokens),
                "transformers": lambda: hf_gen(ids, mask, px, new_tokens)}
        add_contenders(runs, ours, quantized, lambda m, c: ours_gen(ids, mask, px, new_tokens, c, model=m), a, ids,
                       mask, compile, lambda r: out({"batch": batch, **r}), pixel_values=px)
        times = time_ab(runs, repeats)
        med = {}
        for lib, secs in times.items():
            r = rates(batch * new_tokens, secs)
            med[lib] = r["per_s_median"]
            out({"bench": "llava_decode", "batch": batch, "library": lib, "unit": "tokens/s", **r, "new_tokens": new_tokens,
                 "prompt_tokens": int(mask.sum(1).max())})
        for lib in [k for k in runs if k != "transformers"]:
            ratio = med[lib] / med["transformers"]
            out({"bench": "llava_decode", "batch": batch, "library": f"{lib}/transformers", "ratio": round(ratio, 2),
                 "target": TARGETS["llava_decode"], "met": ratio >= TARGETS["llava_decode"]})

        pids, pmask, ppx = (t.to(device) for t in llava_prompts(batch, 112, seed=100 + batch))  # 128 tokens per row: 16 image + 112 text
        times = time_ab({"mmlm": lambda: ours_gen(pids, pmask, ppx, 1), "transformers": lambda: hf_gen(pids, pmask, ppx, 1)},
                        repeats)
        med = {}
        for lib, secs in times.items():
            r = rates(int(pmask.sum()), secs)
            med[lib] = r["per_s_median"]
            out({"bench": "llava_prefill", "batch": batch, "library": lib, "unit": "tokens/s", **r,
                 "prompt_tokens": int(pmask.sum(1).max())})
        out({"bench": "llava_prefill", "batch": batch, "library": "mmlm/transformers",
             "ratio": round(med["mmlm"] / med["transformers"], 2)})
    return rows


# ----------------------------------------------------------------------------- data pipeline

def bench_data(quick: bool = False, batch: int = 64, workers: tuple[int, ...] = (0, 1, 2),
               train_images_per_s: dict[str, float] | None = None, emit: Emit = print_row) -> list[dict]:
    """Batches/s of the CLIP training input (shapes images rendered, captions tokenised with CLIP's BPE,
    collated to pixel_values and input_ids) through the training loop's own DataLoader, per worker count;
    compared with the train step's consumption rate when `train_images_per_s` {precision: images/s} is given."""
    from .data.image_text import ArrayImageText, ImageTextCollate
    from .data.shapes import ShapesDataset
    from .data.transforms import PreprocessConfig
    from .formats import load_tokenizer
    from .tokenizer import find_clip_bpe
    from .train.loop import TrainConfig, make_loader

    n_batches = 4 if quick else 12
    preprocess = PreprocessConfig(image_size=64)
    dataset = ArrayImageText(ShapesDataset("train", batch * (n_batches + 4), 0, 64, single=False, n_questions=0),
                             preprocess)
    collate = ImageTextCollate(load_tokenizer(find_clip_bpe()), 32, preprocess)
    default_workers = TrainConfig().num_workers
    rows: list[dict] = []
    for w in sorted(set(workers) | {default_workers}):
        loader = iter(make_loader(dataset, collate, batch, seed=0, start_batch=0, num_workers=w))
        next(loader)  # workers started, first batch out
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        secs = time.perf_counter() - t0
        del loader
        row = {"bench": "data_pipeline", "workers": w, "default": w == default_workers, "batch": batch,
               "images_per_s": round(batch * n_batches / secs, 1), "batches": n_batches,
               "threads": torch.get_num_threads()}
        if w == default_workers and train_images_per_s:
            row["vs_train_step"] = {p: round(row["images_per_s"] / r, 2) for p, r in train_images_per_s.items()}
            row["target"] = TARGETS["data_vs_train"]
            row["met"] = all(v >= TARGETS["data_vs_train"] for v in row["vs_train_step"].values())
        rows.append(row)
        emit(row)
    return rows
