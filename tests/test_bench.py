"""Each `mmlm bench` measurement runs end to end at tiny sizes and reports what it should (no timings asserted:
the rates themselves are the benchmark's output, not a test)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # the benchmarks' peer; a dev dependency, so this skips only outside `make test`

from mmlm import bench_models  # noqa: E402  (part of mmlm: an import error here must fail, not skip)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL_CLIP = dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=16),
                  text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=32, vocab_size=49408),
                  projection_dim=32)
SMALL_LLAMA = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024)


def _by(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def test_clip_bench_rows_and_parity():
    rows = bench_models.bench_clip(quick=True, batch=4, precisions=("bf16",), emit=lambda r: None,
                                   hf_config=SMALL_CLIP, peak_size=128)
    parity = _by(rows, bench="clip_parity")[0]
    assert parity["image_max_abs_diff"] < 1e-4 and parity["text_max_abs_diff"] < 1e-4  # same weights, same numbers
    for what in ("clip_train", "image_embed", "text_embed"):
        libs = {r["library"] for r in _by(rows, bench=what)}
        assert libs == {"mmlm", "transformers", "mmlm/transformers"}, what
    ours = _by(rows, bench="clip_train", library="mmlm")[0]
    assert ours["per_s_median"] > 0 and 0 < ours["mfu"] and ours["step_gflop"] > 0.001


def test_clip_train_step_learns():
    """The benchmarked mmlm step is a real training step: repeated on one batch, the loss falls."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = bench_models.clip_pair(Path(tmp), hf_config=SMALL_CLIP)
    pixels, ids = bench_models.clip_batch(8, image_size=32)
    step_ours, _ = bench_models.train_steps(ours, hf, "fp32", lr=1e-3)
    losses = [float(step_ours(pixels, ids)) for _ in range(4)]
    assert losses[-1] < losses[0]


def test_clip_matrix_cells():
    """Every cell of the settings matrix times mmlm and both transformers attention settings on the same model."""
    rows = bench_models.bench_clip_matrix(acts=("gelu",), threads=(1,), precisions=("fp32",), optimizers=("foreach",),
                                          batch=4, repeats=1, hf_config=SMALL_CLIP, emit=lambda r: None)
    parity = _by(rows, bench="clip_matrix_parity")[0]
    assert parity["mmlm_act"] == "gelu" and parity["max_abs_diff"] < 1e-4
    cells = _by(rows, bench="clip_matrix")
    assert sorted((r["what"], r.get("captions")) for r in cells) == [
        ("image", None), ("text", "full"), ("text", "ragged"), ("train", "full"), ("train", "ragged")]
    for r in cells:
        assert r["mmlm_per_s"] > 0 and r["transformers-sdpa_per_s"] > 0 and r["transformers-eager_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["mmlm_per_s"] / r[f"{r['peer']}_per_s"], rel=0.02)
        assert 0 < r["mmlm_mflop"] <= r["transformers-eager_mflop"] and r["mmlm_mfu"] > 0
    _, ids = bench_models.clip_batch(4, full=True)
    assert (ids[:, -1] == 49407).all() and (ids > 0).all()  # full captions: EOT last, no padding


@pytest.mark.slow
def test_llava_bench_same_tokens():
    rows = bench_models.bench_llava(quick=True, batches=(2,), compile=False, emit=lambda r: None,
                                    text_config=SMALL_LLAMA)
    assert _by(rows, bench="llava_greedy_match")[0]["same_tokens"]
    assert {r["library"] for r in _by(rows, bench="llava_decode")} == {
        "mmlm", "transformers", "mmlm-int4", "mmlm/transformers", "mmlm-int4/transformers"}  # int4: the default extra
    acc = _by(rows, bench="quant_accuracy", library="mmlm-int4")[0]
    assert 0 <= acc["top1_agree"] <= 1 and acc["positions"] > 0 and acc["max_logit_err_rel"] < 1
    assert _by(rows, bench="llava_prefill", library="mmlm")[0]["prompt_tokens"] == 128


def test_data_bench_compares_with_the_train_step():
    rows = bench_models.bench_data(quick=True, batch=8, workers=(0,), train_images_per_s={"fp32": 1.0},
                                   emit=lambda r: None)
    default = [r for r in rows if r["default"]][0]
    assert default["images_per_s"] > 0 and default["vs_train_step"]["fp32"] == pytest.approx(default["images_per_s"], rel=0.01)


@pytest.mark.slow
def test_generation_bench_rows_and_parity():
    pytest.importorskip("diffusers")
    from mmlm.bench_generation import bench_generation

    rows = bench_generation(quick=True, batch=2, steps=2, emit=lambda r: None)
    for model in ("shapes", "tiny-sd"):
        assert _by(rows, bench="generation_parity", model=model)[0]["image_max_abs_diff"] < 1e-4  # same images
        assert {r["library"] for r in _by(rows, bench="generation", model=model)} == {"mmlm", "diffusers",
                                                                                     "mmlm/diffusers"}
        ratio = _by(rows, bench="generation", model=model, library="mmlm/diffusers")[0]
        assert ratio["ratio"] > 0 and ratio["target"] == 1.5
