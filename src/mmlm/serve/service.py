"""The served model: loads it once, turns validated requests into jobs for the model thread.

Everything here is blocking (image decoding, tokenizing) and runs in a worker thread of the app, never on
the event loop; torch itself only runs on the model thread (engine.py).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..chat import prompt_ids
from ..data.conversation import IMAGE, ConversationError
from ..data.transforms import ImageProcessor, PreprocessConfig
from ..formats import load, load_preprocess, load_tokenizer
from .engine import EmbeddingJob, GenerationJob, Worker, run_embeddings, run_generation
from .errors import APIError
from .images import ImageLoader
from .schemas import ChatCompletionRequest, ClassifyRequest, EmbeddingRequest, ImageURL


@dataclass
class ServeConfig:
    """Operator settings: limits, image sources, queueing."""

    name: str | None = None  # model id clients use (default: the directory or file name)
    template: str | None = None  # LLaVA conversation template (default vicuna_v1)
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # decoded size; larger headers are refused before decoding
    max_images: int = 4  # per request
    max_inputs: int = 256  # texts + images per embeddings request
    max_queue: int = 64  # waiting requests before 429
    max_batch: int = 8  # generation rows per batch
    max_embed_batch: int = 64  # texts + images per embedding batch
    timeout_s: float = 60.0  # per request, queueing included
    default_max_tokens: int = 256
    local_dir: str | None = None  # images may be read from files under this directory
    allow_remote: bool = False  # images may be fetched from http(s) URLs
    api_key: str | None = None  # if set, /v1/* needs "Authorization: Bearer <key>"
    weights: str | None = None  # "int8" / "int4": quantize the LM for faster decoding (mmlm.quantize)


def model_kind(model: Any) -> str:
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        return "clip"
    if hasattr(model.config, "image_token_id"):
        return "llava"
    if hasattr(model, "new_cache"):
        return "lm"
    raise ValueError(f"cannot serve a {type(model).__name__}: expected a CLIP, a language model or a LLaVA")


def _url(image: ImageURL | str) -> str:
    return image if isinstance(image, str) else image.url


class Service:
    """One model, its tokenizer and preprocessing, and the worker thread that runs it."""

    def __init__(self, model_path: str | Path, config: ServeConfig | None = None, model: Any = None,
                 tokenizer: Any = None):
        self.config = cfg = config or ServeConfig()
        self.model = model if model is not None else load(model_path)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        self.kind = model_kind(self.model)
        if cfg.weights:
            if self.kind == "clip":
                raise ValueError(f"--weights {cfg.weights} quantizes a language model; {model_path} is a CLIP")
            from ..quant import quantize

            quantize(self.model, cfg.weights)
        self.name = cfg.name or Path(model_path).name
        self.images = ImageLoader(cfg.max_image_bytes, cfg.max_image_pixels, cfg.local_dir, cfg.allow_remote)
        self.processor = None
        if self.kind != "lm":
            default = PreprocessConfig(image_size=self.model.config.vision.image_size,
                                       mode="pad_square" if self.kind == "llava" else "resize_crop")
            found = load_preprocess(model_path) if Path(model_path).is_dir() else None
            self.processor = ImageProcessor(found or default, max_pixels=cfg.max_image_pixels)
        # a LLaVA is prompted with the template it was tuned with (saved in its config)
        self.template = cfg.template or (getattr(self.model.config, "template", "vicuna_v1")
                                         if self.kind == "llava" else "chat")
        if self.kind == "clip":
            self.worker = Worker(lambda jobs: run_embeddings(self.model, self.tokenizer, jobs), cfg.max_queue,
                                 cfg.max_embed_batch)
        else:
            self.worker = Worker(lambda jobs: run_generation(self.model, self.tokenizer, jobs), cfg.max_queue,
                                 cfg.max_batch)

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
                    "lm": "a language model (chat)"}[self.kind]
            raise APIError(400, f"{endpoint} is not available: this server runs {what}", "unsupported_endpoint")

    # --- chat -----------------------------------------------------------------------------------

    def chat_job(self, req: ChatCompletionRequest) -> GenerationJob:
        """Messages -> prompt ids (+ images) with every limit checked; raises APIError naming the field."""
        self.check_model(req.model)
        self.require("llava", "lm", endpoint="/v1/chat/completions")
        messages, images = [], []
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
                param = f"messages.{i}.content.{j}.image_url"
                if self.kind != "llava":
                    raise APIError(400, f"{param}: this model takes no images (serve a LLaVA model to chat about "
                                        "images)", "images_not_supported", param)
                if role != "user":
                    raise APIError(400, f"{param}: images go in user messages", "invalid_value", param)
                if len(images) >= self.config.max_images:
                    raise APIError(400, f"{param}: more than {self.config.max_images} images in one request",
                                   "too_many_images", param)
                images.append(self.images.load(_url(part.image_url), param))
                pieces.append(IMAGE)
            messages.append({"role": role, "content": "\n".join(pieces)})
        ids = self._prompt_ids(messages, len(images))
        pixel_values = self.processor(images) if images else None
        max_tokens = self._max_tokens(len(ids), req.max_completion_tokens or req.max_tokens)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: at most 4 non-empty strings", "invalid_value", "stop")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        return GenerationJob(ids, pixel_values, max_tokens, temperature, top_p, req.seed, stop, self.model.max_seq_len)

    def _prompt_ids(self, messages: list[dict[str, str]], n_images: int) -> list[int]:
        if self.kind != "llava" and not self.tokenizer.chat_template:
            raise APIError(400, "this model's tokenizer has no chat template, so it cannot chat", "no_chat_template")
        try:
            return prompt_ids(self.model, self.tokenizer, messages, self.template,
                              n_images=n_images if self.kind == "llava" else None)
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

    def embedding_job(self, req: EmbeddingRequest) -> tuple[EmbeddingJob, int]:
        """Texts and images to embed, as one job; also the number of text tokens (usage)."""
        self.check_model(req.model)
        self.require("clip", endpoint="/v1/embeddings")
        items = [req.input] if isinstance(req.input, str) else req.input
        if not items:
            raise APIError(400, "input: give at least one text or image", "invalid_value", "input")
        if len(items) > self.config.max_inputs:
            raise APIError(400, f"input: {len(items)} items, more than the limit of {self.config.max_inputs}",
                           "too_many_inputs", "input")
        dim = self.model.config.embed_dim
        if req.dimensions is not None and req.dimensions != dim:
            raise APIError(400, f"dimensions: this model's embeddings have {dim} dimensions", "invalid_value",
                           "dimensions")
        texts, images, order = [], [], []
        for i, item in enumerate(items):
            if isinstance(item, str) and not item.startswith("data:image/"):
                texts.append(item)
                order.append(("text", len(texts) - 1))
            elif getattr(item, "type", None) == "text":
                texts.append(item.text)
                order.append(("text", len(texts) - 1))
            else:
                if len(images) >= self.config.max_images:
                    raise APIError(400, f"input.{i}: more than {self.config.max_images} images in one request",
                                   "too_many_images", f"input.{i}")
                url = item if isinstance(item, str) else _url(item.image_url)
                images.append(self.images.load(url, f"input.{i}"))
                order.append(("image", len(images) - 1))
        tokens = self._count_text_tokens(texts, [f"input.{i}" for i, (k, _) in enumerate(order) if k == "text"])
        pixel_values = self.processor(images) if images else None
        base64_out = req.encoding_format == "base64"

        def finish(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> list[Any]:
            rows = [(text_embeds if kind == "text" else image_embeds)[k].numpy() for kind, k in order]
            if base64_out:
                return [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in rows]
            return [r.astype(np.float64).round(7).tolist() for r in rows]

        return EmbeddingJob(texts, pixel_values, finish), tokens

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

    def classify_job(self, req: ClassifyRequest) -> EmbeddingJob:
        """One image and candidate labels -> probabilities (softmax over the scaled cosine similarities)."""
        self.check_model(req.model)
        self.require("clip", endpoint="/v1/classify")
        if req.template.count("{}") != 1:
            raise APIError(400, "template: needs exactly one {} where the label goes", "invalid_value", "template")
        prompts = [req.template.replace("{}", label) for label in req.labels]
        self._count_text_tokens(prompts, [f"labels.{i}" for i in range(len(prompts))])
        pixel_values = self.processor([self.images.load(_url(req.image), "image")])
        labels, model = list(req.labels), self.model

        def finish(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> dict[str, Any]:
            logits = model.logits(image_embeds, text_embeds)[0].float()  # (labels,)
            probs = logits.softmax(dim=-1)
            return {"labels": labels, "probabilities": probs.tolist(), "logits": logits.tolist()}

        return EmbeddingJob(prompts, pixel_values, finish)
