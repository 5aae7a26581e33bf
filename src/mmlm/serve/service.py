"""The served model: loads it once, turns request bodies into jobs for the model thread.

Everything here is blocking (JSON, decoding images, videos and sounds, tokenizing) and runs on the app's
pre-processing threads (admission.py), never on the event loop; the model itself only runs on the model thread
(engine.py). The work a request causes is bounded before it is done: the body's JSON values are counted while
parsing (body.py), its parts and media are counted (and each video or sound bounded while it decodes,
serve/media.py), and its text is measured in characters before it is tokenized: a text of more characters than
`context × the longest token` cannot fit the context, so it is refused untokenized, and what is tokenized is at
most that long. An image generation request is bounded the same way, and by the images (`max_generated_images`)
and sampling steps (`max_image_steps`) it may ask for.
"""

from __future__ import annotations

import base64
import io
import os
import secrets
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..chat import prompt_ids
from ..data.conversation import ConversationError
from ..data.fbank import FbankConfig
from ..data.media import VideoLimits, normalize_videos
from ..data.transforms import ImageProcessor, PreprocessConfig
from ..formats import load, load_preprocess, load_tokenizer
from ..image_generation import to_uint8
from ..quant import is_quantized
from .body import parse
from .engine import (ContinuousWorker, EmbeddingJob, GenerationJob, ImageJob, Worker, run_embeddings,
                     run_generation, run_images)
from .errors import APIError
from .images import ImageLoader
from .media import AudioReader, VideoReader
from .schemas import (ChatCompletionRequest, ClassifyRequest, EmbeddingRequest, ImageGenerationRequest, ImageURL,
                      VideoURL, refuse_unsupported)

MIN_TEMPERATURE = 1e-4  # below it sampling is greedy: logits / 1e-300 overflow, and the softmax is NaN
ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/embeddings": EmbeddingRequest,
             "/v1/classify": ClassifyRequest, "/v1/images/generations": ImageGenerationRequest}
# which model kinds serve each endpoint
SERVED_BY = {"/v1/chat/completions": ("llava", "lm"), "/v1/embeddings": ("clip",), "/v1/classify": ("clip",),
             "/v1/images/generations": ("text-to-image",)}
MEDIA = ("image", "video", "audio")  # what a CLIP-style model may read besides text: encode_image, _video, _audio
PART_MEDIA = {"image_url": "image", "video_url": "video", "input_audio": "audio"}  # content part type -> medium
PLURALS = {"image": "images", "video": "videos", "audio": "audio clips"}  # as error messages and codes name them
CLASSIFY_TEMPLATES = {"image": "a photo of a {}.", "video": "a video of {}.", "audio": "the sound of {}."}


