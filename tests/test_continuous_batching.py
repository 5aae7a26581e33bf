"""Continuous batching: rows join and leave a running `DecodeBatch` at every step and answer exactly as
`generate` alone; the server's continuous worker (the default) serves the same answers, and a cancelled,
disconnected or timed-out row leaves at the next step."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch

import mmlm
from mmlm.chat import end_token_ids
from mmlm.config import LMConfig
from mmlm.generation import DecodeBatch, DecodeRow, generate
from mmlm.models.lm import LM
from mmlm.serve.tiny import tiny_llava

CFG = dict(vocab_size=96, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48, max_seq_len=64, qkv_bias=True)


def _lm(seed: int = 0) -> LM:
    torch.manual_seed(seed)
    model = LM(LMConfig(**CFG)).eval()
    with torch.no_grad():  # a sharper random model: greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    return model


def _alone(model, row: DecodeRow, eos: set[int]) -> list[int]:
    """`generate` for one row, cut after its first EOS id (a `DecodeRow` keeps the EOS that ended it)."""
    out = generate(model, torch.tensor([row.input_ids]), pixel_values=row.pixel_values, videos=row.videos,
                   audios=row.audios, max_new_tokens=row.max_new_tokens, temperature=row.temperature, top_p=row.top_p, seed=row.seed,
                   eos_token_id=sorted(eos))[0].tolist()
    ends = [i for i, t in enumerate(out) if t in eos]
    return out[: ends[0] + 1] if ends else out


def _run(batch: DecodeBatch, rows: list[DecodeRow], per_step: int) -> int:
    """Admit waiting rows (at most `per_step` a step, in order, when they fit) and step until all are done."""
    waiting, steps = list(rows), 0
    while waiting or batch.rows:
        group = []
        while waiting and len(group) < per_step and batch.can_join([*group, waiting[0]]):
            group.append(waiting.pop(0))
        if group:
            batch.join(group)
        batch.step()
        steps += 1
    return steps


def test_rows_joining_and_leaving_at_every_step_answer_as_generate_alone(monkeypatch):
    """20 prompts of 1-11 tokens asking for 1-29 tokens, an EOS id, 5 pool rows, newcomers every step: each
    row's greedy tokens equal `generate`'s for it alone, and the pool was rearranged on the way."""
    model, rng, eos = _lm(1), random.Random(0), {7}
    rows = [DecodeRow([rng.randrange(1, 96) for _ in range(rng.randrange(1, 12))], rng.randrange(1, 30))
            for _ in range(20)]
    expected = [_alone(model, r, eos) for r in rows]
    arranged = []
    batch = DecodeBatch(model, max_rows=5, eos_token_id=7, max_len=80)
    arrange = batch._arrange
    monkeypatch.setattr(batch, "_arrange", lambda col, length: (arranged.append((col, length)), arrange(col, length)))
    steps = _run(batch, rows, per_step=2)
    assert [r.tokens for r in rows] == expected
    assert all(r.finish == ("stop" if r.tokens[-1] == 7 else "length") for r in rows)
    assert any(t[-1] == 7 for t in expected) and any(len(t) == r.max_new_tokens for t, r in zip(expected, rows))
    assert steps < sum(map(len, expected)) / 2  # rows ran together
    assert len(arranged) > 2 and batch.key_mask.shape[1] <= 80  # grown, shifted back, never past max_len


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


def test_llava_rows_with_images_and_seeded_sampling_answer_as_generate_alone(llava_dir):
    """LLaVA rows with and without an image join a running batch together (one prefill reads their images);
    greedy rows equal `generate` alone, and a seeded sampling row equals `generate(seed=...)` alone."""
    model = mmlm.load(llava_dir)
    image_token, eos = model.config.image_token_id, set(model.config.eos_token_id)
    rng, rows = random.Random(0), []
    for i in range(12):
        text = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 12))]
        image = i % 3 != 0
        ids = [1] + [image_token] * 16 * image + text
        pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) if image else None
        sampled = dict(temperature=0.8, top_p=0.9, seed=i) if i % 2 else {}
        rows.append(DecodeRow(ids, rng.randrange(2, 40), pixels, **sampled))
    expected = [_alone(model, r, eos) for r in rows]
    _run(DecodeBatch(model, max_rows=6), rows, per_step=3)
    assert [r.tokens for r in rows] == expected
    assert len({len(t) for t in expected}) > 3  # answers of many lengths: rows left at different steps


def test_flamingo_rows_keep_their_own_media_and_answer_as_generate_alone(tmp_path):
    """A Flamingo connector's rows (no media, an image, a clip and its sound, two images) join a running batch in
    groups and leave at different steps: each row reads its own media's keys and values, padded to the batch's
    most latents and restacked as rows come and go, and answers exactly as `generate` alone."""
    model = mmlm.load(tiny_llava(tmp_path / "flamingo", media=True, connector="flamingo"))
    mc, eos = model.config, set(model.config.eos_token_id)
    g = torch.Generator().manual_seed(0)
    rng, rows = random.Random(1), []
    for i in range(10):
        text = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 10))]
        kind = i % 4
        ids, media = [1], {}
        if kind in (1, 3):
            n = 1 if kind == 1 else 2
            ids += [mc.image_token_id] * n
            media["pixel_values"] = torch.randn(n, 3, 32, 32, generator=g)
        if kind == 2:
            ids += [mc.video_token_id, mc.audio_token_id]
            media["videos"] = torch.randn(1, mc.video_frames, 3, 32, 32, generator=g)
            media["audios"] = torch.randn(1, mc.audio.max_length, mc.audio.num_mel_bins, generator=g)
        rows.append(DecodeRow(ids + text, rng.randrange(2, 30), **media))
    expected = [_alone(model, r, eos) for r in rows]
    batch = DecodeBatch(model, max_rows=4)
    _run(batch, rows, per_step=2)
    assert [r.tokens for r in rows] == expected
    assert len({len(t) for t in expected}) > 3
    # a row without media sees none of its batchmates' (its mask is all False, or it never had media beside it)
    assert all(r.media_mask is None or not r.media_mask.any() for r in rows[0::4])
    assert all(r.media_mask.any() for r in rows[1::4])
    # the media matter: the same prompts without them answer otherwise
    has = [r.pixel_values is not None or r.videos is not None for r in rows]
    media_ids = {mc.image_token_id, mc.video_token_id, mc.audio_token_id}
    bare = [_alone(model, DecodeRow([t for t in r.input_ids if t not in media_ids], r.max_new_tokens), eos)
            for r, h in zip(rows, has) if h]
    assert bare != [t for t, h in zip(expected, has) if h]


def test_a_row_joins_only_when_it_fits_and_leaving_frees_its_place():
    model = _lm(2)
    batch = DecodeBatch(model, max_rows=2, max_len=40)
    a, b, c = DecodeRow([1, 2, 3], 30), DecodeRow([4, 5], 30), DecodeRow([6], 5)
    batch.join([a, b])
    assert not batch.can_join([c])  # no free pool row
    with pytest.raises(ValueError, match="cannot join"):
        batch.join([c])
    batch.leave([a])
    assert batch.rows == [b] and batch.can_join([c])
    assert not batch.can_join([DecodeRow([1] * 20, 30)])  # 20 + 30 columns ahead would pass max_len
    batch.join([c])
    for _ in range(4):
        batch.step()
    assert c.finish == "length" and len(c.tokens) == 5 and batch.rows == [b] and b.finish is None
    batch.leave([b])
    assert batch.rows == [] and batch.col == 0


# ----------------------------------------------------------------------------- the server's worker


def test_cancelled_and_timed_out_rows_leave_at_the_next_step(llava_dir, monkeypatch):
    import mmlm.serve.engine as engine
    from mmlm.serve.engine import ContinuousWorker, GenerationJob

    sent = []
    monkeypatch.setattr(engine, "send", sent.extend)  # (job, kind, value) events, no event loop needed
    model, tok = mmlm.load(llava_dir), mmlm.load_tokenizer(llava_dir)
    worker = ContinuousWorker(model, tok, max_batch=4)
    jobs = [GenerationJob([1, 40 + k, 50 + k], None, 200, 0.0, 1.0, None, [], 512) for k in range(3)]
    steps, left_at = [], []
    step = worker.batch.step

    def watched_step():
        running = {id(worker.answers[r].job) for r in worker.batch.rows}
        steps.append(running)
        if len(running) == 3 and not left_at:
            jobs[0].cancel()  # its client left
            jobs[1].deadline = time.monotonic() - 1  # it timed out
            left_at.append(len(steps))
        return step()

    worker.batch.step = watched_step
    for job in jobs:
        worker.submit(job)
    deadline = time.monotonic() + 60
    while not any(job is jobs[2] and kind == "done" for job, kind, _ in sent):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    worker.close()
    assert left_at and steps[left_at[0]] == {id(jobs[2])}  # the very next step runs without them
    assert not any(job is not jobs[2] and kind == "done" for job, kind, _ in sent)  # they got no answer
    assert all(id(jobs[0]) not in s and id(jobs[1]) not in s for s in steps[left_at[0]:])
    assert worker.batch.rows == [] and worker.answers == {}


# ----------------------------------------------------------------------------- over HTTP

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


def _reference(service, body: dict) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of `mmlm.generate` alone for a chat request, greedy."""
    from mmlm.serve.schemas import ChatCompletionRequest

    job = service.chat_job(ChatCompletionRequest(**body))
    eos = end_token_ids(service.model, service.tokenizer)
    out = generate(service.model, torch.tensor([job.ids]), pixel_values=job.pixel_values,
                   max_new_tokens=job.max_tokens, eos_token_id=eos)[0].tolist()
    ends = [i for i, t in enumerate(out) if t in eos]
    tokens = out[: ends[0]] if ends else out
    text = service.tokenizer.decode(tokens, skip_special_tokens=True)
    return text, len(out[: ends[0] + 1] if ends else out), "stop" if ends else "length"


