"""Activation checkpointing (models/checkpointing.py): the same loss and gradients as the plain step, fewer saved
activations, for both CLIP towers (ViT, text with and without packing, ModifiedResNet), the LM and LLaVA with LoRA;
composed with feature caching and FSDP2; `train.grad_checkpointing` in a recipe."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mmlm.config import LlavaConfig, LMConfig, ViTConfig, clip_preset
from mmlm.models.checkpointing import grad_checkpointing
from mmlm.models.clip import CLIP


def saved_bytes(fn) -> tuple[object, int]:
    """fn()'s result and the bytes of the tensors autograd saved for its backward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def _loss_and_grads(model, loss_fn) -> tuple[float, dict[str, torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    loss, saved = saved_bytes(lambda: loss_fn(model))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved


def assert_same_step(model, loss_fn, expected_blocks: int, tol: float = 1e-6) -> tuple[int, int]:
    """Plain step, then the checkpointed one on the same weights: equal loss and gradients (every parameter that
    had one), fewer saved bytes. Returns (plain, checkpointed) saved bytes."""
    loss, grads, plain = _loss_and_grads(model, loss_fn)
    assert grad_checkpointing(model) == expected_blocks
    loss_c, grads_c, ckpt = _loss_and_grads(model, loss_fn)
    grad_checkpointing(model, False)
    assert abs(loss - loss_c) <= tol, (loss, loss_c)
    assert grads.keys() == grads_c.keys() and grads
    worst = max((grads[k] - grads_c[k]).abs().max().item() for k in grads)
    assert worst <= tol, worst
    assert ckpt < plain, (ckpt, plain)
    return plain, ckpt


def _clip_loss(px, ids):
    from mmlm.train.objectives import contrastive_loss

    return lambda m: contrastive_loss("clip", m.encode_image(px), m.encode_text(ids), m.logit_scale, None, "local")


def _ids(n: int, T: int, eot: int, lengths: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(n, T, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, :L] = torch.randint(1, eot, (L,), generator=g)
        ids[i, L] = eot
    return ids


@pytest.mark.parametrize("short_captions", [False, True])  # True: the text tower's packed fast path
def test_clip_vit_and_text_towers_give_the_plain_gradients(short_captions):
    cfg = clip_preset("tiny-vit")
    torch.manual_seed(0)
    model = CLIP(cfg)
    T, eot = cfg.text.context_length, cfg.text.vocab_size - 1
    lengths = [3, 4, 2, 5, 3, 4] if short_captions else [T - 2, T - 3, T - 2, T - 4, T - 2, T - 3]
    px = torch.randn(6, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(1))
    blocks = cfg.vision.layers + cfg.text.layers
    assert_same_step(model, _clip_loss(px, _ids(6, T, eot, lengths)), blocks)


def test_resnet_tower_gives_the_plain_gradients_and_running_statistics():
    cfg = clip_preset("tiny-rn")
    torch.manual_seed(0)
    model = CLIP(cfg)
    with torch.no_grad():  # OpenAI's zero-initialised last BatchNorm of each block would hide the blocks' gradients
        for b in model.visual.modules():
            if hasattr(b, "bn3"):
                b.bn3.weight.fill_(1.0)
    T, eot = cfg.text.context_length, cfg.text.vocab_size - 1
    px = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(1))
    loss_fn = _clip_loss(px, _ids(4, T, eot, [5, 6, 7, 8]))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
    blocks = sum(cfg.vision.layers) + cfg.text.layers
    assert_same_step(model, loss_fn, blocks)
    after_two = {k: v.clone() for k, v in model.state_dict().items() if k in before}
    for k in before:  # buffers[k] moved once per step: running it twice from `before` the plain way gives the same
        model.state_dict()[k].copy_(before[k])
    model.zero_grad()
    loss_fn(model)
    loss_fn(model)
    for k, v in model.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, after_two[k], rtol=0, atol=1e-6)