@dataclass
class ServeConfig:
    """Operator settings: limits, image sources, queueing, access. docs/serving.md lists them with their flags."""

    name: str | None = None  # model id clients use (default: from the path, see `model_id`)
    template: str | None = None  # LLaVA conversation template (default vicuna_v1)
    max_body_bytes: int = 20 * 1024 * 1024
    max_json_values: int = 20_000  # JSON values (objects, arrays, strings, numbers) in one body
    max_parts: int = 1024  # content parts of all messages of one chat request
    max_text_chars: int | None = None  # text characters per request (default: the most that can fit the context)
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # decoded size; larger headers are refused before decoding
    max_images: int = 4  # per request
    max_video_bytes: int = 10 * 1024 * 1024
    max_video_frames: int = 900  # decoded frames of one video, counted while decoding
    max_video_pixels: int = 1280 * 720  # one frame's size, from the header and every decoded frame
    max_video_seconds: float = 120.0  # from the frames' timestamps, while decoding
    max_videos: int = 2  # per request
    max_audio_bytes: int = 10 * 1024 * 1024
    max_audio_seconds: float = 60.0  # from the header before decoding, and counted while decoding
    max_audio_clips: int = 4  # per request
    max_inputs: int = 256  # texts and media per embeddings request
    max_queue: int = 64  # requests waiting (from arrival until the model thread takes them) before 429
    prep_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # parsing, decoding, tokenizing
    batching: str = "continuous"  # generation: "continuous" (rows join and leave at every step) or "static"
    max_batch: int | None = None  # generation rows per batch (default: 32 continuous, 8 static)
    max_embed_batch: int = 64  # texts + images + video frames + audio clips per embedding batch
    timeout_s: float = 60.0  # per request, from its arrival: body, preparation, queueing and the answer
    body_timeout_s: float = 30.0  # the whole body must arrive within this (408 after)
    header_timeout_s: float = 10.0  # the request line and headers must arrive within this (connection closed)
    keep_alive_s: float = 15.0  # idle connections are kept this long between requests
    shutdown_timeout_s: float = 10.0  # on SIGTERM, requests in flight get this long before they are cut
    default_max_tokens: int = 256
    max_generated_images: int = 4  # images per image generation request (`n`)
    max_image_steps: int = 100  # sampling steps per image generation request (`steps`)
    default_image_steps: int | None = None  # when a request gives none (default: 50, at most max_image_steps)
    local_dir: str | None = None  # images may be read from files under this directory
    allow_remote: bool = False  # images may be fetched from http(s) URLs
    allow_private_remote: bool = False  # ... even from loopback, private and link-local addresses
    fetch_timeout_s: float = 10.0  # per remote image, everything included
    max_fetches: int = 16  # remote images fetched at once (more wait, within their request's deadline)
    api_key: str | None = None  # if set, /v1/* needs "Authorization: Bearer <key>"
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted without a key, besides localhost and IPs
    # "int8" / "int4": quantize the LM for faster decoding (mmlm.quantize); "auto": a Q4/Q8 GGUF at its own
    # precision on the CPU, anything else as loaded (formats.auto_weights); None / "none": as loaded
    weights: str | None = "auto"
    dtype: str | None = None  # load the weights in this dtype ("bf16", "fp16"; default float32), see mmlm.load
    device: str | None = None  # ... on this device ("cuda", "auto"; default cpu)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty: give a key, or none to serve without one")
        for name in ("max_generated_images", "max_image_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.default_image_steps is None:
            self.default_image_steps = min(50, self.max_image_steps)
        if not 1 <= self.default_image_steps <= self.max_image_steps:
            raise ValueError(f"default_image_steps {self.default_image_steps} must be from 1 to max_image_steps "
                             f"{self.max_image_steps}")


GENERIC_NAMES = {"final", "last", "latest", "best", "model", "checkpoint", "weights"}


def model_id(model_path: str | Path) -> str:
    """The model id by default: the path's name, or its run's name when the name says nothing.

    `runs/shapes/final` -> "shapes"; `runs/shapes/checkpoints/step-00000300` -> "shapes-step-300";
    `SmolLM2-135M.gguf` -> "SmolLM2-135M"; any other directory -> its name."""
    path = Path(os.path.abspath(model_path))
    if path.suffix.lower() == ".gguf":
        return path.stem
    step = re.fullmatch(r"step-0*(\d+)", path.name)
    if step and path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}-step-{step.group(1)}"
    if path.name.lower() in GENERIC_NAMES and path.parent.name:
        return path.parent.name
    return path.name or "model"


def longest_token(tokenizer: Any) -> int:
    """Characters in the vocabulary's longest token (special tokens included): no token covers more text."""
    return max(map(len, tokenizer.tokenizer.get_vocab(with_added_tokens=True)), default=1)


def model_kind(model: Any) -> str:
    if hasattr(model, "unet") and hasattr(model, "encode_prompt"):
        return "text-to-image"
    if hasattr(model, "encode_text") and any(hasattr(model, f"encode_{m}") for m in MEDIA):
        return "clip"
    if hasattr(model.config, "image_token_id"):
        return "llava"
    if hasattr(model, "new_cache"):
        return "lm"
    raise ValueError(f"cannot serve a {type(model).__name__}: expected a CLIP, a language model, a LLaVA or a "
                     "text-to-image model")


