#!/usr/bin/env python3
"""Write small open_clip reference fixtures for mmlm's CLIP tests.

open_clip needs torchvision, which cannot be installed next to the project's
torch, so this script runs in its own virtual environment:

    python3 -m venv .venv-openclip
    .venv-openclip/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch safetensors

Run it from the repository root (CPU only, a few seconds):

    .venv-openclip/bin/python scripts/openclip_reference.py [--out tests/fixtures/openclip]

For every case it builds a tiny random open_clip ``CLIP`` model from an
open_clip-format JSON config, randomises *all* parameters and buffers (layer
norm / batch norm affine params, biases, BN running stats, logit_scale, ...) so
that a wrong weight mapping cannot pass by accident, and writes into
``<out>/<case>/``:

* ``model_config.json``     open_clip model config (``{"embed_dim", "quick_gelu",
                              "vision_cfg", "text_cfg"}`` like open_clip/model_configs/*.json)
* ``state_dict.safetensors`` ``model.state_dict()`` with open_clip key names, float32
* ``reference.safetensors``  inputs and float32 eval-mode outputs:
    - ``pixel_values``      float32 (3, 3, S, S), standard normal
    - ``input_ids``         int64 (4, context_length): random ids in [1, vocab_size-1),
                              then EOT (= vocab_size-1), then zero padding; one row
                              uses the full context length
    - ``image_features``    ``model.encode_image(pixel_values)`` (not normalised)
    - ``text_features``     ``model.encode_text(input_ids)`` (not normalised)
    - ``logits_per_image``  ``logit_scale.exp() * normalize(img) @ normalize(txt).T``
    - ``image_tokens``      (ViT cases only) output of the last transformer block,
                              before ``ln_post`` -- shape (3, 1 + grid**2, width)

The ``openai_*`` cases additionally contain ``openai_state_dict.pt``: an
OpenAI-``clip``-format checkpoint (a plain tensor dict, ``torch.load(...,
weights_only=True)``) with the same key names, the extra integer entries
``input_resolution``, ``context_length`` and ``vocab_size`` that OpenAI's
checkpoints carry, and the float16/float32 dtype layout produced by OpenAI's
``convert_weights`` (conv / linear / attention weights and ``proj`` /
``text_projection`` in float16, everything else float32).  Their architecture
is chosen so that it can be inferred from tensor shapes alone
(``open_clip.model.build_model_from_openai_state_dict``: attention heads =
width // 64, mlp_ratio 4, QuickGELU); the script asserts that the rebuilt model
reproduces the reference outputs exactly.  The weights of these cases are
rounded to float16 where the checkpoint stores float16, so both files hold the
same values.

Everything is seeded, so re-running the script rewrites byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, build_model_from_openai_state_dict, convert_weights_to_fp16
from safetensors.torch import load_file, save_file
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "openclip"

VOCAB_SIZE = 1000  # EOT id = VOCAB_SIZE - 1 = 999 (largest id, found by argmax pooling)
N_IMAGES = 3
N_TEXTS = 4


def _text_cfg(context_length: int, width: int = 64, heads: int = 4, layers: int = 2) -> dict:
    return {
        "context_length": context_length,
        "vocab_size": VOCAB_SIZE,
        "width": width,
        "heads": heads,
        "layers": layers,
        "mlp_ratio": 4.0,
    }


# name -> (seed, config, write an OpenAI-format checkpoint too)
CASES: dict[str, tuple[int, dict, bool]] = {
    "vit_quickgelu": (
        1001,
        {
            "embed_dim": 48,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 64,
                "head_width": 32,  # -> 2 heads
                "mlp_ratio": 4.0,
                "patch_size": 8,  # -> 4x4 grid
            },
            "text_cfg": _text_cfg(context_length=16),
        },
        False,
    ),
    "vit_gelu": (
        1002,
        {
            "embed_dim": 32,
            "quick_gelu": False,
            "vision_cfg": {
                "image_size": 48,
                "layers": 3,
                "width": 48,
                "head_width": 16,  # -> 3 heads
                "mlp_ratio": 4.0,
                "patch_size": 16,  # -> 3x3 grid
            },
            "text_cfg": _text_cfg(context_length=12),
        },
        False,
    ),
    "rn": (
        1003,
        {
            "embed_dim": 32,
            "quick_gelu": True,
            "vision_cfg": {
                # ModifiedResNet: a list of 4 block counts selects the ResNet tower.
                # attnpool: embed width * 32 = 128, heads = width * 32 // head_width
                # (head_width default 64) = 2
                "image_size": 64,  # /32 -> 2x2 attnpool grid
                "layers": [1, 2, 1, 1],
                "width": 4,
                "patch_size": None,
            },
            "text_cfg": _text_cfg(context_length=16),
        },
        False,
    ),
    # OpenAI-format cases: the architecture must be inferable from shapes, so all
    # head counts follow width // 64 (OpenAI's rule) and mlp_ratio is 4.
    "openai_vit": (
        1004,
        {
            "embed_dim": 48,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 64,
                "head_width": 64,  # -> 1 head (width // 64)
                "mlp_ratio": 4.0,
                "patch_size": 8,
            },
            "text_cfg": _text_cfg(context_length=16, heads=1),  # 64 // 64
        },
        True,
    ),
    "openai_rn": (
        1005,
        {
            "embed_dim": 32,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": 64,
                "layers": [1, 1, 1, 1],
                "width": 4,  # attnpool heads = 4 * 32 // 64 = 2
                "patch_size": None,
            },
            "text_cfg": _text_cfg(context_length=12, heads=1),
        },
        True,
    ),
}


# --------------------------------------------------------------------------- model


def build_model(cfg: dict) -> CLIP:
    cfg = copy.deepcopy(cfg)
    return CLIP(
        embed_dim=cfg.pop("embed_dim"),
        vision_cfg=cfg.pop("vision_cfg"),
        text_cfg=cfg.pop("text_cfg"),
        quick_gelu=cfg.pop("quick_gelu", False),
        **cfg,
    )


@torch.no_grad()
def randomise_(model: nn.Module, gen: torch.Generator) -> None:
    """Replace every parameter / floating buffer with random, non-default values."""

    def normal_like(t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float32) * std + mean

    handled: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            module.weight.copy_(normal_like(module.weight, 1.0, 0.2))
            module.bias.copy_(normal_like(module.bias, 0.0, 0.2))
            handled.update({id(module.weight), id(module.bias)})

    for name, p in model.named_parameters():
        if id(p) in handled:
            continue
        if name == "logit_scale":
            # default is log(1/0.07) = 2.659; use something clearly different
            p.fill_(math.log(20.0) + float(torch.rand((), generator=gen)) * 0.5)
        elif name.endswith("bias"):
            p.copy_(normal_like(p, 0.0, 0.1))
        else:
            std = float(p.std()) if p.numel() > 1 else 0.0
            if not std > 0:
                std = 0.05
            # positional / class embeddings get a larger scale so that they matter
            if "positional_embedding" in name or "class_embedding" in name:
                std = max(std, 0.1)
            p.add_(normal_like(p, 0.0, 0.5 * std))

    # BatchNorm running stats: purely random stats would wash out the signal (the
    # conv outputs are far from unit scale), so first calibrate them on a random
    # batch in train mode, then perturb them (mean shift, var scale in [0.5, 1.5]).
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns:
        visual = model.visual
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batch
        s = visual.image_size
        visual.train()
        visual(torch.randn((8, 3, s, s), generator=gen))
        visual.eval()
        for bn in bns:
            bn.momentum = 0.1
            std = bn.running_var.sqrt()
            bn.running_mean.add_(normal_like(bn.running_mean, 0.0, 0.3) * std)
            bn.running_var.mul_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
            bn.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=gen)))


def round_like_openai_(model: CLIP) -> None:
    """Round exactly the tensors OpenAI's convert_weights stores in fp16 to fp16 values."""
    half = copy.deepcopy(model)
    convert_weights_to_fp16(half)
    with torch.no_grad():
        for (n, p), (n2, q) in zip(model.named_parameters(), half.named_parameters()):
            assert n == n2
            if q.dtype == torch.float16:
                p.copy_(q.float())


