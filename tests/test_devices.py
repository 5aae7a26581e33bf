"""Devices on a CPU-only machine: resolving train.device / --device, autocast and fp16's gradient scaler in the
loop, batches moved, the kernels' GPU dispatch (simulated), and torch.compile's fallback to eager.

What needs a GPU itself is in tests/test_gpu.py (marked `gpu`, skipped without CUDA)."""

from __future__ import annotations

import functools
import importlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import mmlm
from mmlm import devices
from mmlm.config import LMConfig, clip_preset
from mmlm.models.clip import CLIP
from mmlm.models.lm import LM
from mmlm.train.loop import TrainConfig, train

# ----------------------------------------------------------------------------- resolving a device


def test_resolve_cpu_auto_and_a_clear_error_for_cuda_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve(None) == devices.resolve("cpu") == devices.resolve("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"train.device=cuda was asked for, but torch sees no CUDA device.*"
                                         r"use train.device=cpu or auto"):
        devices.resolve("cuda", "train.device")
    with pytest.raises(ValueError, match="--device='tpu' is not a device"):
        devices.resolve("tpu", "--device")
    with pytest.raises(ValueError, match="train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        TrainConfig(device="gpu")
    with pytest.raises(ValueError, match="train.precision must be one of fp32, bf16, fp16 or auto, got 'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="train.precision=fp16 does not combine with train.fsdp: use bf16"):
        TrainConfig(precision="fp16", fsdp=True)
    with pytest.raises(ValueError, match="torch sees no CUDA device"):  # mmlm.load's device follows the same rule
        from mmlm.weights import parse_device

        parse_device("cuda")


def test_cuda_under_torchrun_is_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.resolve("cuda") == devices.resolve("auto") == torch.device("cuda", 1)
    assert devices.resolve("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="train.device=cuda:2: torch sees 2 CUDA device"):
        devices.resolve("cuda:2", "train.device")


def test_auto_precision_is_bf16_only_where_the_device_has_it(monkeypatch):
    from mmlm.train.loop import TrainConfig

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
        assert devices.fast_bf16("cpu") is native
        assert devices.resolve_precision("auto", "cpu") == expected
        assert devices.Precision("auto", "cpu").precision == expected
        assert TrainConfig(precision="auto", device="cpu").precision == expected  # concrete from the start
        assert devices.resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice stays
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16, fp16 or auto, got 'bf8'"):
        devices.resolve_precision("bf8", "cpu", "--precision")


def test_precision_autocast_and_batches_moved():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with devices.Precision("fp32")():
        assert (x @ w).dtype == torch.float32
    with devices.Precision("bf16", "cpu")():
        assert (x @ w).dtype == torch.bfloat16
    assert devices.Precision("bf16").scaler is None and devices.Precision("fp16").scaler is not None
    batch = {"ids": torch.ones(2, 3), "images": [torch.zeros(1)], "batch_size": 2, "bad": [["a.png", "broken"]]}
    moved = devices.to_device(batch, torch.device("cpu"))
    assert moved["batch_size"] == 2 and moved["bad"] == [["a.png", "broken"]] and torch.equal(moved["ids"], batch["ids"])


# ----------------------------------------------------------------------------- fp16 with a gradient scaler


class _Regression:
    """A linear regression task whose backward goes through devices.backward (scaled under fp16)."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.x = torch.randn(64, 4)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    def train_dataset(self):
        return list(range(64))

    def collate(self, idx):
        return {"i": torch.tensor(idx), "batch_size": len(idx)}

    def step(self, batch, autocast):
        with autocast():
            pred = self.model(self.x[batch["i"]]).squeeze(-1)
        assert pred.dtype == (torch.float16 if getattr(autocast, "precision", "") == "fp16" else torch.float32)
        loss = ((pred.float() - self.y[batch["i"]]) ** 2).mean()
        devices.backward(loss, autocast)
        return {"loss": loss.item()}

    def after_optimizer_step(self):
        pass

    def evaluate(self):
        with torch.no_grad():
            return {"mse": ((self.model(self.x).squeeze(-1) - self.y) ** 2).mean().item()}

    def save_model(self, directory: Path, state_dict=None):
        directory.mkdir(parents=True, exist_ok=True)
        from mmlm.checkpoint import save_tensors

        save_tensors(directory / "model.safetensors", self.model.state_dict())


def _cfg(**kw):
    return TrainConfig(**{"steps": 60, "batch_size": 8, "lr": 0.3, "warmup_steps": 0, "weight_decay": 0.0,
                          "progress": False, "log_every": 1, "precision": "fp16", "device": "cpu", **kw})


def test_fp16_scaler_skips_overflowing_steps_learns_and_resumes_exactly(tmp_path):
    task = _Regression()
    before = task.evaluate()["mse"]
    summary = train(task, _cfg(ckpt_every=30, keep_last=5), tmp_path / "a")
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    overflows = [r for r in records if r.get("skipped") == "fp16 gradient overflow"]
    # 65536 x a gradient of ~2 overflows float16 (max 65504): the scaler halves its scale until it fits
    assert overflows and overflows[0]["loss_scale"] == 65536.0 and overflows[0]["step"] == 0
    assert [r["loss_scale"] for r in overflows] == [65536.0 / 2**i for i in range(len(overflows))]
    assert summary["bad_steps"] == 0 and summary["eval"]["mse"] < before / 10
    blob = torch.load(tmp_path / "a" / "checkpoints" / "step-00000030" / "trainer_state.pt", weights_only=True)
    assert blob["scaler"]["scale"] == 65536.0 / 2 ** len(overflows)

    # the same run resumed from step 30: the scaler goes on with its scale, so the weights end bit-identical
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000030", tmp_path / "b" / "checkpoints" / "step-00000030")
    resumed = _Regression()
    train(resumed, _cfg(ckpt_every=30, keep_last=5), tmp_path / "b")
    for p, q in zip(task.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_a_task_that_does_not_scale_its_loss_is_an_error_under_fp16(tmp_path):
    class Unscaled(_Regression):
        def step(self, batch, autocast):
            loss = ((self.model(self.x[batch["i"]]).squeeze(-1) - self.y[batch["i"]]) ** 2).mean()
            loss.backward()
            return {"loss": loss.item()}

    with pytest.raises(AssertionError, match="scaler.scale"):
        train(Unscaled(), _cfg(steps=2), tmp_path)


def test_contrastive_step_scales_once_and_feature_caching_agrees_under_fp16():
    """The fp16 loss is scaled once; the cached-feature backward then carries the scaled gradients: after
    unscaling, one pass and micro-batches give float32's gradients (to float16's rounding)."""
    from mmlm.train.feature_cache import contrastive_step
    from mmlm.train.objectives import contrastive_loss

    torch.manual_seed(0)
    model = CLIP(clip_preset("tiny-vit")).train()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(1, cfg.text.eot_token_id, (8, cfg.text.context_length), generator=g)
    ids[:, 6], ids[:, 7:] = cfg.text.eot_token_id, 0

    def loss_fn(img, txt):
        return contrastive_loss("clip", img, txt, model.logit_scale, model.logit_bias, "local")

    def grads(precision, micro):
        model.zero_grad(set_to_none=True)
        contrastive_step(model, pixels, ids, loss_fn, micro_batch=micro, autocast=precision)
        scale = precision.scaler.get_scale() if precision.scaler is not None else 1.0
        return torch.cat([p.grad.float().flatten() / scale for p in model.parameters() if p.grad is not None])

    fp32 = grads(devices.Precision("fp32"), 0)
    for micro in (0, 4):
        precision = devices.Precision("fp16", "cpu")
        precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # no overflow at this scale
        fp16 = grads(precision, micro)
        assert fp16.shape == fp32.shape and torch.isfinite(fp16).all()
        assert (fp16 - fp32).norm() < 0.03 * fp32.norm()  # a scale applied twice or never would be off by 1024x


# ----------------------------------------------------------------------------- the kernels' GPU dispatch

def _as_if_on_a_gpu(monkeypatch):
    """The kernels' device checks answer "not a CPU": the paths a CUDA tensor takes (SDPA while training,
    the fused RMSNorm, no row rounding), run here on CPU tensors."""
    for name in ("attention", "norms", "packing"):
        monkeypatch.setattr(importlib.import_module(f"mmlm.models.kernels.{name}"), "cpu_path", lambda x: False)


def _forward_backward(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    (out.float() * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("what", ["lm", "clip"])
def test_the_gpu_dispatch_gives_the_reference_outputs_and_gradients(what, monkeypatch):
    torch.manual_seed(0)
    if what == "lm":
        model = LM(LMConfig(vocab_size=128, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=56)).train()
        ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, :3] = 0

        def fn():
            return model(ids, attention_mask=mask).logits
    else:
        model = CLIP(clip_preset("tiny-vit")).train()
        px = torch.randn(4, 3, model.config.vision.image_size, model.config.vision.image_size)
        ids = torch.randint(1, model.config.text.eot_token_id, (4, model.config.text.context_length))
        ids[:, 5], ids[:, 6:] = model.config.text.eot_token_id, 0

        def fn():
            return model(pixel_values=px, input_ids=ids).logits_per_image
    with mmlm.reference_mode():
        ref, ref_grads = _forward_backward(model, fn)
    _as_if_on_a_gpu(monkeypatch)
    out, grads = _forward_backward(model, fn)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        scale = b.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(a / scale, b / scale, atol=1e-5, rtol=1e-4)


def test_models_import_nothing_device_specific():
    import subprocess
    import sys

    code = ("import sys, mmlm.models.clip, mmlm.models.llava, mmlm.models.lm, mmlm.devices; "
            "bad = [m for m in sys.modules if m.startswith(('triton', 'torch._inductor', 'torch._dynamo'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- train.device and train.compile

TINY = [
    "model.preset=tiny-vit", "model.vision.image_size=32", "model.vision.patch_size=8",
    "data.kind=shapes", "data.train_size=64", "data.eval_size=8",
    "tokenizer.vocab_size=600", "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=1",
    "train.log_every=1", "train.progress=false", "train.precision=fp32", "train.threads=1", "train.steps=3",
]


def _train_clip(out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    from mmlm.train.clip_run import train_clip
    from mmlm.train.recipes import load_recipe

    train_clip(load_recipe("clip", None, TINY + list(overrides)), out)
    return load_file(str(out / "final" / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_train_device_cpu_auto_and_a_compile_failure_all_train_the_same_weights(tmp_path, monkeypatch):
    cpu = _train_clip(tmp_path / "cpu", "train.device=cpu")
    _assert_same(cpu, _train_clip(tmp_path / "auto", "train.device=auto"))

    def no_compiler(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(devices, "compile_blocks", functools.partial(devices.compile_blocks, backend=no_compiler))
    with pytest.warns(RuntimeWarning, match="train.compile: torch.compile failed.*no C.. compiler here.*eager"):
        failed = _train_clip(tmp_path / "compile", "train.device=cpu", "train.compile=true")
    _assert_same(cpu, failed)
    importlib.import_module("torch._dynamo").reset()  # the next test compiles afresh


def test_an_error_that_is_not_the_compilers_is_raised_as_it_is():
    model = nn.Linear(2, 2)
    compiled = [model]

    def step():
        raise ValueError("a bad batch")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="a bad batch"):
            devices.step_with_fallback(step, model, compiled)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_compiled_training_run_follows_the_eager_one(tmp_path, monkeypatch, checkpointed):
    """Compiling through dynamo and AOTAutograd (backend aot_eager: no C++ compiler needed) keeps the losses, with
    activation checkpointing too (each block then compiled inside its checkpoint)."""
    dynamo = importlib.import_module("torch._dynamo")
    dynamo.reset()
    monkeypatch.setattr(devices, "compile_blocks", functools.partial(devices.compile_blocks, backend="aot_eager"))
    extra = [f"train.grad_checkpointing={str(checkpointed).lower()}", "train.device=cpu"]
    eager = _train_clip(tmp_path / "eager", *extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
        compiled = _train_clip(tmp_path / "compiled", *extra, "train.compile=true")
    assert dynamo.utils.counters["frames"]["ok"] > 0  # something was compiled
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-4, rtol=1e-3)
    dynamo.reset()  # the next test compiles afresh


def test_a_checkpointed_block_goes_back_to_its_own_forward_when_compiling_fails():
    from mmlm.models.checkpointing import grad_checkpointing

    model = CLIP(clip_preset("tiny-rn"))
    grad_checkpointing(model)
    before = {id(m): vars(m).get("forward") for m in model.modules()}
    compiled = devices.compile_blocks(model, backend="eager")
    assert compiled and all(vars(m)["forward"] is not before[id(m)] for m in compiled)
    devices.uncompile(compiled)
    assert all(vars(m).get("forward") is before[id(m)] and m._compiled_call_impl is None for m in compiled)


def test_commands_asked_for_cuda_without_it_say_so(monkeypatch, capsys, tmp_path):
    from mmlm.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mmlm.save(LM(LMConfig(vocab_size=64, width=16, layers=1, heads=2, mlp_dim=32)), tmp_path / "lm")
    assert main(["bench", "decode", "--quick", "--device", "cuda", "--model", "tiny"]) == 2
    assert "mmlm bench: error: --device=cuda was asked for, but torch sees no CUDA device" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "lm"), "--prompt", "hi", "--device", "cuda"]) == 2
    assert "device=cuda was asked for, but torch sees no CUDA device" in capsys.readouterr().err
