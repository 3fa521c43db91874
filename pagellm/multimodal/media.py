"""Images from what users send: PIL images, raw bytes, and the URLs of the OpenAI API's image_url parts.

    data:image/png;base64,...   decoded in place
    http(s)://...               fetched (PAGELLM_IMAGE_FETCH_TIMEOUT seconds, default 5, as vLLM's)
    file:///path                read only under --allowed-local-media-path
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class MediaError(ValueError):
    """An image that cannot be loaded; the message says which and why (a 400 in the server)."""


def load_image(source: Any, allowed_local_media_path: str | None = None):
    """An RGB PIL image, or MediaError."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), "the image bytes")
    if not isinstance(source, str):
        raise MediaError(f"an image must be a PIL image, bytes or a URL string, got {type(source).__name__}.")
    scheme = source.split(":", 1)[0].lower() if ":" in source else ""
    if scheme == "data":
        header, _, payload = source.partition(",")
        if not header.endswith(";base64") or not payload:
            raise MediaError("a data URL image must be base64: data:image/<format>;base64,<data>.")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("the data URL's image is not valid base64.") from None
        return _decode(raw, "the data URL's image")
    if scheme in ("http", "https"):
        timeout = float(os.environ.get("PAGELLM_IMAGE_FETCH_TIMEOUT", "5"))
        try:
            with urllib.request.urlopen(source, timeout=timeout) as r:  # noqa: S310 - http(s) only
                raw = r.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise MediaError(f"cannot fetch the image {source[:200]!r}: {e}") from None
        return _decode(raw, f"the image at {source[:200]!r}")
    if scheme == "file":
        if allowed_local_media_path is None:
            raise MediaError("file:// image URLs are refused: the server reads local files only under "
                             "--allowed-local-media-path.")
        path = os.path.realpath(urllib.parse.unquote(urllib.parse.urlparse(source).path))
        if os.path.commonpath([path, allowed_local_media_path]) != allowed_local_media_path:
            raise MediaError(f"the file {path!r} is outside --allowed-local-media-path ({allowed_local_media_path}).")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise MediaError(f"cannot read the image file {path!r}: {e.strerror}.") from None
        return _decode(raw, f"the image file {path!r}")
    raise MediaError(f"unsupported image URL {source[:100]!r}: use a data:, http(s):// or file:// URL.")


def _decode(raw: bytes, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise MediaError(f"{what} is not an image pagellm can decode: {e}") from None
    return img.convert("RGB")