def _url(source: ImageURL | VideoURL | str) -> str:
    return source if isinstance(source, str) else source.url


def _source(item: Any, medium: str) -> Any:
    """Where an embeddings item's medium is: a URL (images, videos), or the InputAudio (base64 and format)."""
    if isinstance(item, str):
        return item
    return item.input_audio if medium == "audio" else _url(getattr(item, item.type))


def item_medium(item: Any) -> str:
    """What an embeddings input item is: "text", "image", "video" or "audio" (a data:image/... or data:video/...
    string is an image or a video)."""
    if isinstance(item, str):
        return next((m for m in ("image", "video") if item.startswith(f"data:{m}/")), "text")
    return PART_MEDIA.get(item.type, "text")


class Service:
    """One model, its tokenizer and preprocessing, and the worker thread that runs it."""

    def __init__(self, model_path: str | Path, config: ServeConfig | None = None, model: Any = None,
                 tokenizer: Any = None):
        self.config = cfg = config or ServeConfig()
        if model is None:  # a GGUF language model is read straight into the weights it runs with (int4 / int8)
            from ..formats import load_quantized_gguf

            model = load_quantized_gguf(model_path, cfg.weights, cfg.dtype, cfg.device)
        self.model = model if model is not None else load(model_path, dtype=cfg.dtype, device=cfg.device)
        self.kind = model_kind(self.model)
        if self.kind == "text-to-image":  # the pipeline holds its tokenizer: the one generate_image uses
            if tokenizer is not None:
                self.model.tokenizer = tokenizer
            if self.model.tokenizer is None:
                raise ValueError(f"{model_path}: this text-to-image model has no tokenizer")
            tokenizer = self.model.tokenizer
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        weights = None if is_quantized(self.model) else cfg.weights
        if weights == "auto" or weights == "none":
            from ..formats import auto_weights

            weights = None if self.kind in ("clip", "text-to-image") else auto_weights(weights, model_path, self.model)
        if weights:
            if self.kind in ("clip", "text-to-image"):
                what = "a CLIP" if self.kind == "clip" else "a text-to-image model"
                raise ValueError(f"--weights {weights} quantizes a language model; {model_path} is {what}")
            from ..quant import quantize

            quantize(self.model, weights)
        self.name = cfg.name or model_id(model_path)
        self.images = ImageLoader(cfg.max_image_bytes, cfg.max_image_pixels, cfg.local_dir, cfg.allow_remote)
        self.processor = None
        # what the model reads besides text (a video CLIP reads images too: a video of one frame)
        mc = self.model.config
        if self.kind == "clip":
            self.media = tuple(m for m in MEDIA if hasattr(self.model, f"encode_{m}"))
        elif self.kind == "llava":  # images always; video and sound where the model has their towers
            self.media = ("image", *(m for m in ("video", "audio") if getattr(mc, m, None) is not None))
        else:
            self.media = ()
        if "image" in self.media:
            default = PreprocessConfig(image_size=mc.vision.image_size,
                                       mode="pad_square" if self.kind == "llava" else "resize_crop")
            found = load_preprocess(model_path) if Path(model_path).is_dir() else None
            self.processor = ImageProcessor(found or default, max_pixels=cfg.max_image_pixels)
        if "video" in self.media:  # the frames the model was trained on: that many spread over the clip
            limits = VideoLimits(cfg.max_video_frames, cfg.max_video_pixels, cfg.max_video_seconds)
            # a LLaVA's frames go to its video tower, sized as the video CLIP it came from saw them
            self.frames = (self.processor if self.kind == "clip" else
                           ImageProcessor(PreprocessConfig(image_size=mc.video.image_size), max_pixels=cfg.max_image_pixels))
            frames = mc.temporal.frames if self.kind == "clip" else mc.video_frames
            self.videos = VideoReader(self.images, self.frames, frames, cfg.max_video_bytes, limits)
        if "audio" in self.media:  # the features the model was trained and evaluated on
            self.audio = AudioReader(FbankConfig.for_tower(mc.audio), cfg.max_audio_bytes, cfg.max_audio_seconds)
        # a LLaVA is prompted with the template it was tuned with (saved in its config)
        self.template = cfg.template or (getattr(self.model.config, "template", "vicuna_v1")
                                         if self.kind == "llava" else "chat")
        # The most characters a text can have and still fit the context: each token covers at most
        # `longest_token` characters. (A chat template that trims messages, or CLIP's cleaning, which drops
        # repeated whitespace, could shrink a text padded with whitespace: it is refused all the same, as what
        # is tokenized must stay bounded.)
        if self.kind == "text-to-image":  # the prompt is framed in what both the tokenizer and the tower take
            self.context = min(self.tokenizer.context_length, self.model.config.text.context_length)
        elif self.kind == "clip":
            self.context = self.model.config.text.context_length
        else:
            self.context = self.model.max_seq_len
        self.max_text_chars = cfg.max_text_chars or self.context * longest_token(self.tokenizer)
        if self.kind == "text-to-image":
            self.worker = Worker(lambda jobs: run_images(self.model, jobs), cfg.max_queue, 1)
        elif self.kind == "clip":
            self.worker = Worker(lambda jobs: run_embeddings(self.model, self.tokenizer, jobs), cfg.max_queue,
                                 cfg.max_embed_batch)
        elif cfg.batching == "continuous":  # a short request never waits for a long one: a larger batch costs it little
            self.worker = ContinuousWorker(self.model, self.tokenizer, cfg.max_queue, cfg.max_batch or 32)
        elif cfg.batching in ("static", "continuous"):  # a batch lasts as long as its longest answer
            self.worker = Worker(lambda jobs: run_generation(self.model, self.tokenizer, jobs), cfg.max_queue,
                                 cfg.max_batch or 8)
        else:
            raise ValueError(f"batching {cfg.batching!r}: expected 'continuous' or 'static'")

    def close(self) -> None:
        self.worker.close()

    # --- checks shared by the endpoints ---------------------------------------------------------

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {self.name!r}",
                           "model_not_found", "model")

    def require(self, *kinds: str, endpoint: str) -> None:
        if self.kind not in kinds:
            what = {"clip": "a CLIP model (embeddings, classify)", "llava": "a LLaVA model (chat)",
                    "lm": "a language model (chat)",
                    "text-to-image": "a text-to-image model (images/generations)"}[self.kind]
            raise APIError(400, f"{endpoint} is not available: this server runs {what}", "unsupported_endpoint")

    def check_endpoint(self, endpoint: str) -> None:
        """Before the body is read: whether this model serves `endpoint` at all."""
        self.require(*SERVED_BY[endpoint], endpoint=endpoint)

    def parse(self, endpoint: str, body: bytes) -> Any:
        """The body as the endpoint's request (bounded, strict), its model and its OpenAI fields checked."""
        req = parse(body, ENDPOINTS[endpoint], self.config.max_json_values)
        self.check_model(req.model)
        if isinstance(req, ChatCompletionRequest):
            refuse_unsupported(req)
        return req

    def remote_media(self, req: Any) -> list[tuple[str, str, int]]:
        """(param, url, most bytes) of the http(s) images and videos the request may read (the first `max_images`
        images and `max_videos` videos, of the media the model reads): what to fetch."""
        if isinstance(req, ImageGenerationRequest):
            return []
        if isinstance(req, ChatCompletionRequest):
            if self.kind != "llava":
                return []
            found = [(PART_MEDIA[part.type], f"messages.{i}.content.{j}.{part.type}", _url(getattr(part, part.type)))
                     for i, m in enumerate(req.messages) if isinstance(m.content, list)
                     for j, part in enumerate(m.content) if part.type in ("image_url", "video_url")]
        elif isinstance(req, EmbeddingRequest):
            items = [] if isinstance(req.input, str) else req.input  # a string is a text, or a data: URI
            found = [(medium, self.media_param(i, item), _source(item, medium))
                     for i, item in enumerate(items) if (medium := item_medium(item)) in ("image", "video")]
        else:
            found = [(medium, medium, _url(getattr(req, medium))) for medium in ("image", "video")
                     if getattr(req, medium) is not None]
        most = {"image": (self.config.max_images, self.config.max_image_bytes),
                "video": (self.config.max_videos, self.config.max_video_bytes)}
        wanted = []
        for medium in ("image", "video"):
            if medium in self.media:
                count, max_bytes = most[medium]
                wanted += [(param, url, max_bytes) for m, param, url in found if m == medium][:count]
        return [(param, url, max_bytes) for param, url, max_bytes in wanted if ImageLoader.is_remote(url)]

    @staticmethod
    def media_param(i: int, item: Any) -> str:
        """The field an embeddings item's media errors name: `input.2` (an image, a data: string), or the part's
        field holding the data (`input.2.video_url`, `input.2.input_audio`)."""
        if isinstance(item, str) or item_medium(item) == "image":
            return f"input.{i}"
        return f"input.{i}.{item.type}"

    def check_chars(self, n: int, param: str) -> None:
        """Refuse, untokenized, a text too long to fit the context."""
        if n > self.max_text_chars:
            raise APIError(400, f"{param}: {n} characters of text, more than fit this model's context of "
                                f"{self.context} tokens (at most {self.max_text_chars} characters)",
                           "context_length_exceeded", param)

    def job(self, endpoint: str, req: Any, fetched: Mapping[str, bytes] | None = None) -> Any:
        builder = {"/v1/chat/completions": self.chat_job, "/v1/embeddings": self.embedding_job,
                   "/v1/classify": self.classify_job, "/v1/images/generations": self.image_job}[endpoint]
        return builder(req, fetched or {})

    # --- chat -----------------------------------------------------------------------------------

    def chat_job(self, req: ChatCompletionRequest, fetched: Mapping[str, bytes] | None = None) -> GenerationJob:
        """Messages -> prompt ids (+ images, videos, sounds) with every limit checked; raises APIError naming the
        field."""
        self.check_model(req.model)
        self.require("llava", "lm", endpoint="/v1/chat/completions")
        parts = sum(len(m.content) for m in req.messages if isinstance(m.content, list))
        if parts > self.config.max_parts:
            raise APIError(400, f"messages: {parts} content parts, more than the limit of {self.config.max_parts}",
                           "too_many_parts", "messages")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
            raise APIError(400, "stop: at most 4 non-empty strings of at most 256 characters", "invalid_value",
                           "stop")
        messages = []
        sources: dict[str, list[tuple[Any, str]]] = {"image": [], "video": [], "audio": []}
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            if m.content is None or isinstance(m.content, str):
                messages.append({"role": role, "content": m.content or ""})
                continue
            pieces = []
            for j, part in enumerate(m.content):
                if part.type == "text":
                    pieces.append(part.text)
                    continue
                medium, param = PART_MEDIA[part.type], f"messages.{i}.content.{j}.{part.type}"
                plural = PLURALS[medium]
                if self.kind != "llava":
                    raise APIError(400, f"{param}: this model takes no {plural} (serve a LLaVA model to chat about "
                                        f"{plural})", f"{plural.split()[0]}_not_supported", param)
                if medium != "image":
                    self.check_medium(medium, param, len(sources[medium]))  # a LLaVA without that tower, or too many
                if role != "user":
                    raise APIError(400, f"{param}: {plural} go in user messages", "invalid_value", param)
                if medium == "image" and len(sources["image"]) >= self.config.max_images:
                    raise APIError(400, f"{param}: more than {self.config.max_images} images in one request",
                                   "too_many_images", param)
                sources[medium].append((part.input_audio if medium == "audio" else _url(getattr(part, part.type)), param))
                pieces.append(f"<{medium}>")
            messages.append({"role": role, "content": "\n".join(pieces)})
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        images = [self.images.load(url, param, fetched) for url, param in sources["image"]]
        ids = self._prompt_ids(messages, len(images), {f"<{k}>": len(v) for k, v in sources.items() if k != "image"})
        pixel_values = self.processor(images) if images else None
        videos, audios = (self.media_values(k, sources[k], fetched) if sources[k] else None for k in ("video", "audio"))
        max_tokens = self._max_tokens(len(ids), req.max_completion_tokens or req.max_tokens)
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        top_p = 1.0 if req.top_p is None else req.top_p
        return GenerationJob(ids, pixel_values, max_tokens, temperature, top_p, req.seed, stop, self.model.max_seq_len,
                             videos, audios)

    def _prompt_ids(self, messages: list[dict[str, str]], n_images: int, n_media: dict[str, int] | None = None
                    ) -> list[int]:
        if self.kind != "llava" and not self.tokenizer.chat_template:
            raise APIError(400, "this model's tokenizer has no chat template, so it cannot chat", "no_chat_template")
        try:
            return prompt_ids(self.model, self.tokenizer, messages, self.template,
                              n_images=n_images if self.kind == "llava" else None, n_media=n_media)
        except ConversationError as e:
            raise APIError(400, str(e), "invalid_messages", "messages") from None
        except APIError:
            raise
        except Exception as e:  # the chat template (a Jinja program) refused these messages
            raise APIError(400, f"messages: the chat template cannot render them: {e}", "invalid_messages",
                           "messages") from None

    def _max_tokens(self, prompt: int, requested: int | None) -> int:
        context = self.model.max_seq_len
        if prompt >= context or (requested is not None and prompt + requested > context):
            want = f", plus {requested} for the completion" if requested is not None else ""
            raise APIError(400, f"this model's maximum context length is {context} tokens; the messages take "
                                f"{prompt} tokens{want}: shorten the messages or ask for fewer tokens",
                           "context_length_exceeded", "messages")
        return requested if requested is not None else min(self.config.default_max_tokens, context - prompt)

    # --- embeddings and zero-shot ---------------------------------------------------------------

    def embedding_job(self, req: EmbeddingRequest, fetched: Mapping[str, bytes] | None = None
                      ) -> tuple[EmbeddingJob, int]:
        """Texts and media to embed, as one job; also the number of text tokens (usage)."""
        self.check_model(req.model)
        self.require("clip", endpoint="/v1/embeddings")
        items = [req.input] if isinstance(req.input, str) else req.input
        if not items:
            raise APIError(400, "input: give at least one text or medium", "invalid_value", "input")
        if len(items) > self.config.max_inputs:
            raise APIError(400, f"input: {len(items)} items, more than the limit of {self.config.max_inputs}",
                           "too_many_inputs", "input")
        dim = self.model.config.embed_dim
        if req.dimensions is not None and req.dimensions != dim:
            raise APIError(400, f"dimensions: this model's embeddings have {dim} dimensions", "invalid_value",
                           "dimensions")
        texts, text_params, order = [], [], []  # order: (medium, its index among that medium's items) per item
        parts: dict[str, list[tuple[Any, str]]] = {m: [] for m in MEDIA}  # medium -> (item, param)
        for i, item in enumerate(items):
            medium = item_medium(item)
            if medium == "text":
                texts.append(item if isinstance(item, str) else item.text)
                text_params.append(f"input.{i}")
                order.append(("text", len(texts) - 1))
                continue
            self.check_medium(medium, f"input.{i}", len(parts[medium]))
            parts[medium].append((_source(item, medium), self.media_param(i, item)))
            order.append((medium, len(parts[medium]) - 1))
        for text, param in zip(texts, text_params):
            self.check_chars(len(text), param)
        media = {m: self.media_values(m, found, fetched) for m, found in parts.items() if found}
        tokens = self._count_text_tokens(texts, text_params)
        base64_out = req.encoding_format == "base64"

        def finish(text_embeds: torch.Tensor, media_embeds: dict[str, torch.Tensor]) -> list[Any]:
            embeds = {m: e.cpu() for m, e in media_embeds.items()} | {"text": text_embeds.cpu()}  # from the device
            rows = [embeds[medium][k].numpy() for medium, k in order]
            if base64_out:
                return [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in rows]
            return [r.astype(np.float64).round(7).tolist() for r in rows]

        return EmbeddingJob(texts, media, finish), tokens

    def check_medium(self, medium: str, param: str, already: int) -> None:
        """400 naming `param` when the model cannot read `medium`, or the request holds too many of it already."""
        plural = PLURALS[medium]
        if medium not in self.media:
            reads = ", ".join(["texts", *(PLURALS[m] for m in self.media)])
            article = "a" if medium == "video" else "an"
            which = f"a LLaVA with {article} {medium} tower" if self.kind == "llava" else f"{article} {medium} CLIP"
            raise APIError(400, f"{param}: this model reads {reads}, not {plural} ({which} does)",
                           f"{plural.split()[0]}_not_supported", param)
        most = {"image": self.config.max_images, "video": self.config.max_videos,
                "audio": self.config.max_audio_clips}[medium]
        if already >= most:
            raise APIError(400, f"{param}: more than {most} {plural} in one request",
                           f"too_many_{plural.replace(' ', '_')}", param)

    def media_values(self, medium: str, sources: list[tuple[Any, str]], fetched: Mapping[str, bytes] | None
                     ) -> torch.Tensor:
        """Sources of one medium (a URL, or an InputAudio), each with its param, decoded into the encoder's
        input: pixel_values (N, C, H, W), video_values (N, T, C, H, W) or audio_values (N, T, F)."""
        if medium == "image":
            return self.processor([self.images.load(url, param, fetched) for url, param in sources])
        if medium == "video":
            frames = [self.videos.load(url, param, fetched) for url, param in sources]  # each uint8 (T, S, S, 3)
            return normalize_videos(torch.from_numpy(np.stack(frames)), self.frames)
        clips = [self.audio.load(a.data, a.format, param) for a, param in sources]  # each (T, F)
        return torch.from_numpy(np.stack(clips))

    def _count_text_tokens(self, texts: list[str], params: list[str]) -> int:
        context = self.model.config.text.context_length
        framed = 2 if self.tokenizer.sot_id is not None else 1
        total = 0
        for ids, param in zip(self.tokenizer.encode_batch(texts) if texts else [], params):
            if len(ids) + framed > context:
                raise APIError(400, f"{param}: {len(ids) + framed} tokens, more than this model's text context of "
                                    f"{context}", "context_length_exceeded", param)
            total += len(ids) + framed
        return total

    def classify_job(self, req: ClassifyRequest, fetched: Mapping[str, bytes] | None = None) -> EmbeddingJob:
        """One image, video or audio clip and candidate labels -> probabilities (softmax over the scaled cosine
        similarities)."""
        self.check_model(req.model)
        self.require("clip", endpoint="/v1/classify")
        given = [m for m in MEDIA if getattr(req, m) is not None]
        if len(given) != 1:
            raise APIError(400, f"{' and '.join(given) or 'image'}: give exactly one of image, video and audio",
                           "invalid_value", given[-1] if given else "image")
        medium = given[0]
        self.check_medium(medium, medium, 0)
        template = CLASSIFY_TEMPLATES[medium] if req.template is None else req.template
        if template.count("{}") != 1:
            raise APIError(400, "template: needs exactly one {} where the label goes", "invalid_value", "template")
        self.check_chars(len(template), "template")  # first: each prompt then holds one copy of it
        prompts = [template.replace("{}", label) for label in req.labels]
        for i, prompt in enumerate(prompts):
            self.check_chars(len(prompt), f"labels.{i}")
        self._count_text_tokens(prompts, [f"labels.{i}" for i in range(len(prompts))])
        source = req.audio if medium == "audio" else _url(getattr(req, medium))
        values = self.media_values(medium, [(source, medium)], fetched)
        labels, model = list(req.labels), self.model

        def finish(text_embeds: torch.Tensor, media_embeds: dict[str, torch.Tensor]) -> dict[str, Any]:
            logits = model.logits(media_embeds[medium], text_embeds)[0].float()  # (labels,)
            probs = logits.softmax(dim=-1)
            return {"labels": labels, "probabilities": probs.tolist(), "logits": logits.tolist()}

        return EmbeddingJob(prompts, {medium: values}, finish)

    # --- image generation -----------------------------------------------------------------------

    def native_size(self) -> str:
        size = self.model.config.image_size
        return f"{size}x{size}"

    def _check_prompt(self, text: str, param: str, allow_empty: bool = False) -> None:
        """A prompt that fits the text tower: measured in characters first, then in tokens (never cut)."""
        if not allow_empty and not text.strip():
            raise APIError(400, f"{param}: the prompt is empty", "invalid_value", param)
        self.check_chars(len(text), param)
        framed = len(self.tokenizer.encode(text)) + (2 if self.tokenizer.sot_id is not None else 1)
        if framed > self.context:
            raise APIError(400, f"{param}: {framed} tokens, more than this model's text context of {self.context}",
                           "context_length_exceeded", param)

    def image_job(self, req: ImageGenerationRequest, fetched: Mapping[str, bytes] | None = None) -> ImageJob:
        """A prompt and sampling settings -> one job making `n` PNGs; every limit checked, naming the field."""
        self.check_model(req.model)
        self.require("text-to-image", endpoint="/v1/images/generations")
        cfg = self.config
        if req.response_format not in (None, "b64_json"):
            raise APIError(400, f"response_format: only \"b64_json\" is supported (this server hosts no images to "
                                f"link to), got {req.response_format!r}", "unsupported_parameter", "response_format")
        native = self.native_size()
        if req.size not in (None, native):
            raise APIError(400, f"size: this model draws {native} images, got {req.size!r}", "invalid_value", "size")
        n = 1 if req.n is None else req.n
        if n > cfg.max_generated_images:
            raise APIError(400, f"n: {n} images, more than the limit of {cfg.max_generated_images}", "invalid_value",
                           "n")
        steps = cfg.default_image_steps if req.steps is None else req.steps
        if steps > cfg.max_image_steps:
            raise APIError(400, f"steps: {steps} sampling steps, more than the limit of {cfg.max_image_steps}",
                           "invalid_value", "steps")
        self._check_prompt(req.prompt, "prompt")
        negative = req.negative_prompt or ""
        if negative:
            self._check_prompt(negative, "negative_prompt", allow_empty=True)
        settings = {"prompts": [req.prompt] * n, "steps": steps, "scheduler": req.scheduler or "ddim",
                    "guidance": req.guidance_scale,  # None: the model's own scale
                    "seed": secrets.randbits(63) if req.seed is None else req.seed, "negative_prompt": negative}

        def finish(images: torch.Tensor) -> list[str]:
            from PIL import Image

            out = []
            for a in to_uint8(images):  # (H, W, 3)
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, "PNG")
                out.append(base64.b64encode(buf.getvalue()).decode())
            return out

        return ImageJob(settings, finish)
