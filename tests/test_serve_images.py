"""`mmlm serve` with a text-to-image model: OpenAI's images API (the official client), seeded images equal to
`mmlm.generate_image`'s, every request bounded (4xx naming the field), and the other endpoints refused."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from serve_helpers import running  # noqa: E402

import mmlm  # noqa: E402
from mmlm.image_generation import to_uint8  # noqa: E402
from mmlm.serve import ServeConfig, create_app  # noqa: E402
from mmlm.serve.engine import ImageJob, run_images  # noqa: E402
from mmlm.serve.tiny import tiny_clip, tiny_text_to_image  # noqa: E402

IMAGES = "/v1/images/generations"


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory):
    return tiny_text_to_image(tmp_path_factory.mktemp("models") / "tiny-t2i")


@pytest.fixture(scope="module")
def t2i_server(t2i_dir):
    app = create_app(t2i_dir, ServeConfig(max_generated_images=2, max_image_steps=8, default_image_steps=2))
    with running(app) as url:
        yield url, app


def pixels(item: dict) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def test_openai_client_generates_n_images_of_the_native_size(t2i_server):
    url, _ = t2i_server
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [(m.id, m.kind) for m in c.models.list().data] == [("tiny-t2i", "text-to-image")]
    out = c.images.generate(model="tiny-t2i", prompt="a red circle", n=2, size="16x16", response_format="b64_json",
                            extra_body={"steps": 2, "seed": 3, "scheduler": "euler"})
    images = [pixels(d.model_dump()) for d in out.data]
    assert [a.shape for a in images] == [(16, 16, 3)] * 2
    assert not np.array_equal(images[0], images[1])  # one noise draw for the batch: each image its own noise
    health = httpx.get(url + "/health").json()
    assert health["kind"] == "text-to-image" and health["status"] == "ok"


def test_seeded_request_repeats_and_equals_generate_image(t2i_server, t2i_dir):
    url, _ = t2i_server
    body = {"prompt": "a blue star in the top left", "n": 2, "steps": 3, "guidance_scale": 3.0, "seed": 11,
            "scheduler": "ddim", "negative_prompt": "green"}
    first = httpx.post(url + IMAGES, json=body, timeout=60)
    again = httpx.post(url + IMAGES, json=body, timeout=60)
    assert first.status_code == again.status_code == 200, first.text
    a, b = [[pixels(d) for d in r.json()["data"]] for r in (first, again)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    pipe = mmlm.load(t2i_dir)
    want = to_uint8(mmlm.generate_image(pipe, [body["prompt"]] * 2, steps=3, guidance=3.0, seed=11, scheduler="ddim",
                                        negative_prompt="green"))
    assert np.array_equal(np.stack(a), want)
    # no seed: the server draws one, so two requests differ
    unseeded = [pixels(httpx.post(url + IMAGES, json={"prompt": "a blue star"}, timeout=60).json()["data"][0])
                for _ in range(2)]
    assert not np.array_equal(*unseeded)


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "red " * 300}, "prompt"),  # more characters than can fit: refused untokenized
    ({"prompt": "red circle " * 12}, "prompt"),  # few enough characters, too many tokens
    ({"prompt": "x", "negative_prompt": "blue " * 300}, "negative_prompt"),
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "size": "32x32"}, "size"),
    ({"prompt": "x", "size": "banana"}, "size"),
    ({"prompt": "x", "n": 3}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 10000}, "steps"),
    ({"prompt": "x", "guidance_scale": "NaN"}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 1e6}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "scheduler": "pndm"}, "scheduler"),
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "quality": "hd"}, "quality"),
])
def test_bad_requests_are_400_naming_the_field(t2i_server, body, param):
    url, _ = t2i_server
    r = httpx.post(url + IMAGES, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert httpx.get(url + "/health").status_code == 200


def test_infinite_guidance_and_unknown_model(t2i_server):
    url, app = t2i_server
    rows = app.state.service.worker.rows
    # JSON has no NaN or Infinity; 1e400 parses as an infinite float
    r = httpx.post(url + IMAGES, content=b'{"prompt": "x", "guidance_scale": 1e400}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance_scale"
    r = httpx.post(url + IMAGES, json={"prompt": "x", "model": "other"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert app.state.service.worker.rows == rows  # nothing refused reached the model


def test_other_endpoints_refuse_a_text_to_image_model_and_images_refuse_others(t2i_server, tmp_path):
    url, _ = t2i_server
    for endpoint, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/embeddings", {"input": "hi"}),
                           ("/v1/classify", {"image": "x", "labels": ["a"]})]:
        r = httpx.post(url + endpoint, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_endpoint", r.text
        assert "text-to-image" in r.json()["error"]["message"]
    app = create_app(tiny_clip(tmp_path / "clip"), ServeConfig())
    with running(app) as clip_url:
        r = httpx.post(clip_url + IMAGES, json={"prompt": "a red circle"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_endpoint", r.text
        assert IMAGES in r.json()["error"]["message"]


def test_an_abandoned_request_stops_between_sampling_steps(t2i_dir):
    pipe = mmlm.load(t2i_dir)
    calls = []

    def count(module, args, out):
        calls.append(1)
        if len(calls) == 3:
            job.cancel()  # the client left during the third step

    pipe.unet.register_forward_hook(count)
    done = []
    job = ImageJob({"prompts": ["a red circle"], "steps": 50, "guidance": 1.0, "seed": 0, "scheduler": "ddim",
                    "negative_prompt": ""}, finish=done.append)
    run_images(pipe, [job])
    assert len(calls) == 3 and not done


def test_bad_limits_in_the_config_are_refused(t2i_dir):
    with pytest.raises(ValueError, match="default_image_steps"):
        ServeConfig(max_image_steps=4, default_image_steps=5)
    with pytest.raises(ValueError, match="max_generated_images"):
        ServeConfig(max_generated_images=0)
    assert ServeConfig(max_image_steps=20).default_image_steps == 20
    with pytest.raises(ValueError, match="weights"):
        create_app(t2i_dir, ServeConfig(weights="int8"))