def _lm_config(**kw) -> LMConfig:
    return LMConfig(vocab_size=64, width=32, layers=3, heads=4, kv_heads=2, mlp_dim=64, max_seq_len=64, **kw)


def test_lm_gives_the_plain_loss_and_gradients():
    from mmlm.models.lm import LM

    torch.manual_seed(0)
    lm = LM(_lm_config())
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a padded row: the masked attention path

    def loss_fn(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    assert_same_step(lm, loss_fn, 3)


def _llava(lora_rank: int = 4):
    from mmlm.models.llava import Llava

    cfg = LlavaConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4),
                      lm=_lm_config(eos_token_id=2), image_token_id=3, lora_rank=lora_rank)
    torch.manual_seed(0)
    model = Llava(cfg)
    with torch.no_grad():  # LoRA's B starts at zero: give the update a value so that every path is exercised
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.02)
    n_img = cfg.image_tokens
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.full((2, 1), 1), torch.full((2, n_img), 3), torch.randint(4, 64, (2, 10), generator=g)], 1)
    px = torch.randn(2, 3, 32, 32, generator=g)

    def loss_fn(m):
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits
        return torch.nn.functional.cross_entropy(logits[:, -11:-1].flatten(0, 1), ids[:, -10:].flatten())

    return model, loss_fn


def test_llava_with_lora_gives_the_plain_gradients():
    model, loss_fn = _llava()
    for name, p in model.named_parameters():  # stage 2 with LoRA: the projector and the LoRA updates learn
        p.requires_grad_(name.startswith("projector") or name.endswith(("lora_a", "lora_b")))
    assert_same_step(model, loss_fn, 2 + 3)


def test_feature_caching_with_checkpointing_gives_the_plain_gradients():
    from mmlm.train.feature_cache import contrastive_step
    from mmlm.train.objectives import contrastive_loss

    cfg = clip_preset("tiny-vit")
    torch.manual_seed(0)
    model = CLIP(cfg)
    T, eot = cfg.text.context_length, cfg.text.vocab_size - 1
    px = torch.randn(8, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(1))
    ids = _ids(8, T, eot, [3, 9, 4, 12, 5, 6, 7, 8])

    def step(micro: int):
        model.zero_grad(set_to_none=True)
        loss = contrastive_step(model, px, ids, lambda i, t: contrastive_loss("clip", i, t, model.logit_scale, None),
                                micro_batch=micro)
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step(4)  # feature caching alone (it equals the whole batch up to its own rounding)
    grad_checkpointing(model)
    loss_c, grads_c = step(4)
    assert abs(loss - loss_c) <= 1e-6
    assert max((grads[k] - grads_c[k]).abs().max().item() for k in grads) <= 1e-6


def test_fsdp2_sharded_llava_with_checkpointing_gives_the_plain_gradients(tmp_path):
    """FSDP2 units (a one-process group here: the same hooks and DTensor parameters as on many ranks)."""
    import torch.distributed as dist

    from mmlm.distributed import fully_shard_model

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        plain, loss_fn = _llava(lora_rank=0)
        loss = loss_fn(plain)
        loss.backward()
        want = {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}
        model, _ = _llava(lora_rank=0)
        fully_shard_model(model, model.lm.blocks)
        assert grad_checkpointing(model) == 5
        loss_c = loss_fn(model)
        loss_c.backward()
        got = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
               for n, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys() and any(".blocks." in k for k in got)
        assert abs(loss.item() - loss_c.item()) <= 1e-6
        assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    finally:
        dist.destroy_process_group()


def test_recipe_field_and_dotted_override():
    from mmlm.assets import recipe_path
    from mmlm.train.recipes import load_recipe

    assert load_recipe("clip", recipe_path("clip-shapes")).train.grad_checkpointing is False
    cfg = load_recipe("clip", recipe_path("clip-shapes"), ["train.grad_checkpointing=true"])
    assert cfg.train.grad_checkpointing is True
    assert load_recipe("llava", recipe_path("llava-shapes"), ["train.grad_checkpointing=true"]).train.grad_checkpointing
