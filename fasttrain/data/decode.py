"""Decode one image file to a uint8 RGB tensor [3, H, W] on the CPU, or say exactly why it cannot be.

torchvision.io.decode_image (libjpeg-turbo / libpng, no PIL object, no float work) is tried first; PIL is
the fallback for what it refuses (some CMYK, palette and 16-bit files). Anything neither can decode is a
BadImage naming the file, which the loaders turn into a warning and a skip (see --max-bad-files).

A train crop needs only its box: `decode_jpeg_box` decodes just that rectangle of a JPEG (fasttrain/data/_jpeg.c,
libjpeg-turbo), with the same pixels a full decode would give there. It is an optional compiled module;
where it was not built (no libjpeg headers), or for a file it cannot take, callers decode the whole image.

torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they still work. Its
DeprecationWarning is hidden by Python's default filters (the tests' config ignores it): nothing here
changes the process's warning filters.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

try:
    from . import _jpeg
except ImportError:  # not built: see pyproject.toml
    _jpeg = None


class BadImage(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_bytes(path) -> bytes:
    """A file's bytes, or a sample's inside a tar shard (a shards.Member, which reads itself)."""
    try:
        if isinstance(path, str):
            with open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read()
    except OSError as e:
        raise BadImage(path, f"unreadable ({e.strerror})") from None
    if not data:
        raise BadImage(path, "empty file (0 bytes)")
    return data


def _pil_decode(path: str, data: bytes) -> torch.Tensor:
    import io

    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")  # CMYK, palette, L, LA, RGBA, I;16 -> RGB
                arr = np.asarray(im, dtype=np.uint8)
    except Image.UnidentifiedImageError:
        raise BadImage(path, "not an image file (unknown format despite its extension)") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadImage(path, f"corrupt image ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def crop_decoder_available() -> bool:
    return _jpeg is not None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that decode_jpeg_box can take, else None. Only whole files (ending with the
    EOI marker) qualify: a box above a truncation would decode, and a truncated file must be reported as bad
    whichever box it drew, so those go through a full decode."""
    if _jpeg is None or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    try:
        return _jpeg.header(data)
    except ValueError:
        return None


def decode_jpeg_box(data: bytes, top: int, left: int, height: int, width: int) -> torch.Tensor | None:
    """uint8 [3, height, width], the pixels of a full decode's [:, top:top+height, left:left+width], or None
    where libjpeg refuses or warns (corrupt data, CMYK, ...): decode the whole file then."""
    try:
        pixels, rows, cols, x = _jpeg.decode_crop(data, top, left, height, width)
    except ValueError:
        return None
    return torch.frombuffer(pixels, dtype=torch.uint8).view(rows, cols, 3)[:, x:x + width].permute(2, 0, 1)


def decode_file(path: str) -> torch.Tensor:
    """uint8 [3, H, W]. Raises BadImage."""
    return decode_bytes(path, read_bytes(path))


def decode_bytes(path: str, data: bytes) -> torch.Tensor:
    """decode_file on bytes already read. Raises BadImage."""
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return _pil_decode(path, data)
    if img.dtype != torch.uint8 or img.shape[0] != 3:  # 16-bit PNG and the like
        return _pil_decode(path, data)
    return img
