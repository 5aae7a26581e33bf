"""On a CUDA device: the models give their CPU outputs, training steps run (fp32, bf16, fp16 + scaler,
torch.compile), two processes over NCCL give one process's gradients, generation and the server answer.

Marked `gpu` and skipped without CUDA (`pytest -m gpu` on a GPU machine). The device-agnostic parts of the same
code (resolving devices, autocast, the gradient scaler, the kernels' GPU dispatch, compile's fallback) are
tested on the CPU in tests/test_devices.py.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmlm
from mmlm.config import LMConfig, clip_preset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matmuls and convolutions in full float32 (no TF32), so that CPU and CUDA agree to ~1e-5."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=atol, rtol=rtol)


def _on_cuda(model):
    return copy.deepcopy(model).cuda().eval()


# ----------------------------------------------------------------------------- parity: cuda vs cpu

@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_clip_on_cuda_gives_the_cpu_outputs(preset):
    from mmlm.models.clip import CLIP

    torch.manual_seed(0)
    cpu = CLIP(clip_preset(preset)).eval()
    gpu = _on_cuda(cpu)
    cfg = cpu.config
    g = torch.Generator().manual_seed(0)
    px = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(1, cfg.text.eot_token_id, (4, cfg.text.context_length), generator=g)
    ids[:, 7], ids[:, 8:] = cfg.text.eot_token_id, 0
    with torch.no_grad():
        _close(gpu.encode_image(px.cuda()), cpu.encode_image(px))
        _close(gpu.encode_text(ids.cuda()), cpu.encode_text(ids))
        _close(gpu(pixel_values=px.cuda(), input_ids=ids.cuda()).logits_per_image,
               cpu(pixel_values=px, input_ids=ids).logits_per_image, atol=1e-3)


def _lm():
    from mmlm.models.lm import LM

    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=256, width=64, layers=2, heads=4, kv_heads=2, mlp_dim=128, max_seq_len=128)).eval()


def test_lm_on_cuda_gives_the_cpu_logits_and_greedy_tokens():
    cpu = _lm()
    gpu = _on_cuda(cpu)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        _close(gpu(ids.cuda(), attention_mask=mask.cuda()).logits, cpu(ids, attention_mask=mask).logits)
    # generate takes CPU inputs and runs where the model is
    new_gpu = mmlm.generate(gpu, ids, attention_mask=mask, max_new_tokens=16)
    assert new_gpu.device.type == "cuda"
    assert torch.equal(new_gpu.cpu(), mmlm.generate(cpu, ids, attention_mask=mask, max_new_tokens=16))


def _llava(vocab_size: int = 128, image_token_id: int = 127):
    from mmlm.config import LlavaConfig, ViTConfig
    from mmlm.models.llava import Llava

    torch.manual_seed(0)
    cfg = LlavaConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4),
                      lm=LMConfig(vocab_size=vocab_size, width=48, layers=2, heads=4, kv_heads=2, mlp_dim=96,
                                  max_seq_len=512),
                      image_token_id=image_token_id)
    return Llava(cfg).eval()


def test_llava_on_cuda_gives_the_cpu_logits_and_answers():
    cpu = _llava()
    gpu = _on_cuda(cpu)
    n = cpu.config.image_tokens
    ids = torch.randint(0, 120, (2, n + 6), generator=torch.Generator().manual_seed(0))
    ids[:, 2:2 + n] = 127
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(gpu(ids.cuda(), pixel_values=px.cuda()).logits, cpu(ids, pixel_values=px).logits)
    assert torch.equal(mmlm.generate(gpu, ids, pixel_values=px, max_new_tokens=8).cpu(),
                       mmlm.generate(cpu, ids, pixel_values=px, max_new_tokens=8))


def test_load_onto_cuda_in_bf16(tmp_path):
    mmlm.save(_lm(), tmp_path / "lm")
    m = mmlm.load(tmp_path / "lm", dtype="bf16", device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in m.parameters())


# ----------------------------------------------------------------------------- training on cuda

TINY = [
    "model.preset=tiny-vit", "model.vision.image_size=32", "model.vision.patch_size=8",
    "data.kind=shapes", "data.train_size=64", "data.eval_size=8",
    "tokenizer.vocab_size=600", "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=1",
    "train.log_every=1", "train.progress=false", "train.steps=4",
]


def _clip_losses(out: Path, *overrides: str) -> list[float]:
    from mmlm.train.clip_run import train_clip
    from mmlm.train.recipes import load_recipe

    train_clip(load_recipe("clip", None, TINY + list(overrides)), out)
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "skipped" not in r]


def test_clip_training_on_cuda_follows_the_cpu_run(tmp_path):
    cpu = _clip_losses(tmp_path / "cpu", "train.device=cpu", "train.precision=fp32")
    gpu = _clip_losses(tmp_path / "gpu", "train.device=cuda", "train.precision=fp32")
    assert len(gpu) == len(cpu) == 4
    assert max(abs(a - b) for a, b in zip(gpu, cpu)) < 5e-3  # Adam turns rounding into small steps
    model = mmlm.load(tmp_path / "gpu" / "final")  # the checkpoint opens anywhere
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_clip_training_on_cuda_in_mixed_precision(tmp_path, precision):
    fp32 = _clip_losses(tmp_path / "fp32", "train.device=cuda", "train.precision=fp32")
    mixed = _clip_losses(tmp_path / precision, "train.device=cuda", f"train.precision={precision}")
    assert all(map(torch.isfinite, map(torch.tensor, mixed))) and abs(mixed[0] - fp32[0]) < 0.05


@pytest.mark.parametrize("checkpointed", ["false", "true"])
def test_compiled_clip_training_on_cuda(tmp_path, checkpointed):
    """Compiled with inductor where triton works; otherwise the warning and the eager run: the same losses."""
    common = ["train.device=cuda", "train.precision=fp32", f"train.grad_checkpointing={checkpointed}"]
    eager = _clip_losses(tmp_path / "eager", *common)
    compiled = _clip_losses(tmp_path / "compiled", *common, "train.compile=true")
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-3
    import importlib

    importlib.import_module("torch._dynamo").reset()


def test_llava_training_step_on_cuda(tmp_path):
    from mmlm.data.sources import ShapesConversations
    from mmlm.data.transforms import PreprocessConfig
    from mmlm.tokenizer import Tokenizer
    from mmlm.train.llava_task import LlavaRunConfig, LlavaTask
    from mmlm.train.loop import TrainConfig, train

    data = ShapesConversations("train", 32, seed=0, image_size=32, n_questions=2)
    texts = [t["value"] for i in range(32) for t in data[i]["conversations"]] + ["USER: ASSISTANT:"]
    tok = Tokenizer.train_byte_level(texts, vocab_size=320, special_tokens=["<s>", "</s>", "<image>"])
    model = _llava(tok.vocab_size, tok.tokenizer.token_to_id("<image>"))
    run = LlavaRunConfig(model=model.config, stage=2, max_len=512,
                         train=TrainConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=1, progress=False, log_every=1,
                                           device="cuda", precision="bf16"))
    task = LlavaTask(run, model, tok, data, PreprocessConfig(image_size=32, mode="pad_square"))
    summary = train(task, run.train, tmp_path)
    assert summary["step"] == 3 and summary["bad_steps"] == 0
    assert next(task.model.parameters()).device.type == "cuda"


# ----------------------------------------------------------------------------- two processes over NCCL

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clip_step(device: torch.device, rows: slice) -> dict[str, torch.Tensor]:
    from mmlm import devices, distributed
    from mmlm.models.clip import CLIP
    from mmlm.train.clip_task import ClipRunConfig, ClipTask
    from mmlm.train.loop import TrainConfig

    cfg = clip_preset("tiny-vit")
    torch.manual_seed(0)
    model = CLIP(cfg).double().to(device)  # float64: what differs is the maths, not float32 rounding
    task = ClipTask(ClipRunConfig(model=cfg, train=TrainConfig(device=device.type)), model, None, None, None)
    g = torch.Generator().manual_seed(1)
    px = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 999, (8, 16), generator=g)
    ids[:, 9] = 999
    batch = devices.to_device({"pixel_values": px[rows], "input_ids": ids[rows], "batch_size": rows.stop - rows.start},
                              device)
    task.step(batch, devices.Precision("fp32", device))
    distributed.average_gradients([p for p in model.parameters() if p.requires_grad])  # NCCL: CUDA tensors
    return {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


def _nccl_worker(rank: int, port: int, out: str) -> None:
    from mmlm import devices, distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    distributed.setup(timeout_s=120)
    try:
        device = devices.resolve("cuda", "train.device")
        assert device == torch.device("cuda", rank)
        torch.save(_clip_step(device, slice(rank * 4, rank * 4 + 4)), Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_processes_over_nccl_give_one_process_gradients(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_nccl_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("NCCL workers still running after 300 s")
    one = _clip_step(torch.device("cuda", 0), slice(0, 8))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == one.keys()
        assert max((got[k] - one[k]).abs().max().item() for k in one) < 1e-10


# ----------------------------------------------------------------------------- serving on cuda

def test_server_on_cuda_answers_chat_embeddings_and_classify(tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from serve_helpers import data_uri, png_bytes, running

    from mmlm.serve import ServeConfig, create_app
    from mmlm.serve.tiny import tiny_clip, tiny_llava

    llava_dir, clip_dir = tiny_llava(tmp_path / "llava"), tiny_clip(tmp_path / "clip")
    image = data_uri(png_bytes())
    for batching in ("continuous", "static"):
        config = ServeConfig(batching=batching)
        config.device = "cuda"
        app = create_app(llava_dir, config)
        assert next(app.state.service.model.parameters()).device.type == "cuda"
        with running(app) as url:
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                          {"type": "text", "text": "what is it?"}]}],
                "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] is not None
    config = ServeConfig()
    config.device = "cuda"
    app = create_app(clip_dir, config)
    cpu = mmlm.load(clip_dir)
    with running(app) as url:
        r = httpx.post(url + "/v1/embeddings", timeout=60,
                       json={"input": ["a red circle", image], "encoding_format": "float"})
        assert r.status_code == 200, r.text
        vectors = torch.tensor([d["embedding"] for d in r.json()["data"]])
        svc = app.state.service
        with torch.no_grad():
            ref = F.normalize(cpu.encode_text(svc.tokenizer(["a red circle"], context_length=16)), dim=-1)[0]
        _close(vectors[0], ref, atol=1e-4)
        r = httpx.post(url + "/v1/classify", timeout=60, json={"image": image, "labels": ["circle", "star"]})
        assert r.status_code == 200, r.text
        assert abs(sum(d["probability"] for d in r.json()["data"]) - 1) < 1e-4
