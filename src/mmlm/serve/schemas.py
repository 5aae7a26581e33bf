"""Request bodies of the API, as pydantic models (they also make the OpenAPI schema the fuzzer reads).

Types are strict (`max_tokens: true` is refused, not taken as 1). Unknown fields are ignored, as
OpenAI-compatible servers do, so newer clients keep working; OpenAI's fields that this server does not
implement (tools, JSON output, log-probabilities, penalties, ...) are declared, and refused with a 400 naming
them (`unsupported`) unless they ask for the default. Image generation is the exception: an unknown field
there (a quality or style this server cannot give) is refused, naming it, rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ImageURL(_Body):
    url: str = Field(max_length=64 * 1024 * 1024, description="a data: URI (base64), or a file path / URL if allowed")
    detail: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class VideoURL(_Body):
    url: str = Field(max_length=64 * 1024 * 1024,
                     description="a data:video/...;base64 URI, or a file path / URL if allowed")


class VideoPart(_Body):
    """vLLM's video part."""

    type: Literal["video_url"]
    video_url: Union[VideoURL, str]


class InputAudio(_Body):
    data: str = Field(max_length=64 * 1024 * 1024, description="the audio file, base64")
    format: str = Field(description="wav, flac, ogg or mp3")


class AudioPart(_Body):
    """OpenAI's audio part (chat completions' `input_audio`)."""

    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart, AudioPart], Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**63)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(1, ge=1, le=1, description="only 1 is supported")
    # OpenAI's fields this server does not implement: accepted only when they ask for the default
    tools: Optional[list[Any]] = Field(None, description="not supported: absent, null or []")
    tool_choice: Union[str, dict[str, Any], None] = Field(None, description='not supported: absent or "none"')
    functions: Optional[list[Any]] = Field(None, description="not supported: absent, null or []")
    function_call: Union[str, dict[str, Any], None] = Field(None, description='not supported: absent or "none"')
    response_format: Optional[dict[str, Any]] = Field(None, description='only {"type": "text"}')
    logprobs: Optional[bool] = Field(None, description="only false")
    top_logprobs: Optional[int] = Field(None, description="only 0")
    logit_bias: Optional[dict[str, Any]] = Field(None, description="only {}")
    presence_penalty: Optional[float] = Field(None, description="only 0")
    frequency_penalty: Optional[float] = Field(None, description="only 0")
    modalities: Optional[list[str]] = Field(None, description='only ["text"]')
    audio: Optional[dict[str, Any]] = Field(None, description="not supported")
    prediction: Optional[dict[str, Any]] = Field(None, description="not supported")
    web_search_options: Optional[dict[str, Any]] = Field(None, description="not supported")


# field -> (whether the value asks for what this server does anyway, what it accepts)
_DEFAULTS = {
    "tools": (lambda v: not v, "tool calling is not supported"),
    "tool_choice": (lambda v: v in (None, "none"), 'tool calling is not supported (only "none")'),
    "functions": (lambda v: not v, "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none"), 'function calling is not supported (only "none")'),
    "response_format": (lambda v: v is None or v == {"type": "text"}, 'only {"type": "text"} is supported'),
    "logprobs": (lambda v: not v, "log-probabilities are not supported"),
    "top_logprobs": (lambda v: not v, "log-probabilities are not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "presence_penalty": (lambda v: not v, "penalties are not supported (only 0)"),
    "frequency_penalty": (lambda v: not v, "penalties are not supported (only 0)"),
    "modalities": (lambda v: v is None or v == ["text"], 'only ["text"] is supported'),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
}


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """400 naming the first field that asks for something this server does not do."""
    for name, (is_default, what) in _DEFAULTS.items():
        if not is_default(getattr(req, name)):
            raise APIError(400, f"{name}: {what}", "unsupported_parameter", name)


class EmbeddingImage(_Body):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


EmbeddingVideo, EmbeddingAudio = VideoPart, AudioPart  # the same parts in an embeddings input


class EmbeddingText(_Body):
    type: Literal["text"]
    text: str


EmbeddingItem = Union[str, Annotated[Union[EmbeddingText, EmbeddingImage, EmbeddingVideo, EmbeddingAudio],
                                     Field(discriminator="type")]]


class EmbeddingRequest(_Body):
    model: Optional[str] = None
    input: Union[str, list[EmbeddingItem]] = Field(
        description="text, or a list of texts and media the model reads: images ({type: image_url, image_url: "
                    "{url}}), videos ({type: video_url, video_url: {url}}), audio ({type: input_audio, input_audio: "
                    "{data, format}}); a string that is a data:image/... (data:video/...) URI is an image (a video)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None


class ClassifyRequest(_Body):
    """One image, video or audio clip (exactly one of the three fields) and candidate labels."""

    model: Optional[str] = None
    image: Union[ImageURL, str, None] = Field(None, description="an image: a data: URI (or a file path / URL if "
                                                                "allowed)")
    video: Union[VideoURL, str, None] = Field(None, description="a video (a video CLIP): a data: URI (or a file "
                                                                "path / URL if allowed)")
    audio: Optional[InputAudio] = Field(None, description="an audio clip (an audio CLIP): base64 data and format")
    labels: list[str] = Field(min_length=1, max_length=1000, description="candidate class names")
    template: Optional[str] = Field(None, description='prompt with {} where the label goes (default: "a photo of '
                                                      'a {}.", "a video of {}." or "the sound of {}.")')


class ImageGenerationRequest(_Body):
    """OpenAI's images API (`/v1/images/generations`) plus mmlm's sampling settings. Limits that the operator
    sets (`n`, `steps`) are checked by the service against ServeConfig."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = None
    prompt: str = Field(description="what to draw; it must fit the text tower's context")
    n: Optional[int] = Field(1, ge=1, description="images to generate (at most the server's max_generated_images)")
    size: Optional[str] = Field(None, description='"WxH": only the model\'s native size (default)')
    response_format: Optional[str] = Field("b64_json", description='only "b64_json" (PNG); nothing is hosted for "url"')
    user: Optional[str] = None
    steps: Optional[int] = Field(None, ge=1, description="sampling steps (mmlm; at most the server's max_image_steps)")
    guidance_scale: Optional[float] = Field(None, ge=0, le=100, allow_inf_nan=False,
                                            description="classifier-free guidance (mmlm; <= 1 turns it off)")
    seed: Optional[int] = Field(None, ge=0, lt=2**63, description="the same seed and settings give the same images")
    scheduler: Optional[Literal["ddim", "euler", "ddpm"]] = Field(None, description="the sampler (mmlm)")
    negative_prompt: Optional[str] = Field(None, description="what guidance steers away from (mmlm)")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
