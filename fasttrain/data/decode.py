"""Decode one image file to a uint8 RGB tensor [3, H, W] on the CPU, or say exactly why it cannot be.

torchvision.io.decode_image (libjpeg-turbo / libpng, no PIL object, no float work) is tried first; PIL is
the fallback for what it refuses (some CMYK, palette and 16-bit files). Anything neither can decode is a
BadImage naming the file, which the loaders turn into a warning and a skip (see --max-bad-files).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

# torchvision 0.29 announces that its decoders move to TorchCodec; they still work, and warn on each call.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)


class BadImage(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
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


def decode_file(path: str) -> torch.Tensor:
    """uint8 [3, H, W]. Raises BadImage."""
    data = read_bytes(path)
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return _pil_decode(path, data)
    if img.dtype != torch.uint8 or img.shape[0] != 3:  # 16-bit PNG and the like
        return _pil_decode(path, data)
    return img
