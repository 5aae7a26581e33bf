"""Request bodies of the API, as pydantic models (they also make the OpenAPI schema the fuzzer reads).

Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str = Field(max_length=64 * 1024 * 1024, description="a data: URI (base64), or a file path / URL if allowed")
    detail: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


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


class EmbeddingImage(_Body):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class EmbeddingText(_Body):
    type: Literal["text"]
    text: str


EmbeddingItem = Union[str, Annotated[Union[EmbeddingText, EmbeddingImage], Field(discriminator="type")]]


class EmbeddingRequest(_Body):
    model: Optional[str] = None
    input: Union[str, list[EmbeddingItem]] = Field(
        description="text, or a list of texts and images ({type: image_url, image_url: {url}}); a string that is "
                    "a data:image/... URI is an image")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None


class ClassifyRequest(_Body):
    model: Optional[str] = None
    image: Union[ImageURL, str] = Field(description="the image: a data: URI (or a file path / URL if allowed)")
    labels: list[str] = Field(min_length=1, max_length=1000, description="candidate class names")
    template: str = Field("a photo of a {}.", description="prompt with {} where the label goes")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
