"""Zero-shot and retrieval metrics against brute-force definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmlm.eval.retrieval import retrieval_metrics
from mmlm.eval.zeroshot import classification_metrics


def test_retrieval_matches_brute_force_and_is_chunk_independent():
    g = torch.Generator().manual_seed(0)
    n, per = 30, 3
    img = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    text_image = torch.arange(n).repeat_interleave(per)
    txt = F.normalize(img[text_image] + 0.9 * torch.randn(n * per, 8, generator=g), dim=-1)
    sims = img @ txt.t()
    expected = {}
    for k in (1, 5, 10):
        i2t = sum(any(j in sims[i].topk(k).indices.tolist() for j in range(i * per, (i + 1) * per)) for i in range(n)) / n
        t2i = sum(int(text_image[t]) in sims[:, t].topk(k).indices.tolist() for t in range(n * per)) / (n * per)
        expected[f"i2t_R@{k}"], expected[f"t2i_R@{k}"] = round(i2t, 4), round(t2i, 4)
    for chunk in (7, 1000):
        got = retrieval_metrics(img, txt, text_image, chunk=chunk)
        assert {k: got[k] for k in expected} == expected
    assert 0 < expected["i2t_R@1"] < 1  # the case is neither trivial nor hopeless


def test_classification_metrics():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 3, 2], [1, 0, 0.5]])
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, labels, ["a", "b", "c"])
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    assert m["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert m["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
