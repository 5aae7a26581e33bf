"""One denoising step of a Stable-Diffusion-1.x-sized UNet: mmlm vs diffusers on the same weights, one process.

    python benchmarks/bench_sd_unet.py                  # latents 32x32 and 64x64 (256 and 512 px images)
    python benchmarks/bench_sd_unet.py --sizes 32 --repeats 3

diffusers' `UNet2DConditionModel()` with its defaults (SD 1.x: channels 320/640/1280/1280, 8 heads, cross-attention
to 768-wide text states; 860 M parameters), random weights, loaded into mmlm's UNet by the same renaming as
`mmlm.load` uses for a pipeline directory. One call is one guided sampling step: batch 2 (a prompt and its empty
twin), 77 text states, fp32, no gradient; mmlm inside `conv_weights_layout` as its sampling loop runs. The calls
are timed A/B alternated after a warm-up each; the noise predictions' largest difference is printed with them.
Needs diffusers (`pip install -e ".[bench]"`) and ~8 GB of memory; ~1 min per repeat at 64x64 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmlm.bench_common import rates, time_ab  # noqa: E402
from mmlm.bench_generation import require_diffusers  # noqa: E402
from mmlm.convert.diffusers_pipeline import rules_for, unet_config_from_diffusers  # noqa: E402
from mmlm.convert.mapping import rename  # noqa: E402
from mmlm.models.kernels import conv_weights_layout  # noqa: E402
from mmlm.models.unet import UNet2DConditionModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sides (image side / 8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    diffusers, _ = require_diffusers()
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(cross_attention_dim=768).eval()
    ours = UNet2DConditionModel(unet_config_from_diffusers(dict(theirs.config))).eval()
    ours.load_state_dict(rename(theirs.state_dict(), rules_for(ours), "to_ours", "bench"))
    params = sum(p.numel() for p in theirs.parameters())
    for size in args.sizes:
        x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(1))
        text = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))
        t = torch.tensor(500)
        with torch.no_grad(), conv_weights_layout(ours):
            diff = (ours(x, t, text) - theirs(x, t, encoder_hidden_states=text).sample).abs().max().item()
            times = time_ab({"mmlm": lambda: ours(x, t, text),
                             "diffusers": lambda: theirs(x, t, encoder_hidden_states=text)}, args.repeats)
        med = {}
        for lib, secs in times.items():
            r = rates(1, secs, "steps_per_s")
            med[lib] = sorted(secs)[len(secs) // 2]
            print(json.dumps({"bench": "sd_unet_step", "latents": size, "library": lib, "params_m": round(params / 1e6),
                              "seconds_median": round(med[lib], 3), **r, "threads": args.threads,
                              "repeats": args.repeats}), flush=True)
        print(json.dumps({"bench": "sd_unet_step", "latents": size, "library": "mmlm/diffusers",
                          "ratio": round(med["diffusers"] / med["mmlm"], 2), "noise_max_abs_diff": diff}), flush=True)


if __name__ == "__main__":
    main()
