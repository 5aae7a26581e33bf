"""Fuzzing the server through its own OpenAPI schema (schemathesis, bounded): no request gets a 5xx, and every
status it answers is one the schema documents."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import status_code_conformance  # noqa: E402

from mmlm.serve import ServeConfig, create_app  # noqa: E402
from mmlm.serve.tiny import (tiny_audio_clip, tiny_clip, tiny_llava, tiny_text_to_image,  # noqa: E402
                             tiny_video_clip)

pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
HOST = ("testserver",)  # the Host the in-process client sends: a key-less server answers only hosts it knows


def _schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", params=["images", "media", "flamingo"])
def llava_api(request, tmp_path_factory):
    """A LLaVA that reads images; one that reads video and sound too (their parts then reach the decoders); the
    same with the Flamingo connector."""
    config = ServeConfig(default_max_tokens=16, allowed_hosts=HOST)
    kw = {"images": {}, "media": {"media": True}, "flamingo": {"media": True, "connector": "flamingo"}}[request.param]
    app = create_app(tiny_llava(tmp_path_factory.mktemp("fuzz") / "tiny-llava", **kw), config)
    yield _schema(app)
    app.state.service.close()


@pytest.fixture(scope="module")
def clip_api(tmp_path_factory):
    app = create_app(tiny_clip(tmp_path_factory.mktemp("fuzz") / "tiny-clip"), ServeConfig(allowed_hosts=HOST))
    yield _schema(app)
    app.state.service.close()


@pytest.fixture(scope="module", params=["video", "audio"])
def media_clip_api(request, tmp_path_factory):
    build = {"video": tiny_video_clip, "audio": tiny_audio_clip}[request.param]
    directory = build(tmp_path_factory.mktemp("fuzz") / f"tiny-{request.param}-clip")
    app = create_app(directory, ServeConfig(allowed_hosts=HOST))
    yield _schema(app)
    app.state.service.close()


@pytest.fixture(scope="module")
def t2i_api(tmp_path_factory):
    config = ServeConfig(allowed_hosts=HOST, max_image_steps=2, max_generated_images=2)
    app = create_app(tiny_text_to_image(tmp_path_factory.mktemp("fuzz") / "tiny-t2i"), config)
    yield _schema(app)
    app.state.service.close()


def fuzz(schema) -> list[str]:
    """Run each operation of the schema on FUZZ's bounded examples; returns the operations run."""
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @FUZZ
        @given(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance])

        check()
        ran.append(operation.label)
    return ran


def test_fuzz_llava_server(llava_api):
    assert "POST /v1/chat/completions" in fuzz(llava_api)


def test_fuzz_clip_server(clip_api):
    assert {"POST /v1/embeddings", "POST /v1/classify"} <= set(fuzz(clip_api))


def test_fuzz_video_and_audio_clip_servers(media_clip_api):
    assert {"POST /v1/embeddings", "POST /v1/classify"} <= set(fuzz(media_clip_api))


def test_fuzz_text_to_image_server(t2i_api):
    assert "POST /v1/images/generations" in fuzz(t2i_api)
