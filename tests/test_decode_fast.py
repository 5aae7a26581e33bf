"""The decoding step: LM.decode_step (eager: over the filled cache slots; for torch.compile: static shapes
over the whole preallocated cache) equals a full forward; generate(compile=True) keeps finished rows in the batch and gives the same tokens; a failing
torch.compile falls back to the eager step with a warning. (torch.compile itself is exercised by
`mmlm bench decode`, not here: compiling takes a minute on a busy CPU.)"""

from __future__ import annotations

import pytest
import torch

from mmlm import generation
from mmlm.generation import generate
from mmlm.models.lm import LM, position_ids_from_mask
from test_generate import _left_pad, _model  # the same sharp tiny LM

@pytest.mark.parametrize("static", [False, True], ids=["int-slot", "tensor-slot"])
def test_decode_step_equals_full_forward(static):
    """Left-padded prefill, then 5 decode_steps over a 12-slot cache: each step's logits == the full forward's
    (an int slot attends over the filled slots; a tensor slot over the whole cache, empty slots masked)."""
    model = _model()
    ids, mask = _left_pad([[5, 6, 7, 8, 9], [11, 12]])
    new = torch.randint(3, 96, (2, 5))
    full_ids = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    T, total = ids.shape[1], 12
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask).logits  # (2, 10, V)
        cache = model.new_cache(2, total)
        model(ids, attention_mask=mask, cache=cache)
        key_mask = torch.zeros(2, total, dtype=torch.bool)
        key_mask[:, :T] = mask.bool()
        pos = position_ids_from_mask(full_mask)
        for j in range(new.shape[1]):
            key_mask[:, T + j] = True
            slot = torch.tensor([T + j]) if static else T + j
            got = model.decode_step(new[:, j : j + 1], pos[:, T + j : T + j + 1], key_mask, cache, slot)
            torch.testing.assert_close(got, full[:, T + j], atol=1e-5, rtol=0)


@pytest.fixture
def compile_as(monkeypatch):
    """Replace torch.compile (for generation's decode step) by `make(fn)`; the per-class cache starts empty."""
    def use(make):
        monkeypatch.setattr(generation, "_COMPILED", {})
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: make(fn))
    return use


def test_compiled_path_keeps_finished_rows_same_tokens(compile_as):
    compile_as(lambda fn: fn)  # the static-shape path, run eagerly
    model = _model(3)
    ids, mask = _left_pad([[1, 2, 3], [4, 5, 6, 7], [8, 9]])
    free = generate(model, ids, mask, max_new_tokens=10)
    eos = int(free[0, 2])
    streamed = {False: [], True: []}
    got = {compile: generate(model, ids, mask, max_new_tokens=10, eos_token_id=[eos], compile=compile,
                             stream=lambda row, t, c=compile: streamed[c].append((row, t)))
           for compile in (False, True)}
    assert got[True].tolist() == got[False].tolist()
    eager = got[False]
    assert (eager[0, 3:] == eos).all() and eager[0, :3].tolist() == free[0, :3].tolist()
    assert streamed[True] == streamed[False]


def test_failed_compile_falls_back_with_a_warning(compile_as):
    def broken(fn):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    compile_as(broken)
    model = _model(5)
    ids, mask = _left_pad([[1, 2, 3], [4, 5]])
    with pytest.warns(UserWarning, match="decoding eagerly.*no C\\+\\+ compiler"):
        got = generate(model, ids, mask, max_new_tokens=6, compile=True)
    assert got.tolist() == generate(model, ids, mask, max_new_tokens=6).tolist()
    assert generation._COMPILED[LM] is None  # not tried again