def test_concurrent_chats_join_the_running_batch_and_answer_as_generate_alone(llava_dir):
    from serve_helpers import data_uri, png_bytes, running

    from mmlm.serve import ServeConfig, create_app

    app = create_app(llava_dir, ServeConfig(max_batch=4))  # continuous by default; fewer rows than requests
    service = app.state.service
    assert service.config.batching == "continuous" and service.worker.batch.max_rows == 4
    bodies = []
    for k in range(10):
        content = [{"type": "text", "text": ["what shape is this?", "describe the image", "how many"][k % 3]}]
        if k % 2:
            uri = data_uri(png_bytes(color=(20 * k, 200 - 15 * k, 90)))
            content.insert(0, {"type": "image_url", "image_url": {"url": uri}})
        bodies.append({"messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": [3, 40, 8, 25, 60][k % 5], "stream": k % 4 == 1})
    answers = [None] * len(bodies)

    def ask(k: int) -> None:
        if not bodies[k]["stream"]:
            r = httpx.post(url + "/v1/chat/completions", json=bodies[k], timeout=60).json()
            answers[k] = (r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"],
                          r["choices"][0]["finish_reason"])
            return
        text, finish = "", None
        with httpx.stream("POST", url + "/v1/chat/completions", json={**bodies[k], "stream_options": {
                "include_usage": True}}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        text += chunk["choices"][0]["delta"].get("content") or ""
                        finish = chunk["choices"][0]["finish_reason"] or finish
                    else:
                        usage = chunk["usage"]["completion_tokens"]
        answers[k] = (text, usage, finish)

    with running(app) as url:
        threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(bodies))]
        for t in threads:
            t.start()
            time.sleep(0.01)  # arrivals spread over the running batch's steps
        for t in threads:
            t.join(60)
        steps, rows = service.worker.batches, service.worker.rows
    expected = [_reference(service, {k: v for k, v in b.items() if k != "stream"}) for b in bodies]
    assert answers == expected
    # rows shared steps (one request alone would be 1.0); how many depends on arrival timing: 1.4 on a loaded
    # fresh-clone CI run, more when idle
    assert rows / steps > 1.2


