"""`mmlm serve` with a LLaVA that reads video and sound: chat through the official `openai` package with vLLM's
`video_url` and OpenAI's `input_audio` content parts answers exactly as `mmlm chat --video --audio` does on the
same files; hostile media are 4xx naming the part, and the server answers the next good request."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("av")
pytest.importorskip("soundfile")

from serve_helpers import data_uri, moving_square, png_bytes, running, tone  # noqa: E402

import mmlm  # noqa: E402
from mmlm.chat import chat  # noqa: E402
from mmlm.data.media import write_audio, write_video  # noqa: E402
from mmlm.serve import ServeConfig, create_app  # noqa: E402
from mmlm.serve.tiny import tiny_llava  # noqa: E402

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    write_video(d / "clip.mp4", moving_square(), fps=8)
    write_video(d / "long.mp4", moving_square(40), fps=8)
    write_audio(d / "tone.wav", tone(0.5, 16_000), 16_000)
    write_audio(d / "long.wav", tone(seconds=3.0, rate=8_000), 8_000)
    return d


@pytest.fixture(scope="module", params=["llava", "flamingo"])
def model_dir(request, tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava", media=True, connector=request.param)


@pytest.fixture(scope="module")
def server(model_dir):
    config = ServeConfig(max_video_bytes=200_000, max_video_frames=30, max_videos=1, max_audio_bytes=100_000,
                         max_audio_seconds=2.0, max_audio_clips=1)
    with running(create_app(model_dir, config)) as url:
        yield url


def video_part(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": data_uri(data, "video/mp4")}}


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def ask(url: str, parts: list, text: str = "What is it?", **kw) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], "max_tokens": 8,
            "temperature": 0, **kw}
    return httpx.post(url + CHAT, json=body, timeout=60)


def test_video_and_audio_chat_through_openai_equals_mmlm_chat(server, model_dir, files):
    clip, wav = (files / "clip.mp4").read_bytes(), (files / "tone.wav").read_bytes()
    c = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    for parts, kw in (([video_part(clip)], {"video": files / "clip.mp4"}),
                      ([audio_part(wav)], {"audio": files / "tone.wav"}),
                      ([video_part(clip), audio_part(wav)], {"video": files / "clip.mp4", "audio": files / "tone.wav"})):
        r = c.chat.completions.create(model="tiny-llava", max_tokens=8, temperature=0,
                                      messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}])
        flamingo = mmlm.load(model_dir).config.connector == "flamingo"  # one token per item; else every cell
        tokens = (1 if flamingo else 4 * 5) * ("video" in kw) + (1 if flamingo else 6) * ("audio" in kw)
        assert r.usage.prompt_tokens > tokens
        want = chat(model_dir, prompt="What?", max_new_tokens=8, out=io.StringIO(), **kw)[-1]["content"]
        assert r.choices[0].message.content.strip() == want  # chat() strips the reply


def _refused(r: httpx.Response, status: int, code: str, param: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert "Traceback" not in r.text


def test_hostile_media_in_chat_are_refused_naming_the_part(server, files):
    clip, wav = (files / "clip.mp4").read_bytes(), (files / "tone.wav").read_bytes()
    v, a = "messages.0.content.0.video_url", "messages.0.content.0.input_audio"
    cases = [
        ([video_part(clip[:200] + b"\x00" * 300)], 400, "invalid_video", v),  # undecodable
        ([video_part(b"\x00" * 200_001)], 413, "video_too_large", v),  # bytes, before decoding
        ([video_part((files / "long.mp4").read_bytes())], 400, "video_too_large", v),  # 40 frames > 30
        ([video_part(clip), video_part(clip)], 400, "too_many_videos", "messages.0.content.1.video_url"),
        ([audio_part(wav[:60])], 400, "invalid_audio", a),
        ([audio_part(wav, "flac")], 400, "invalid_audio", a),  # mislabelled: a wav is not the flac it claims
        ([audio_part(wav, "aac")], 400, "unsupported_audio_format", a + ".format"),
        ([audio_part(b"\x00" * 100_001)], 413, "audio_too_large", a),
        ([audio_part((files / "long.wav").read_bytes())], 400, "audio_too_long", a),  # 3 s > 2 s
        ([{"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}], 400, "invalid_base64", a),
    ]
    for parts, status, code, param in cases:
        _refused(ask(server, parts), status, code, param)
    body = {"messages": [{"role": "assistant", "content": [video_part(clip)]}], "max_tokens": 4}
    _refused(httpx.post(server + CHAT, json=body, timeout=60), 400, "invalid_value", v)  # media go in user turns
    assert ask(server, [video_part(clip), audio_part(wav)]).status_code == 200  # still serving


def test_a_llava_without_video_or_sound_refuses_them(tmp_path, files):
    plain = tiny_llava(tmp_path / "plain")
    with running(create_app(plain, ServeConfig())) as url:
        _refused(ask(url, [video_part((files / "clip.mp4").read_bytes())]), 400, "videos_not_supported",
                 "messages.0.content.0.video_url")
        _refused(ask(url, [audio_part((files / "tone.wav").read_bytes())]), 400, "audio_not_supported",
                 "messages.0.content.0.input_audio")
        image = {"type": "image_url", "image_url": {"url": data_uri(png_bytes())}}
        assert ask(url, [image]).status_code == 200
