"""`mmlm serve` with a video or an audio CLIP: videos (vLLM's `video_url` parts) and sounds (OpenAI's `input_audio`
parts) are embedded exactly as `encode_video` / `encode_audio` embed the same files read by data/media.py, and
classified; every hostile part is a 4xx naming it, and the server answers the next good request."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("av")
pytest.importorskip("soundfile")

from serve_helpers import data_uri, moving_square, png_bytes, running, tone  # noqa: E402

import mmlm  # noqa: E402
from mmlm.data.fbank import FbankConfig  # noqa: E402
from mmlm.data.media import (audio_features, normalize_videos, read_audio, read_video, video_pixels,  # noqa: E402
                             write_audio, write_video)
from mmlm.data.transforms import ImageProcessor, PreprocessConfig  # noqa: E402
from mmlm.serve import ServeConfig, create_app  # noqa: E402
from mmlm.serve.tiny import tiny_audio_clip, tiny_clip, tiny_video_clip  # noqa: E402

EMBED, CLASSIFY = "/v1/embeddings", "/v1/classify"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    write_video(d / "clip.mp4", moving_square(), fps=8)
    write_video(d / "long.mp4", moving_square(40), fps=8)
    write_audio(d / "tone.wav", tone(), 22_050)  # not the model's 16 kHz: the server resamples
    write_audio(d / "tone.flac", tone(hz=880), 22_050)
    write_audio(d / "long.wav", tone(seconds=3.0, rate=8_000), 8_000)  # 48 kB: within the byte limit
    return d


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return tiny_video_clip(tmp_path_factory.mktemp("models") / "tiny-video-clip", frames=4)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    return tiny_audio_clip(tmp_path_factory.mktemp("models") / "tiny-audio-clip")


@pytest.fixture(scope="module")
def video_server(video_dir, files):
    config = ServeConfig(max_video_bytes=200_000, max_video_frames=30, local_dir=str(files))
    with running(create_app(video_dir, config)) as url:
        yield url


@pytest.fixture(scope="module")
def audio_server(audio_dir):
    with running(create_app(audio_dir, ServeConfig(max_audio_bytes=100_000, max_audio_seconds=2.0))) as url:
        yield url


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    with running(create_app(tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip"))) as url:
        yield url


def video_part(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": data_uri(data, "video/mp4")}}


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def embed(url: str, items: list) -> httpx.Response:
    return httpx.post(url + EMBED, json={"input": items}, timeout=60)


def vectors(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


def test_video_embeddings_equal_encode_video_of_the_file(video_server, video_dir, files):
    clip = (files / "clip.mp4").read_bytes()
    r = embed(video_server, ["a red square moving right", video_part(clip), data_uri(png_bytes()),
                             {"type": "video_url", "video_url": "clip.mp4"}])  # a path under --allow-local-dir
    got = vectors(r)
    assert got.shape == (4, 32) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # the reference: the file read as `mmlm eval zeroshot` reads it, through the model loaded on its own
    model = mmlm.load(video_dir)
    processor = ImageProcessor(PreprocessConfig(image_size=32))
    frames = video_pixels(read_video(files / "clip.mp4", model.config.temporal.frames), processor)  # (4, 32, 32, 3)
    with torch.no_grad():
        want = F.normalize(model.encode_video(normalize_videos(torch.from_numpy(frames[None]), processor)), dim=-1)[0]
    np.testing.assert_allclose(got[1], want.numpy(), atol=1e-5)
    np.testing.assert_allclose(got[3], got[1], atol=1e-6)  # the same file, by path
    assert np.abs(got[2] - got[1]).max() > 1e-3  # the image is embedded as an image


def test_audio_embeddings_equal_encode_audio_of_the_file(audio_server, audio_dir, files):
    r = embed(audio_server, [audio_part((files / "tone.wav").read_bytes()), "a high tone",
                             audio_part((files / "tone.flac").read_bytes(), "flac")])
    got = vectors(r)
    assert got.shape == (3, 32)
    model = mmlm.load(audio_dir)
    features = FbankConfig.for_tower(model.config.audio)
    clips = [audio_features(read_audio(files / name, features.sampling_rate), features)
             for name in ("tone.wav", "tone.flac")]
    with torch.no_grad():
        want = F.normalize(model.encode_audio(torch.from_numpy(np.stack(clips))), dim=-1)
    np.testing.assert_allclose(got[[0, 2]], want.numpy(), atol=1e-5)
    assert r.json()["usage"]["prompt_tokens"] > 0  # the text's tokens; media count none


def test_classify_a_video_and_a_sound(video_server, audio_server, files):
    labels = ["moving left", "moving right", "growing"]
    video = {"url": data_uri((files / "clip.mp4").read_bytes(), "video/mp4")}
    r = httpx.post(video_server + CLASSIFY, json={"video": video, "labels": labels}, timeout=60)
    assert r.status_code == 200, r.text
    probs = [d["probability"] for d in r.json()["data"]]
    assert [d["label"] for d in r.json()["data"]] == labels and abs(sum(probs) - 1) < 1e-5
    sound = {"data": base64.b64encode((files / "tone.wav").read_bytes()).decode(), "format": "wav"}
    r = httpx.post(audio_server + CLASSIFY, json={"audio": sound, "labels": ["a tone", "noise"],
                                                  "template": "the sound of {}."}, timeout=60)
    assert r.status_code == 200, r.text
    assert abs(sum(d["probability"] for d in r.json()["data"]) - 1) < 1e-5
    # the default template is the medium's ("the sound of {}."): the same answer
    default = httpx.post(audio_server + CLASSIFY, json={"audio": sound, "labels": ["a tone", "noise"]}, timeout=60)
    assert default.json()["data"] == r.json()["data"]
    health = httpx.get(audio_server + "/health").json()
    assert health["kind"] == "clip" and health["media"] == ["audio"]
    assert httpx.get(video_server + "/health").json()["media"] == ["image", "video"]


def _refused(r: httpx.Response, status: int, code: str, param: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert "0x" not in error["message"] and "Traceback" not in r.text  # no heap addresses, no traces


def test_hostile_videos_are_refused_naming_the_part(video_server, files):
    clip = (files / "clip.mp4").read_bytes()
    cases = [
        (["ok", video_part(clip[:200] + b"\x00" * 300)], 400, "invalid_video", "input.1.video_url"),  # broken mp4
        ([video_part(b"these bytes are not a video\n" * 20)], 400, "invalid_video", "input.0.video_url"),
        ([video_part(b"\x00" * 200_001)], 413, "video_too_large", "input.0.video_url"),  # bytes, before decoding
        ([video_part((files / "long.mp4").read_bytes())], 400, "video_too_large", "input.0.video_url"),  # 40 frames
        (["ok", video_part(clip), video_part(clip), video_part(clip)], 400, "too_many_videos", "input.3"),
        ([{"type": "video_url", "video_url": "../outside.mp4"}], 400, "video_source_not_allowed", "input.0.video_url"),
        ([{"type": "video_url", "video_url": {"url": "data:video/mp4,raw"}}], 400, "invalid_video_url",
         "input.0.video_url"),
        ([audio_part((files / "tone.wav").read_bytes())], 400, "audio_not_supported", "input.0"),  # wrong kind
    ]
    for items, status, code, param in cases:
        _refused(embed(video_server, items), status, code, param)
    r = httpx.post(video_server + CLASSIFY, json={"video": {"url": data_uri(b"nope", "video/mp4")}, "labels": ["a"]})
    _refused(r, 400, "invalid_video", "video")
    r = httpx.post(video_server + CLASSIFY, json={"video": "clip.mp4", "image": data_uri(png_bytes()), "labels": ["a"]})
    _refused(r, 400, "invalid_value", "video")  # one medium at a time
    assert vectors(embed(video_server, [video_part(clip)])).shape == (1, 32)  # still serving


def test_hostile_sounds_are_refused_naming_the_part(audio_server, files):
    wav = (files / "tone.wav").read_bytes()
    cases = [
        ([audio_part(wav[:30])], 400, "invalid_audio", "input.0.input_audio"),  # truncated in its header
        ([audio_part(wav[:60])], 400, "invalid_audio", "input.0.input_audio"),  # truncated to 8 samples
        (["ok", audio_part(b"RIFF but not really a wave file" * 10)], 400, "invalid_audio", "input.1.input_audio"),
        ([audio_part(png_bytes(), "flac")], 400, "invalid_audio", "input.0.input_audio"),
        ([audio_part(wav, "flac")], 400, "invalid_audio", "input.0.input_audio"),  # a wav is not the flac it claims
        ([audio_part(wav, "aac")], 400, "unsupported_audio_format", "input.0.input_audio.format"),
        ([audio_part(b"\x00" * 100_001)], 413, "audio_too_large", "input.0.input_audio"),
        ([audio_part((files / "long.wav").read_bytes())], 400, "audio_too_long", "input.0.input_audio"),  # 3 s > 2
        ([{"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}], 400, "invalid_base64",
         "input.0.input_audio"),
        ([data_uri(png_bytes())], 400, "images_not_supported", "input.0"),  # an image to an audio CLIP
        ([video_part((files / "clip.mp4").read_bytes())], 400, "videos_not_supported", "input.0"),
    ]
    for items, status, code, param in cases:
        _refused(embed(audio_server, items), status, code, param)
    r = httpx.post(audio_server + CLASSIFY, json={"image": data_uri(png_bytes()), "labels": ["a"]})
    _refused(r, 400, "images_not_supported", "image")
    r = httpx.post(audio_server + CLASSIFY, json={"labels": ["a"]})
    _refused(r, 400, "invalid_value", "image")
    assert vectors(embed(audio_server, [audio_part(wav)])).shape == (1, 32)  # still serving


def test_an_image_clip_refuses_videos_and_sounds(image_server, files):
    r = embed(image_server, ["ok", video_part((files / "clip.mp4").read_bytes())])
    _refused(r, 400, "videos_not_supported", "input.1")
    r = httpx.post(image_server + CLASSIFY, json={"audio": {"data": "AAAA", "format": "wav"}, "labels": ["a"]})
    _refused(r, 400, "audio_not_supported", "audio")
    assert vectors(embed(image_server, ["ok", data_uri(png_bytes())])).shape == (2, 32)


def test_a_playlist_naming_a_local_file_is_not_followed(video_server, files):
    """FFmpeg's concat and HLS demuxers open the files a playlist names; from bytes in memory it refuses them."""
    for playlist in (f"ffconcat version 1.0\nfile {files / 'clip.mp4'}\n",
                     f"#EXTM3U\n#EXTINF:10.0,\nfile://{files / 'clip.mp4'}\n#EXT-X-ENDLIST\n"):
        _refused(embed(video_server, [video_part(playlist.encode())]), 400, "invalid_video", "input.0.video_url")
