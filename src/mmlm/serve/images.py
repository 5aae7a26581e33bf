"""Images named in requests -> decoded RGB PIL images, under the operator's limits.

Three sources: `data:` URIs (base64), local files (only under a directory the operator allows), and
http(s) URLs (refused unless the operator allows them; fetched beforehand on the event loop by fetch.py, and
handed in as bytes). Every refusal is an APIError naming the field. Decoding goes through `load_image`, which
refuses decompression bombs from the header. Videos come from the same three sources (`read_bytes(...,
kind="video")`, their own byte limit) and are decoded by serve/media.py.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote, urlparse

from PIL import Image

from ..data.transforms import BadImageError, load_image
from .errors import APIError


EXAMPLE_URIS = {"image": "data:image/png;base64,<data>", "video": "data:video/mp4;base64,<data>"}


def _too_large(n: int, limit: int, param: str, kind: str = "image") -> APIError:
    return APIError(413, f"{param}: the {kind} is {n} bytes, more than the limit of {limit}", f"{kind}_too_large",
                    param)


def decode_base64(payload: str, max_bytes: int, param: str, kind: str = "image") -> bytes:
    """Base64 text -> at most `max_bytes` bytes (the size is checked before decoding); APIError naming `param`."""
    if len(payload) * 3 // 4 > max_bytes + 3:  # refuse before decoding
        raise _too_large(len(payload) * 3 // 4, max_bytes, param, kind)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the {kind} data is not valid base64", "invalid_base64", param) from None
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, param, kind)
    return data


def decode_data_uri(url: str, max_bytes: int, param: str, kind: str = "image") -> bytes:
    head, comma, payload = url.partition(",")
    if not comma or not head.startswith("data:"):
        raise APIError(400, f"{param}: a data URI must look like {EXAMPLE_URIS[kind]}", f"invalid_{kind}_url", param)
    if not head.endswith(";base64"):
        raise APIError(400, f"{param}: only base64 data URIs are supported", f"invalid_{kind}_url", param)
    return decode_base64(payload, max_bytes, param, kind)


def read_local_file(url: str, root: Path | None, max_bytes: int, param: str, kind: str = "image") -> bytes:
    if root is None:
        raise APIError(400, f"{param}: local files are not allowed on this server (start it with --allow-local-dir)",
                       f"{kind}_source_not_allowed", param)
    path = Path(unquote(urlparse(url).path) if url.startswith("file:") else url)
    if "\0" in str(path):
        raise APIError(400, f"{param}: a file path cannot hold a NUL character", f"invalid_{kind}_url", param)
    try:
        resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
        if not resolved.is_relative_to(root):
            raise APIError(400, f"{param}: the path is outside the allowed directory", f"{kind}_source_not_allowed",
                           param)
        if not resolved.is_file():
            raise APIError(400, f"{param}: no such file in the allowed directory", f"{kind}_not_found", param)
        size = os.path.getsize(resolved)
        if size > max_bytes:
            raise _too_large(size, max_bytes, param, kind)
        return resolved.read_bytes()
    except OSError:  # a name too long, a loop of links, a file that went away, no permission
        raise APIError(400, f"{param}: the file cannot be read", f"{kind}_not_found", param) from None


class ImageLoader:
    """Resolves and decodes image URLs per the operator's policy (blocking: call it off the event loop)."""

    def __init__(self, max_bytes: int, max_pixels: int, local_dir: str | Path | None = None,
                 allow_remote: bool = False):
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.local_dir = Path(local_dir).resolve() if local_dir is not None else None
        self.allow_remote = allow_remote

    @staticmethod
    def is_remote(url: str) -> bool:
        return isinstance(url, str) and url[:8].lower().startswith(("http://", "https://"))

    def read_bytes(self, url: str, param: str, fetched: Mapping[str, bytes] | None = None,
                   max_bytes: int | None = None, kind: str = "image") -> bytes:
        """The bytes a URL names (a data: URI, an allowed file, or a fetched remote URL), at most `max_bytes`
        (default: the image limit); errors name `param` and say `kind` ("image", "video")."""
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{param}: a{'n' if kind == 'image' else ''} {kind} URL is required",
                           f"invalid_{kind}_url", param)
        scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
        if scheme == "data":
            return decode_data_uri(url, max_bytes, param, kind)
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise APIError(400, f"{param}: remote {kind} URLs are not allowed on this server; send a data: URI",
                               f"{kind}_source_not_allowed", param)
            if fetched is None or param not in fetched:
                raise RuntimeError(f"{param}: a remote {kind} must be fetched before the request is prepared")
            return fetched[param]
        if scheme in ("file", "") or len(scheme) == 1:  # a path (len 1: a Windows drive letter)
            return read_local_file(url, self.local_dir, max_bytes, param, kind)
        raise APIError(400, f"{param}: unsupported URL scheme {scheme!r} (use data:, or file paths if allowed)",
                       f"invalid_{kind}_url", param)

    def load(self, url: str, param: str, fetched: Mapping[str, bytes] | None = None) -> Image.Image:
        data = self.read_bytes(url, param, fetched)
        try:
            return load_image(io.BytesIO(data), max_pixels=self.max_pixels, name=param)
        except BadImageError as e:
            if "decompression bomb" in str(e):
                raise APIError(400, str(e), "image_too_large", param) from None
            # PIL's own words name the in-memory file by its repr (a heap address): say it plainly instead
            why = type(e.__cause__).__name__ if e.__cause__ is not None else "unreadable"
            raise APIError(400, f"{param}: the data is not an image that can be decoded ({why})", "invalid_image",
                           param) from None