def openai_state_dict(model: CLIP, cfg: dict) -> dict[str, torch.Tensor]:
    half = copy.deepcopy(model)
    convert_weights_to_fp16(half)
    sd = {k: v.detach().clone().contiguous() for k, v in half.state_dict().items()}
    sd["input_resolution"] = torch.tensor(cfg["vision_cfg"]["image_size"], dtype=torch.int64)
    sd["context_length"] = torch.tensor(cfg["text_cfg"]["context_length"], dtype=torch.int64)
    sd["vocab_size"] = torch.tensor(cfg["text_cfg"]["vocab_size"], dtype=torch.int64)
    return sd


# --------------------------------------------------------------------------- inputs / outputs


def make_inputs(cfg: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    s = cfg["vision_cfg"]["image_size"]
    pixel_values = torch.randn((N_IMAGES, 3, s, s), generator=gen, dtype=torch.float32)

    ctx = cfg["text_cfg"]["context_length"]
    eot = cfg["text_cfg"]["vocab_size"] - 1
    lengths = [5, ctx, 2, ctx // 2 + 1]  # number of tokens including EOT; row 1 is full
    input_ids = torch.zeros((N_TEXTS, ctx), dtype=torch.int64)
    for i, n in enumerate(lengths):
        input_ids[i, : n - 1] = torch.randint(1, eot, (n - 1,), generator=gen)
        input_ids[i, n - 1] = eot
    return pixel_values, input_ids


@torch.no_grad()
def compute_outputs(model: CLIP, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict:
    model.eval()
    img = model.encode_image(pixel_values)
    txt = model.encode_text(input_ids)
    logits = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    out = {"image_features": img, "text_features": txt, "logits_per_image": logits}

    visual = model.visual
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        tokens = visual.transformer(visual._embeds(pixel_values))  # before ln_post
        # sanity: ln_post -> class token -> proj reproduces encode_image
        pooled = visual.ln_post(tokens)[:, 0] @ visual.proj
        torch.testing.assert_close(pooled, img, rtol=0, atol=0)
        out["image_tokens"] = tokens
    # cross-check the built-in forward / get_logits path
    logits_ref, _ = model.get_logits(pixel_values, input_ids)
    torch.testing.assert_close(logits_ref, logits, rtol=1e-6, atol=1e-5)
    return out


@torch.no_grad()
def check_activation_sensitivity(name: str, cfg: dict, model: CLIP, ref: dict) -> None:
    """The fixture must tell QuickGELU from GELU: flip the flag, outputs must move.

    The two functions differ by at most ~0.02 (near |x| = 2), so the effect is
    ~0.5-1% of the output scale: far above float32 noise (~1e-6), i.e. a test
    comparing with rtol/atol around 1e-4 of the output scale catches it.
    """
    flipped = copy.deepcopy(cfg)
    flipped["quick_gelu"] = not cfg.get("quick_gelu", False)
    other = build_model(flipped).eval()
    other.load_state_dict(model.state_dict())
    checks = [("text_features", other.encode_text(ref["input_ids"]))]
    if not isinstance(cfg["vision_cfg"]["layers"], list):  # ResNet tower has no GELU
        checks.append(("image_features", other.encode_image(ref["pixel_values"])))
    for k, v in checks:
        rel = float((v - ref[k]).abs().max() / ref[k].abs().max())
        print(f"  {name}: flipping quick_gelu moves {k} by {rel:.2%} of max|{k}|")
        assert rel > 2e-3, f"{name}/{k}: QuickGELU vs GELU changes outputs by only {rel:.3g}"


def check_nontrivial(name: str, outputs: dict) -> None:
    for k, v in outputs.items():
        assert torch.isfinite(v).all(), f"{name}/{k} has non-finite values"
        assert float(v.std()) > 1e-3, f"{name}/{k} is (nearly) constant: std={float(v.std())}"
    # different inputs must give clearly different features: the smallest pairwise
    # distance must be a sizeable fraction of the typical feature norm
    for k in ("image_features", "text_features"):
        f = outputs[k]
        spread = float(torch.cdist(f, f).fill_diagonal_(float("inf")).min() / f.norm(dim=-1).mean())
        assert spread > 0.1, f"{name}/{k}: features barely depend on the input (spread {spread:.3g})"


# --------------------------------------------------------------------------- verification


@torch.no_grad()
def verify_factory_roundtrip(name: str, cfg: dict, case_dir: Path, ref: dict) -> None:
    """Rebuild via open_clip.create_model from the written JSON + safetensors."""
    model_name = f"mmlm-fixture-{name}"
    with open(case_dir / "model_config.json") as f:
        open_clip.factory._MODEL_CONFIGS[model_name] = json.load(f)
    try:
        model = open_clip.create_model(
            model_name, pretrained=str(case_dir / "state_dict.safetensors"), device="cpu"
        )
    finally:
        del open_clip.factory._MODEL_CONFIGS[model_name]
    model.eval()
    torch.testing.assert_close(model.encode_image(ref["pixel_values"]), ref["image_features"], rtol=0, atol=0)
    torch.testing.assert_close(model.encode_text(ref["input_ids"]), ref["text_features"], rtol=0, atol=0)


@torch.no_grad()
def verify_openai_rebuild(name: str, case_dir: Path, ref: dict) -> None:
    sd = torch.load(case_dir / "openai_state_dict.pt", map_location="cpu", weights_only=True)
    model = build_model_from_openai_state_dict(dict(sd)).float().eval()
    img = model.encode_image(ref["pixel_values"])
    txt = model.encode_text(ref["input_ids"])
    torch.testing.assert_close(img, ref["image_features"], rtol=0, atol=0, msg=f"{name}: openai image mismatch")
    torch.testing.assert_close(txt, ref["text_features"], rtol=0, atol=0, msg=f"{name}: openai text mismatch")


# --------------------------------------------------------------------------- main


def write_case(name: str, seed: int, cfg: dict, openai_format: bool, out_dir: Path) -> Path:
    torch.manual_seed(seed)  # module default inits
    gen = torch.Generator().manual_seed(seed)  # our own randomisation and inputs

    model = build_model(cfg)
    randomise_(model, gen)
    if openai_format:
        round_like_openai_(model)
    model.eval()

    pixel_values, input_ids = make_inputs(cfg, gen)
    outputs = compute_outputs(model, pixel_values, input_ids)
    check_nontrivial(name, outputs)
    check_activation_sensitivity(name, cfg, model, {"pixel_values": pixel_values, "input_ids": input_ids, **outputs})

    case_dir = out_dir / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)

    with open(case_dir / "model_config.json", "w") as f:
        json.dump(cfg, f, indent=4)
        f.write("\n")

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(case_dir / "state_dict.safetensors"))

    ref = {"pixel_values": pixel_values, "input_ids": input_ids}
    ref.update({k: v.detach().contiguous() for k, v in outputs.items()})
    save_file(ref, str(case_dir / "reference.safetensors"))

    if openai_format:
        torch.save(openai_state_dict(model, cfg), case_dir / "openai_state_dict.pt")

    # verify what was written, reading it back from disk
    ref_disk = load_file(str(case_dir / "reference.safetensors"))
    verify_factory_roundtrip(name, cfg, case_dir, ref_disk)
    if openai_format:
        verify_openai_rebuild(name, case_dir, ref_disk)
    return case_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()

    torch.set_num_threads(1)  # bit-stable CPU results
    print(f"open_clip {open_clip.__version__}, torch {torch.__version__}")
    for name in args.cases:
        seed, cfg, openai_format = CASES[name]
        case_dir = write_case(name, seed, cfg, openai_format, args.out)
        for path in sorted(case_dir.iterdir()):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            print(f"  {path.relative_to(args.out)}  {path.stat().st_size:>9,d} B  sha256:{digest}")


if __name__ == "__main__":
    main()
