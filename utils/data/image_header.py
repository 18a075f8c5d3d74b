"""Image dimensions read from the header, before any pixel is decoded: the guard against decompression bombs.

A JPEG of a kilobyte can claim 30000 x 30000 pixels; decoding it takes seconds and gigabytes. The JPEG, PNG and
BMP headers state width and height in their first bytes (JPEG: the start-of-frame segment after the tables), so a
claim above the limit is refused at the cost of reading those bytes. Other formats are refused: the training
images, RFW and the ``.bin`` benchmarks are JPEG or PNG, and an unknown format would be decoded unchecked.
"""
from __future__ import annotations

import struct

import numpy as np

from utils.core.errors import InvalidInputError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are other segments.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7 (SOI and EOI do not occur before the frame).
_JPEG_BARE = frozenset([0x01, *range(0xD0, 0xD8)])


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_BARE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_FRAMES:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        pos += 2 + length
    return None


def header_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) that a JPEG, PNG or BMP header states; None when the header is of another format or cut
    short."""
    head = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    if head[:8] == _PNG_SIGNATURE and len(head) >= 24 and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    if head[:2] == b"BM" and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)  # a negative height means rows stored top-down
    return None


def check_pixels(data: bytes | np.ndarray, name: str, max_pixels: int) -> tuple[int, int]:
    """The header's (width, height) of an encoded image, refused when it states more than ``max_pixels`` pixels
    or cannot be read (``name`` appears in the message)."""
    size = header_size(data)
    if size is None:
        raise InvalidInputError(f"cannot decode image {name}: corrupt, truncated or not a JPEG, PNG or BMP image")
    width, height = size
    if width * height > max_pixels:
        raise InvalidInputError(
            f"image {name} claims {width}x{height} = {width * height:,} pixels, more than max_image_pixels="
            f"{max_pixels:,}; refused before decoding (a decompression bomb?). If it is real, raise the limit: config "
            f"key max_image_pixels, option --max-image-pixels of the eval tools")
    return size
