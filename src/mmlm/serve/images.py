"""Images named in requests -> decoded RGB PIL images, under the operator's limits.

Three sources: `data:` URIs (base64), local files (only under a directory the operator allows), and
http(s) URLs (refused unless the operator allows them; fetched beforehand on the event loop by fetch.py, and
handed in as bytes). Every refusal is an APIError naming the field. Decoding goes through `load_image`, which
refuses decompression bombs from the header.
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


def _too_large(n: int, limit: int, param: str) -> APIError:
    return APIError(413, f"{param}: the image is {n} bytes, more than the limit of {limit}", "image_too_large", param)


def decode_data_uri(url: str, max_bytes: int, param: str) -> bytes:
    head, comma, payload = url.partition(",")
    if not comma or not head.startswith("data:"):
        raise APIError(400, f"{param}: a data URI must look like data:image/png;base64,<data>", "invalid_image_url", param)
    if not head.endswith(";base64"):
        raise APIError(400, f"{param}: only base64 data URIs are supported", "invalid_image_url", param)
    if len(payload) * 3 // 4 > max_bytes + 3:  # refuse before decoding
        raise _too_large(len(payload) * 3 // 4, max_bytes, param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URI is not valid base64", "invalid_base64", param) from None
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, param)
    return data


def read_local_file(url: str, root: Path | None, max_bytes: int, param: str) -> bytes:
    if root is None:
        raise APIError(400, f"{param}: local files are not allowed on this server (start it with --allow-local-dir)",
                       "image_source_not_allowed", param)
    path = Path(unquote(urlparse(url).path) if url.startswith("file:") else url)
    if "\0" in str(path):
        raise APIError(400, f"{param}: a file path cannot hold a NUL character", "invalid_image_url", param)
    try:
        resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
        if not resolved.is_relative_to(root):
            raise APIError(400, f"{param}: the path is outside the allowed directory", "image_source_not_allowed",
                           param)
        if not resolved.is_file():
            raise APIError(400, f"{param}: no such file in the allowed directory", "image_not_found", param)
        size = os.path.getsize(resolved)
        if size > max_bytes:
            raise _too_large(size, max_bytes, param)
        return resolved.read_bytes()
    except OSError:  # a name too long, a loop of links, a file that went away, no permission
        raise APIError(400, f"{param}: the file cannot be read", "image_not_found", param) from None


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

    def read_bytes(self, url: str, param: str, fetched: Mapping[str, bytes] | None = None) -> bytes:
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{param}: an image URL is required", "invalid_image_url", param)
        scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
        if scheme == "data":
            return decode_data_uri(url, self.max_bytes, param)
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise APIError(400, f"{param}: remote image URLs are not allowed on this server; send a data: URI",
                               "image_source_not_allowed", param)
            if fetched is None or param not in fetched:
                raise RuntimeError(f"{param}: a remote image must be fetched before the request is prepared")
            return fetched[param]
        if scheme in ("file", "") or len(scheme) == 1:  # a path (len 1: a Windows drive letter)
            return read_local_file(url, self.local_dir, self.max_bytes, param)
        raise APIError(400, f"{param}: unsupported URL scheme {scheme!r} (use data:, or file paths if allowed)",
                       "invalid_image_url", param)

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
