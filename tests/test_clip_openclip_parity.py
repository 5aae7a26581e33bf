"""mmlm CLIP == open_clip / OpenAI CLIP through `mmlm convert`, on reference outputs written by open_clip itself.

The fixtures come from scripts/openclip_reference.py, run in a separate venv (open_clip needs torchvision,
which cannot sit beside this torch); see tests/fixtures/openclip/README.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmlm
from mmlm.cli import main
from mmlm.convert import from_open_clip, from_openai
from mmlm.convert.openai_clip import state_dict_to_openai

FIXTURES = Path(__file__).parent / "fixtures" / "openclip"
pytestmark = pytest.mark.usefixtures("kernel_mode")  # fast kernels and reference formulas


def _check(model, case: str):
    ref = load_file(str(FIXTURES / case / "reference.safetensors"))
    # A ResNet's float32 convolutions round differently with the algorithm oneDNN picks for the CPU at hand, and
    # the fast path folds each BatchNorm into its convolution, another rounding order. Both errors scale with the
    # features' magnitude (~30 here), so the ResNet's bound is relative to it: 2e-5 of the largest feature. Measured
    # worst cases: 8.5e-6 of it (fast path, AVX2 AMD EPYC), 3e-6 (reference path, same machine).
    image_tol = 2e-5 * ref["image_features"].abs().max().item() if case.endswith("rn") else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(ref["pixel_values"]), ref["image_features"], atol=image_tol, rtol=0)
        torch.testing.assert_close(model.encode_text(ref["input_ids"]), ref["text_features"], atol=1e-5, rtol=0)
        out = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"])
        torch.testing.assert_close(out.logits_per_image, ref["logits_per_image"], atol=1e-4 if case.endswith("rn") else 1e-5, rtol=0)  # features normalized first: measured 7e-6 on logits ~7.5
        if "image_tokens" in ref:
            torch.testing.assert_close(model.visual.forward_tokens(ref["pixel_values"]), ref["image_tokens"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["vit_quickgelu", "vit_gelu", "rn"])
def test_open_clip_state_dict(case, tmp_path):
    d = FIXTURES / case
    _check(from_open_clip(d / "state_dict.safetensors", d / "model_config.json"), case)
    # The CLI path writes an mmlm checkpoint that mmlm.load opens.
    assert main(["convert", "open_clip", str(d / "state_dict.safetensors"), "--config", str(d / "model_config.json"),
                 "--out", str(tmp_path / "ck")]) == 0
    _check(mmlm.load(tmp_path / "ck"), case)


@pytest.mark.parametrize("case", ["openai_vit", "openai_rn"])
def test_openai_state_dict_architecture_inferred_from_shapes(case, tmp_path):
    # A torch.save'd OpenAI state dict (fp16 weights, input_resolution/context_length/vocab_size entries),
    # read with weights_only=True; no config given.
    model = from_openai(FIXTURES / case / "openai_state_dict.pt")
    _check(model, case)
    assert main(["convert", "openai", str(FIXTURES / case / "openai_state_dict.pt"), "--out", str(tmp_path / "ck")]) == 0
    _check(mmlm.load(tmp_path / "ck"), case)


@pytest.mark.parametrize("case", ["vit_quickgelu", "rn"])
def test_back_to_openai_names_is_lossless(case):
    d = FIXTURES / case
    model = from_open_clip(d / "state_dict.safetensors", d / "model_config.json")
    original = load_file(str(d / "state_dict.safetensors"))
    back = state_dict_to_openai(model.state_dict(), model.config)
    assert back.keys() == original.keys()
    for k in original:
        torch.testing.assert_close(back[k], original[k], atol=0, rtol=0, msg=k)


def test_conversion_errors_name_the_problem(tmp_path):
    d = FIXTURES / "vit_quickgelu"
    sd = load_file(str(d / "state_dict.safetensors"))
    sd["visual.extra_thing"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="visual.extra_thing"):
        from_open_clip(tmp_path / "bad.safetensors", d / "model_config.json")
    assert main(["convert", "open_clip", str(tmp_path / "bad.safetensors"), "--config", str(d / "model_config.json"),
                 "--out", str(tmp_path / "x")]) == 2
    del sd["visual.extra_thing"], sd["ln_final.bias"]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['text.norm_final.bias'\]"):
        from_open_clip(tmp_path / "missing.safetensors", d / "model_config.json")
    with pytest.raises(ValueError, match="--config"):
        from_open_clip(d / "state_dict.safetensors", None)
