"""Contrastive losses against direct formulas, and feature caching == one big batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmlm.config import clip_preset
from mmlm.models.clip import CLIP
from mmlm.train.feature_cache import contrastive_step
from mmlm.train.objectives import clip_loss, contrastive_loss, siglip_loss


def _feats(n=6, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, e, generator=g), dim=-1), F.normalize(torch.randn(n, e, generator=g), dim=-1))


def test_clip_loss_matches_the_definition():
    img, txt = _feats()
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.t()
    expected = 0
    for i in range(len(img)):  # written out sample by sample, as in the paper's pseudo-code
        expected += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    assert clip_loss(img, txt, scale).item() == pytest.approx((expected / (2 * len(img))).item(), rel=1e-6)


def test_local_rows_against_global_columns_equal_the_global_loss():
    img, txt = _feats(8)
    scale = torch.tensor(2.0)
    full = clip_loss(img, txt, scale)
    halves = [clip_loss(img[s], txt[s], scale, image_all=img, text_all=txt, offset=s.start) for s in (slice(0, 4), slice(4, 8))]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), rel=1e-6)


def test_siglip_loss_matches_the_definition():
    img, txt = _feats()
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-3.0)
    logits = 10.0 * img @ txt.t() - 3.0
    labels = 2 * torch.eye(len(img)) - 1
    expected = -F.logsigmoid(labels * logits).sum() / len(img)
    assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(expected.item(), rel=1e-6)
    half = [siglip_loss(img[s], txt[s], scale, bias, text_all=txt, offset=s.start) for s in (slice(0, 3), slice(3, 6))]
    assert (half[0] * 3 + half[1] * 3).item() / 6 == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss("siglip", img, txt, scale, None)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_feature_caching_equals_one_big_batch(kind):
    cfg = clip_preset("tiny-vit")
    cfg.logit_bias_init = -5.0 if kind == "siglip" else None
    torch.manual_seed(0)
    model = CLIP(cfg)
    g = torch.Generator().manual_seed(1)
    px = torch.randn(12, 3, 32, 32, generator=g)
    ids = torch.randint(1, 999, (12, 16), generator=g)
    ids[:, 7] = 999

    def loss_fn(i, t):
        return contrastive_loss(kind, i, t, model.logit_scale, model.logit_bias)

    big = contrastive_step(model, px, ids, loss_fn, micro_batch=0)
    g_big = _grads(model)
    model.zero_grad(set_to_none=True)
    cached = contrastive_step(model, px, ids, loss_fn, micro_batch=4)
    g_cached = _grads(model)
    assert cached.item() == pytest.approx(big.item(), rel=1e-6)
    assert g_big.keys() == g_cached.keys() and len(g_big) == len(list(model.parameters()))
    for name in g_big:  # equal up to float32 rounding, judged against each gradient's own scale
        err = (g_cached[name] - g_big[name]).abs().max().item()
        assert err <= 1e-5 * g_big[name].abs().max().item() + 1e-8, (name, err)
    # Plain accumulation would differ: the objective with 4-sample batches is a different loss.
    small = sum(loss_fn(model.encode_image(px[s]), model.encode_text(ids[s])).item() for s in (slice(0, 4), slice(4, 8), slice(8, 12))) / 3
    assert abs(small - big.item()) > 1e-3


def test_feature_caching_updates_batchnorm_stats_once():
    torch.manual_seed(0)
    model = CLIP(clip_preset("tiny-rn")).train()
    px = torch.randn(4, 3, 64, 64)
    ids = torch.full((4, 16), 5)
    ids[:, 3] = 999
    contrastive_step(model, px, ids, lambda i, t: contrastive_loss("clip", i, t, model.logit_scale), micro_batch=2)
    assert model.visual.bn1.num_batches_tracked.item() == 2  # two micro-batches, one pass each


def test_next_token_targets_equal_the_full_loss():
    """Logits computed only where a learned token is predicted give the same loss and gradients."""
    from mmlm.config import LMConfig
    from mmlm.models.lm import LM
    from mmlm.train.objectives import next_token_loss, next_token_targets

    torch.manual_seed(0)
    lm = LM(LMConfig(vocab_size=50, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64, max_seq_len=32))
    ids = torch.randint(0, 50, (3, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, :] = -100
    labels[1, 7:9] = ids[1, 7:9]
    labels[2, 10:] = -100
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    full = next_token_loss(lm(ids, attention_mask=mask).logits, labels)
    full.backward()
    grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    at, targets = next_token_targets(labels)
    assert at.sum() == targets.numel() == (labels[:, 1:] != -100).sum()
    part = torch.nn.functional.cross_entropy(lm(ids, attention_mask=mask, logits_at=at).logits, targets)
    part.backward()
    torch.testing.assert_close(part, full)
    for g, p in zip(grads, lm.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_reply_weights_give_each_reply_one_unit():
    """Replies are maximal runs of learned labels; one that ends a row and one that starts the next stay apart."""
    from mmlm.train.objectives import next_token_targets, reply_weights

    I = -100
    labels = torch.tensor([[I, I, 5, 6, 7, I, I, 8, 2, 3],   # two replies: 3 tokens, then 3 ending the row
                           [4, 9, 2, I, I, I, 4, 4, 4, 2]])  # position 0 is never a target; then 2 and 4 tokens
    _, targets = next_token_targets(labels)
    w = reply_weights(labels)
    assert w.shape == targets.shape
    assert w.tolist() == pytest.approx([1 / 3] * 3 + [1 / 3] * 3 + [1 / 2] * 2 + [1 / 4] * 4)
    assert float(w.sum()) == pytest.approx(4.0)
    # the same conversation, turns learned as before: token weighting is the plain mean, reply weighting is not
    ce = torch.arange(len(targets), dtype=torch.float)
    assert float((ce * w).sum() / w.sum()) != pytest.approx(float(ce.mean()))
