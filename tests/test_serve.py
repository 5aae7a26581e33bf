"""`mmlm serve`: the official OpenAI client talks to it; batching, back-pressure, timeouts; bad input is a 4xx."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import data_uri, png_bytes, running  # noqa: E402

import mmlm  # noqa: E402
from mmlm.data.transforms import load_image  # noqa: E402
from mmlm.serve import ServeConfig, create_app  # noqa: E402
from mmlm.serve.tiny import tiny_clip, tiny_llava  # noqa: E402


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="module")
def llava_server(llava_dir, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "red.png").write_bytes(png_bytes())
    config = ServeConfig(max_image_pixels=1_000_000, max_body_bytes=2_000_000, max_image_bytes=1_000_000,
                         max_images=2, local_dir=str(allowed))
    app = create_app(llava_dir, config)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def clip_server(clip_dir):
    app = create_app(clip_dir, ServeConfig(max_image_pixels=1_000_000))
    with running(app) as url:
        yield url, app


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def image_message(text: str, color=(200, 30, 30)) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png_bytes(color=color))}},
                                         {"type": "text", "text": text}]}]


# ----------------------------------------------------------------------------- the OpenAI client

def test_openai_client_chat_with_an_image_streaming_and_not(llava_server):
    url, _ = llava_server
    c = client(url)
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny-llava"]
    kw = dict(model="tiny-llava", messages=image_message("what shape is this?"), max_tokens=12, temperature=0)
    full = c.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 16  # the image alone is 16 tokens
    assert 1 <= full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == choice.message.content  # greedy: streaming sends the same answer in pieces
    assert finish == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_max_tokens_seed_and_stop(llava_server):
    url, _ = llava_server
    c = client(url)

    def ask(text, **kw):
        return c.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": text}], **kw)

    answers = {p: ask(p, max_tokens=30, temperature=0).choices[0] for p in ("hi", "what colour?", "describe the image")}
    assert len({a.message.content for a in answers.values()}) > 1  # the answer depends on the prompt
    prompt = next(p for p, a in answers.items() if a.finish_reason == "length")
    short = ask(prompt, max_tokens=5, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    sampled = [ask(prompt, max_tokens=20, temperature=1.0, seed=s).choices[0].message.content for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    text = answers[prompt].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]  # a stop string from inside the greedy answer
    cut = ask(prompt, max_tokens=30, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[: text.index(stop)]


def test_local_image_files_only_under_the_allowed_directory(llava_server):
    url, _ = llava_server

    def ask(image_url):
        return httpx.post(url + "/v1/chat/completions", json={"max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}]}]})

    assert ask("red.png").status_code == 200
    for bad in ("../red.png", "/etc/passwd", "file:///etc/hostname", "http://127.0.0.1:1/x.png"):
        r = ask(bad)
        assert r.status_code == 400, bad
        assert r.json()["error"]["param"] == "messages.0.content.0.image_url"


def test_openai_client_embeddings_of_texts_and_images(clip_server, clip_dir):
    url, _ = clip_server
    c = client(url)
    uri = data_uri(png_bytes())
    got = c.embeddings.create(model="tiny-clip", input=["a red circle", uri, "a blue star"])  # base64 by default
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape == (3, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert got.usage.prompt_tokens > 0
    floats = c.embeddings.create(model="tiny-clip", input="a red circle", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vectors[0], atol=1e-6)
    # the same numbers as the model itself, loaded on its own
    model, svc = mmlm.load(clip_dir), clip_server[1].state.service
    with torch.no_grad():
        ref_text = F.normalize(model.encode_text(svc.tokenizer(["a red circle"], context_length=16)), dim=-1)[0]
        ref_image = F.normalize(model.encode_image(svc.processor([load_image(io.BytesIO(png_bytes()))])), dim=-1)[0]
    assert np.allclose(vectors[0], ref_text.numpy(), atol=1e-5)
    assert np.allclose(vectors[1], ref_image.numpy(), atol=1e-5)


def test_zero_shot_classify(clip_server):
    url, _ = clip_server
    r = httpx.post(url + "/v1/classify", json={"image": data_uri(png_bytes()), "labels": ["circle", "star", "cross"]})
    assert r.status_code == 200
    body = r.json()
    probs = [d["probability"] for d in body["data"]]
    assert [d["label"] for d in body["data"]] == ["circle", "star", "cross"]
    assert abs(sum(probs) - 1) < 1e-5 and body["label"] == body["data"][int(np.argmax(probs))]["label"]


# ----------------------------------------------------------------------------- concurrency

class Gate:
    """Holds the model thread before its next batch until opened: makes queueing deterministic in tests."""

    def __init__(self, worker):
        self.worker, self.run, self.open_ = worker, worker.run_batch, threading.Event()
        self.entered = threading.Event()
        worker.run_batch = self

    def __call__(self, jobs):
        self.entered.set()
        self.open_.wait(30)
        self.run(jobs)

    def release(self):
        self.open_.set()
        self.worker.run_batch = self.run


def wait_for(predicate, what: str):
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_queued_requests_are_batched_and_answer_as_alone(llava_dir):
    app = create_app(llava_dir, ServeConfig(max_batch=8, batching="static"))  # Gate holds static batches
    worker = app.state.service.worker
    prompts = [image_message("what shape is this?", (200, 30, 30)), image_message("what colour?", (30, 30, 200)),
               [{"role": "user", "content": "how many objects are there in the image"}]]
    with running(app) as url:
        c = client(url)
        alone = [c.chat.completions.create(model="tiny-llava", messages=m, max_tokens=8, temperature=0)
                 .choices[0].message.content for m in prompts]
        batches = worker.batches
        gate = Gate(worker)
        blocker = threading.Thread(target=lambda: c.chat.completions.create(
            model="tiny-llava", messages=prompts[2], max_tokens=2, temperature=0))
        blocker.start()
        gate.entered.wait(30)  # the model thread holds the blocker's batch; the next requests queue up
        results = [None] * 3

        def ask(k):
            results[k] = c.chat.completions.create(model="tiny-llava", messages=prompts[k], max_tokens=8,
                                                   temperature=0).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: worker.depth == 3, "three queued requests")
        health = httpx.get(url + "/health").json()  # the loop answers while the model thread is busy
        assert health["queue"] == 3
        gate.release()
        for t in threads + [blocker]:
            t.join(60)
    assert worker.batches - batches == 2  # the blocker alone, then the three queued requests together
    assert results == alone  # a row's greedy answer does not depend on its batch (left padding, mixed images)


@pytest.mark.slow
def test_full_queue_answers_429_and_slow_request_504(llava_dir):
    app = create_app(llava_dir, ServeConfig(max_queue=1, timeout_s=1.5, batching="static"))
    worker = app.state.service.worker
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running(app) as url:
        gate = Gate(worker)
        statuses = {}

        def post(name):
            statuses[name] = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)

        first = threading.Thread(target=post, args=("running",))
        first.start()
        gate.entered.wait(30)
        second = threading.Thread(target=post, args=("queued",))
        second.start()
        wait_for(lambda: worker.depth == 1, "one queued request")
        third = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
        assert third.headers["retry-after"] == "1"
        first.join(30)
        second.join(30)
        gate.release()
        assert statuses["running"].status_code == 504 and statuses["queued"].status_code == 504
        assert statuses["queued"].json()["error"]["type"] == "timeout_error"
        wait_for(lambda: worker.depth == 0, "the expired request to be dropped")
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200  # still serving


def test_stream_is_readable_while_health_answers(llava_server):
    url, _ = llava_server
    body = {"messages": [{"role": "user", "content": "describe the image"}], "max_tokens": 200, "stream": True,
            "temperature": 1.0, "seed": 1}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert httpx.get(url + "/health").json()["status"] == "ok"
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"


# ----------------------------------------------------------------------------- bad input

def _chat(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def _image(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]


BOMB = png_bytes(size=(2000, 2000), color=0, mode="L")  # 4 Mpixel, a few KB: over the test limit of 1 Mpixel

BAD = {
    "invalid JSON": (b"{not json", 400, "invalid_json", None),
    "no messages": ({"messages": []}, 400, "invalid_value", "messages"),
    "wrong type": (_chat("hi", max_tokens="many"), 400, "invalid_value", "max_tokens"),
    "unknown model": (_chat("hi", model="gpt-9"), 404, "model_not_found", "model"),
    "n > 1": (_chat("hi", n=2), 400, "invalid_value", "n"),
    "broken base64": (_chat(_image("data:image/png;base64,@@@not-base64@@@")), 400, "invalid_base64",
                      "messages.0.content.0.image_url"),
    "not an image": (_chat(_image(data_uri(b"hello, I am text", "image/png"))), 400, "invalid_image",
                     "messages.0.content.0.image_url"),
    "truncated image": (_chat(_image(data_uri(png_bytes()[:60]))), 400, "invalid_image",
                        "messages.0.content.0.image_url"),
    "decompression bomb": (_chat(_image(data_uri(BOMB))), 400, "image_too_large", "messages.0.content.0.image_url"),
    "image too many bytes": (_chat(_image(data_uri(b"\0" * 1_200_000))), 413, "image_too_large",
                             "messages.0.content.0.image_url"),
    "body too large": (_chat("x" * 2_100_000), 413, "body_too_large", None),
    "too many images": (_chat(_image(data_uri(png_bytes())) * 3), 400, "too_many_images",
                        "messages.0.content.4.image_url"),
    "image without <image> slot": (_chat("what is <image> here"), 400, "invalid_messages", "messages"),
    "context overflow": (_chat("describe the image " * 200), 400, "context_length_exceeded", "messages"),
    "max_tokens past context": (_chat("hi", max_tokens=100_000), 400, "context_length_exceeded", "messages"),
    "remote URL refused": (_chat(_image("https://example.com/cat.png")), 400, "image_source_not_allowed",
                           "messages.0.content.0.image_url"),
    "images in an assistant turn": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _image(
        data_uri(png_bytes()))}, {"role": "user", "content": "and?"}]}, 400, "invalid_value",
        "messages.1.content.0.image_url"),
    "bad stop": (_chat("hi", stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "stop"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_chat_input_is_a_4xx_naming_the_problem(llava_server, case):
    url, _ = llava_server
    body, status, code, param = BAD[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["message"] and "Traceback" not in r.text


def test_endpoints_the_model_cannot_serve_and_unknown_routes(llava_server, clip_server):
    for url, path, body in [(llava_server[0], "/v1/embeddings", {"input": "x"}),
                            (llava_server[0], "/v1/classify", {"image": "x", "labels": ["a"]}),
                            (clip_server[0], "/v1/chat/completions", _chat("hi"))]:
        r = httpx.post(url + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_endpoint"
    r = httpx.get(llava_server[0] + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(llava_server[0] + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, code, param", [
    ({"input": []}, "invalid_value", "input"),
    ({"input": "a red circle " * 20}, "context_length_exceeded", "input.0"),
    ({"input": ["ok", "data:image/png;base64,AAAA"]}, "invalid_image", "input.1"),
    ({"input": "x", "dimensions": 7}, "invalid_value", "dimensions"),
    ({"input": [[1, 2, 3]]}, "invalid_value", None),
])
def test_bad_embedding_input(clip_server, body, code, param):
    r = httpx.post(clip_server[0] + "/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and (param is None or error["param"] == param), error


def test_classify_needs_a_template_with_one_slot(clip_server):
    r = httpx.post(clip_server[0] + "/v1/classify", json={"image": data_uri(png_bytes()), "labels": ["a"],
                                                          "template": "no slot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "template"


def test_internal_errors_do_not_leak(llava_dir):
    app = create_app(llava_dir)

    def broken(req):
        raise RuntimeError("secret internal detail")

    app.state.service.chat_job = broken
    with running(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json=_chat("hi"))
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "internal server error", "type": "server_error", "param": None,
                                 "code": "internal_error"}
    assert "secret" not in r.text and "Traceback" not in r.text


def test_api_key(llava_dir):
    app = create_app(llava_dir, ServeConfig(api_key="sesame"))
    with running(app) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200


def test_cli_serve_passes_its_options(monkeypatch, llava_dir):
    from mmlm.cli import main

    seen = {}
    monkeypatch.setattr("mmlm.serve.app.serve", lambda model, host, port, config, insecure: seen.update(
        model=model, host=host, port=port, config=config, insecure=insecure))
    assert main(["serve", "--model", str(llava_dir), "--port", "9001", "--max-queue", "3", "--timeout", "5",
                 "--allow-local-dir", "/srv/images", "--name", "demo", "--weights", "int8"]) == 0
    cfg = seen["config"]
    assert (seen["port"], seen["host"], cfg.max_queue, cfg.timeout_s, cfg.local_dir, cfg.name, cfg.allow_remote,
            cfg.weights) == (9001, "127.0.0.1", 3, 5.0, "/srv/images", "demo", False, "int8")


def test_quantized_llava_serves_and_clip_refuses(llava_dir, clip_dir):
    from mmlm.quant import is_quantized

    app = create_app(llava_dir, ServeConfig(weights="int8"))
    assert is_quantized(app.state.service.model.lm)
    with running(app) as url:
        reply = client(url).chat.completions.create(model="tiny-llava", max_tokens=8, temperature=0,
                                                    messages=image_message("What shape is this?"))
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    with pytest.raises(ValueError, match="is a CLIP"):
        create_app(clip_dir, ServeConfig(weights="int8"))


def test_worker_batches_same_settings_that_fit_the_context_and_seeded_requests_alone():
    from mmlm.serve.engine import GenerationJob, Worker

    seen, gate = [], threading.Event()

    def run(batch):
        gate.wait(30)
        seen.append([(len(j.ids), j.max_tokens) for j in batch])

    worker = Worker(run, max_queue=8, max_batch=8)

    def job(prompt, max_tokens, temperature=0.0, seed=None):
        return GenerationJob([1] * prompt, None, max_tokens, temperature, 1.0, seed, [], context=420)

    worker.submit(job(1, 1))  # taken at once; the thread waits at the gate while the rest queue up
    wait_for(lambda: worker.depth == 0, "the first job to be taken")
    for j in [job(100, 10), job(10, 400), job(20, 10), job(5, 5, temperature=1.0), job(6, 6, 1.0, seed=3),
              job(7, 7, 1.0, seed=3), job(8, 8, 1.0)]:
        worker.submit(j)
    gate.set()
    wait_for(lambda: len(seen) == 6, "six batches")
    worker.close()
    assert seen == [[(1, 1)], [(100, 10), (20, 10)], [(10, 400)], [(5, 5), (8, 8)], [(6, 6)], [(7, 7)]]


def test_a_client_leaving_a_stream_stops_its_generation(llava_dir, monkeypatch):
    import mmlm.serve.engine as engine

    app = create_app(llava_dir, ServeConfig(batching="static"))  # continuous: tests/test_continuous_batching.py
    worker, jobs, tokens, finished = app.state.service.worker, [], [], []
    run_batch = worker.run_batch
    worker.run_batch = lambda batch: (jobs.extend(batch), run_batch(batch), finished.append(len(tokens)))
    real_generate = engine.generate

    def generate(*args, stream, **kw):
        def hold(row, token):
            tokens.append(token)
            if len(tokens) == 2:
                jobs[0].cancelled.wait(30)  # generation holds here until the server sees the client leave
            stream(row, token)

        return real_generate(*args, stream=hold, **kw)

    monkeypatch.setattr(engine, "generate", generate)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "temperature": 0, "stream": True}
    with running(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # held: a dropped line iterator closes httpx's stream, and the client leaves early
            next(line for line in lines if line.startswith("data: "))
            wait_for(lambda: tokens, "generation to start")  # then it holds at the second token
        wait_for(lambda: jobs and jobs[0].cancelled.is_set(), "the server to notice the client left")
        wait_for(lambda: finished, "the batch to end")
        assert finished[0] <= 3  # stopped within a step, not after 300 tokens (greedy "hi" runs long on this model)
        assert httpx.post(url + "/v1/chat/completions", json=_chat("hi")).status_code == 200


def test_a_language_model_chats_with_its_chat_template(tmp_path):
    from mmlm.config import LMConfig
    from mmlm.models.lm import LM
    from mmlm.serve.tiny import word_corpus
    from mmlm.tokenizer import Tokenizer

    template = ("{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    tok = Tokenizer.train_byte_level(word_corpus(), vocab_size=300, chat_template=template)
    torch.manual_seed(0)
    lm = LM(LMConfig(vocab_size=tok.vocab_size, width=48, layers=2, heads=4, kv_heads=2, mlp_dim=96, max_seq_len=128,
                     eos_token_id=tok.eot_id))
    mmlm.save(lm, tmp_path / "tiny-lm", tokenizer=tok)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what shape?"}]
    with running(create_app(tmp_path / "tiny-lm")) as url:
        got = client(url).chat.completions.create(model="tiny-lm", messages=messages, max_tokens=6, temperature=0)
        refused = httpx.post(url + "/v1/chat/completions", json=_chat(_image(data_uri(png_bytes()))))
    ids = torch.tensor([tok.encode(tok.apply_chat_template(messages))])
    assert got.usage.prompt_tokens == ids.shape[1]
    expected = mmlm.generate(mmlm.load(tmp_path / "tiny-lm"), ids, max_new_tokens=6, eos_token_id=tok.eot_id)[0]
    assert got.choices[0].message.content == tok.decode([t for t in expected.tolist() if t != tok.eot_id],
                                                        skip_special_tokens=True)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "images_not_supported"
