"""mmlm.load(path, dtype=, device=): the model built on the meta device, each tensor streamed from memory-mapped
(sharded) safetensors straight into its final dtype and device, fused tensors filled in place, strictly.

The peak-memory tests load in a fresh subprocess and read the kernel's own counters (`mmlm.bench_common.load_peak`):
VmHWM, the highest resident set size, is reset (`5` written to /proc/self/clear_refs) after torch and mmlm are
imported, and the figure is VmHWM after the load minus VmRSS just before it. Resident set size counts the
model's tensors, every temporary and every page of the memory-mapped files the process holds at that moment, so
the figure is what a machine needs free to load the model. The fixed cost of importing torch and mmlm is left
out; it does not grow with the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmlm
from mmlm.bench_common import load_peak
from mmlm.checkpoint import build_model, build_on_meta
from mmlm.config import CLIPConfig, LlavaConfig, LMConfig, ModifiedResNetConfig, TextConfig, ViTConfig
from mmlm.models.lm import position_ids_from_mask

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")

def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in ([path] if path.is_file() else path.glob("*.safetensors")))


# ----------------------------------------------------------------------------- every model builds on meta

def _lm_cfg(**kw) -> LMConfig:
    return LMConfig(**{**dict(vocab_size=96, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48, max_seq_len=64,
                              rope_scaling={"rope_type": "linear", "factor": 2.0}), **kw})


MODELS = {
    "clip_vit": lambda: CLIPConfig(embed_dim=16, vision=ViTConfig(image_size=16, patch_size=8, width=32, layers=2, heads=4),
                                   text=TextConfig(vocab_size=64, eot_token_id=63, context_length=8, width=32, layers=1,
                                                   heads=4, mlp_dim=48)),
    "clip_resnet": lambda: CLIPConfig(embed_dim=16, vision=ModifiedResNetConfig(image_size=32, layers=(1, 1, 1, 1), width=8,
                                                                                heads=2),
                                      text=TextConfig(vocab_size=64, eot_token_id=63, context_length=8, width=16,
                                                      layers=1, heads=2, mlp_dim=32)),
    "lm_tied": lambda: _lm_cfg(tie_embeddings=True, qkv_bias=True),
    "llava_lora_posembed": lambda: LlavaConfig(vision=ViTConfig(image_size=16, patch_size=8, width=32, layers=2, heads=4),
                                               lm=_lm_cfg(), image_token_id=90, lora_rank=4, image_pos_embed=True),
    "llava_resnet": lambda: LlavaConfig(vision=ModifiedResNetConfig(image_size=32, layers=(1, 1, 1, 1), width=8),
                                        lm=_lm_cfg(tie_embeddings=True), image_token_id=90),
}


def _real_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(MODELS[name]())
    with torch.no_grad():  # no parameter left at its init constant (ones, zeros): a wrong copy cannot pass
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    for m in model.modules():  # BatchNorm statistics away from their init too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_on_the_meta_device(name):
    """Shapes only: every parameter and saved buffer on meta; the buffers that follow from the config are real."""
    real, meta = _real_model(name), build_on_meta(MODELS[name]())
    saved = meta.state_dict(keep_vars=True)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert all(v.is_meta for v in saved.values())
    computed = {k: b for k, b in meta.named_buffers() if k not in saved}
    real_buffers = dict(real.named_buffers())
    for k, b in computed.items():
        assert not b.is_meta and torch.equal(b, real_buffers[k]), k


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checkpoint_loads_exactly_in_each_dtype(name, dtype, tmp_path):
    model = _real_model(name)
    mmlm.save(model, tmp_path / "ckpt")
    loaded = mmlm.load(tmp_path / "ckpt", dtype=dtype)
    assert not loaded.training and type(loaded) is type(model)
    ref, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k].dtype == (dtype if v.is_floating_point() else v.dtype), k
        assert torch.equal(got[k], v.to(got[k].dtype)), k
    # buffers computed from the config stay float32 (as transformers keeps RoPE's inv_freq)
    for k, b in loaded.named_buffers():
        if k not in got:
            assert b.dtype == torch.float32 and torch.equal(b, dict(model.named_buffers())[k])
    assert all(p.requires_grad for p in loaded.parameters())
    lm = getattr(loaded, "lm", loaded)
    if isinstance(getattr(lm, "config", None), LMConfig) and lm.config.tie_embeddings:
        assert lm.lm_head.weight is lm.embed.weight  # tied weights stay one parameter
    assert len({id(p) for p in loaded.parameters()}) == len(list(loaded.parameters()))


def test_float32_default_gives_the_same_outputs(tmp_path):
    model = _real_model("llava_lora_posembed")
    mmlm.save(model, tmp_path / "ckpt")
    loaded = mmlm.load(tmp_path / "ckpt")
    assert next(loaded.parameters()).dtype == torch.float32 and next(loaded.parameters()).device.type == "cpu"
    ids = torch.tensor([[1, 2] + [90] * loaded.config.image_tokens + [3, 4]])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits,
                                   atol=0, rtol=0)


def test_meta_device_load_reads_no_weights(tmp_path):
    """device="meta": the architecture with shapes and dtypes, no memory (nothing is read from the file)."""
    mmlm.save(_real_model("lm_tied"), tmp_path / "ckpt")
    m = mmlm.load(tmp_path / "ckpt", dtype="bf16", device="meta")
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in m.parameters())
    assert all(b.is_meta for b in m.buffers())
    assert m.lm_head.weight is m.embed.weight


# ----------------------------------------------------------------------------- strict, clear errors

def test_missing_unexpected_and_mis_shaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    mmlm.save(_real_model("lm_tied"), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    sd = load_file(weights)
    save_file({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"} | {"extra.weight": torch.ones(2)}, weights)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['blocks.1.mlp.fc2.weight'\].*unexpected tensor\(s\) "
                                         r"\['extra.weight'\]"):
        mmlm.load(tmp_path / "ckpt")
    save_file(sd | {"norm.weight": torch.ones(5)}, weights)
    with pytest.raises(ValueError, match=r"mis-shaped tensor\(s\) \['norm.weight: file \(5,\) vs model \(32,\)'\]"):
        mmlm.load(tmp_path / "ckpt", dtype=torch.bfloat16)


def test_damaged_file_and_bad_arguments_are_clear_errors(tmp_path):
    mmlm.save(_real_model("lm_tied"), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="bad data offsets.*damaged or truncated"):
        mmlm.load(tmp_path / "ckpt")
    weights.write_bytes(b"\x05")
    with pytest.raises(ValueError, match="not a safetensors file"):
        mmlm.load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        mmlm.load(tmp_path / "ckpt", dtype="int8")
    with pytest.raises(ValueError, match="torch.float64 is not supported"):
        mmlm.load(tmp_path / "ckpt", dtype=torch.float64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            mmlm.load(tmp_path / "ckpt", device="cuda")


# ----------------------------------------------------------------------------- the commands' --dtype / --device

def test_chat_and_eval_load_in_the_dtype_asked_for(tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    import mmlm.formats
    from mmlm.cli import main
    from mmlm.serve.tiny import tiny_clip, tiny_llava

    llava, clip = tiny_llava(tmp_path / "llava"), tiny_clip(tmp_path / "clip")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    loaded = []
    real_load = mmlm.formats.load

    def spy(path, dtype=None, device=None):
        model = real_load(path, dtype=dtype, device=device)
        loaded.append((next(model.parameters()).dtype, next(model.parameters()).device.type))
        return model

    monkeypatch.setattr(mmlm.formats, "load", spy)
    monkeypatch.setattr("mmlm.eval.cli.load", spy)
    assert main(["chat", "--model", str(llava), "--image", str(tmp_path / "img.png"), "--prompt", "what shape is it",
                 "--max-new-tokens", "4", "--dtype", "bf16", "--device", "cpu"]) == 0
    assert main(["eval", "zeroshot", "--model", str(clip), "--data", "shapes", "--limit", "8", "--dtype", "float16"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 8
    assert main(["eval", "vqa", "--model", str(llava), "--data", "shapes", "--limit", "2", "--dtype", "bfloat16"]) == 0
    assert loaded == [(torch.bfloat16, "cpu"), (torch.float16, "cpu"), (torch.bfloat16, "cpu")]
    with pytest.raises(SystemExit):
        main(["chat", "--model", str(llava), "--dtype", "int8"])


# ----------------------------------------------------------------------------- transformers directories

transformers = pytest.importorskip("transformers")


def _hf_llama(**kw):
    cfg = transformers.LlamaConfig(**{**dict(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                             tie_word_embeddings=False), **kw})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_fused_tensors_are_filled_in_place_without_concatenating(tmp_path, monkeypatch):
    """q/k/v and gate/up are copied from the file into their rows of the fused tensor: no torch.cat on the way."""
    hf = _hf_llama(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, attention_bias=True)
    hf.save_pretrained(tmp_path / "hf")

    def no_cat(*args, **kwargs):
        raise AssertionError("a load concatenated tensors")

    monkeypatch.setattr(torch, "cat", no_cat)
    ours = mmlm.load(tmp_path / "hf", dtype=torch.bfloat16)
    monkeypatch.undo()
    p = hf.model.layers[1].self_attn
    want = torch.cat([p.q_proj.weight, p.k_proj.weight, p.v_proj.weight]).to(torch.bfloat16)
    assert torch.equal(ours.blocks[1].attn.qkv.weight, want)
    want = torch.cat([p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]).to(torch.bfloat16)
    assert torch.equal(ours.blocks[1].attn.qkv.bias, want)


def _bf16_logits_close(got: torch.Tensor, hf_bf16: torch.Tensor, hf_fp32: torch.Tensor) -> float:
    """bf16 tolerance: ours within 2x transformers' own bf16 rounding (its bf16 vs float32 logits), or 1% of the
    logits' scale, of transformers' bf16 logits."""
    err, own = (got.float() - hf_bf16.float()).abs().max().item(), (hf_bf16.float() - hf_fp32).abs().max().item()
    assert err <= max(2 * own, 0.01 * hf_fp32.abs().max().item()), (err, own)
    return err


@pytest.mark.slow  # builds a model with transformers, saves it in shards, loads it in a subprocess
@needs_proc
def test_hf_llama_bf16_shards_load_at_low_peak_and_match_transformers(tmp_path):
    """A ~71 M-parameter Llama saved by transformers as bf16 in 5 shards (136 MB): mmlm.load(dtype=bf16) peaks at
    <= 1.25x the files' size over the resident set before the load, and gives transformers' bf16 logits."""
    hf = _hf_llama().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="30MB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) >= 4
    ours = mmlm.load(tmp_path / "hf", dtype=torch.bfloat16)
    mmlm.save(ours, tmp_path / "mmlm")  # mmlm's own format: one unsharded bf16 file

    size = file_bytes(tmp_path / "hf")
    hf_bf16, mmlm_bf16, hf_fp32 = load_peak((tmp_path / "hf", "bf16"), (tmp_path / "mmlm", "bf16"),
                                            (tmp_path / "hf", "float32"))
    for r in (hf_bf16, mmlm_bf16):
        print(f"{r['path']} {r['dtype']}: peak +{r['peak'] / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of files "
              f"({r['peak'] / size:.2f}x) in {r['seconds']:.2f} s")
        assert r["dtypes"] == ["torch.bfloat16"] and r["weights"] <= size
        assert r["peak"] <= 1.25 * size
    # float32 from bf16 files: the model is twice the files; still no second copy
    assert hf_fp32["dtypes"] == ["torch.float32"] and hf_fp32["peak"] <= 1.25 * hf_fp32["weights"]

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        ref32 = hf.float()(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    real = mask.bool()
    assert got.dtype == torch.bfloat16
    _bf16_logits_close(got[real], ref[real], ref32[real])
    again = mmlm.load(tmp_path / "mmlm", dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, got)


IMAGE_ID = 250


def _hf_llava():
    vision = transformers.CLIPVisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                           num_attention_heads=8, image_size=56, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.slow  # builds a model with transformers, saves it in shards, loads it in a subprocess
@needs_proc
def test_hf_llava_bf16_shards_load_at_low_peak_and_match_transformers(tmp_path):
    """A ~63 M-parameter LLaVA (CLIP ViT tower, projector, Llama) saved by transformers as bf16 shards."""
    hf = _hf_llava().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="30MB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) >= 4
    size = file_bytes(tmp_path / "hf")
    (r,) = load_peak((tmp_path / "hf", "bf16"))
    print(f"LLaVA bf16: peak +{r['peak'] / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of files "
          f"({r['peak'] / size:.2f}x) in {r['seconds']:.2f} s")
    assert r["dtypes"] == ["torch.bfloat16"] and r["peak"] <= 1.25 * size

    ours = mmlm.load(tmp_path / "hf", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    n = ours.config.image_tokens  # 16 patches, CLS dropped
    ids = torch.tensor([[5, 6] + [IMAGE_ID] * n + [7, 8, 9], [0, 0, 0] + [10] + [IMAGE_ID] * n + [11]])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pixels = torch.randn(2, 3, 56, 56, generator=g)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, pixel_values=pixels.to(torch.bfloat16)).logits
        ref = hf(**kw, pixel_values=pixels.to(torch.bfloat16)).logits
        ref32 = hf.float()(**kw, pixel_values=pixels).logits
    real = mask.bool()
    _bf16_logits_close(got[real], ref[real], ref32[real])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_straight_onto_cuda_equals_cpu(tmp_path):
    hf = _hf_llama(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    cpu = mmlm.load(tmp_path / "hf", dtype=torch.bfloat16)
    gpu = mmlm.load(tmp_path / "hf", dtype=torch.bfloat16, device="cuda")
    assert all(t.device.type == "cuda" for t in [*gpu.parameters(), *gpu.buffers()])
    for k, v in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[k].cpu(), v), k