def test_a_client_leaving_a_stream_leaves_the_running_batch(llava_dir):
    """The server notices a client has gone when it next writes to it (within `send_every_s`); its row leaves at
    the step after. Steps are slowed to 10 ms here, so 300 tokens would take 3 s."""
    from serve_helpers import running

    from mmlm.serve import create_app

    app = create_app(llava_dir)
    worker, rows = app.state.service.worker, []
    step = worker.batch.step

    def slow_step():
        rows.extend(r for r in worker.batch.rows if r not in rows)
        time.sleep(0.01)
        return step()

    worker.batch.step = slow_step
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "temperature": 0, "stream": True}
    with running(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept: a closed iterator would close the response
            next(line for line in lines if line.startswith("data: "))
            deadline = time.monotonic() + 30
            while not rows:  # the row runs; now the client leaves
                assert time.monotonic() < deadline, "the request did not start"
                time.sleep(0.01)
        while worker.batch.rows:
            assert time.monotonic() < deadline, "the row did not leave"
            time.sleep(0.01)
        assert rows[0].finish is None and len(rows[0].tokens) < 150  # it left; it did not run to an end
        ok = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200


def test_batching_is_selectable_and_continuous_by_default(llava_dir):
    from mmlm.cli import build_parser
    from mmlm.serve import ServeConfig, create_app
    from mmlm.serve.engine import ContinuousWorker, Worker

    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.batching, args.max_batch) == ("continuous", None)
    assert build_parser().parse_args(["serve", "--model", "m", "--batching", "static"]).batching == "static"
    continuous = create_app(llava_dir).state.service.worker
    static = create_app(llava_dir, ServeConfig(batching="static")).state.service.worker
    assert isinstance(continuous, ContinuousWorker) and continuous.max_batch == 32
    assert type(static) is Worker and static.max_batch == 8
    continuous.close()
    static.close()
    with pytest.raises(ValueError, match="batching 'dynamic'"):
        create_app(llava_dir, ServeConfig(batching="dynamic"))
