"""Encoding a generated image into the requested output format."""

from __future__ import annotations

import io

from fluxserve.contract import MEDIA_TYPES

_SAVE_OPTIONS = {
    "JPG": {"format": "JPEG", "quality": 95, "subsampling": 0},
    "PNG": {"format": "PNG", "compress_level": 6},
    "WEBP": {"format": "WEBP", "quality": 95, "method": 4},
}


def encode_image(image, output_format: str) -> tuple[bytes, str]:
    """(bytes, media type) for a PIL image; deterministic for the same pixels."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, **_SAVE_OPTIONS[output_format])
    return buffer.getvalue(), MEDIA_TYPES[output_format]
