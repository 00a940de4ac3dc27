"""Pre-resizing for `fasttrain shard --max-side N`: an image larger than N px on its longer side becomes a
JPEG of at most N px, so every epoch after decodes fewer pixels (what ffcv-imagenet does to its files: a
500 px max side, JPEG quality 90).

    from fasttrain.data.resize import shrink
    jpeg, (w, h) = shrink(data, max_side=448, quality=90)   # None: the image already fits: keep its bytes

The aspect ratio is kept and the longer side comes out exactly N. For a JPEG, libjpeg first decodes at
1/2, 1/4 or 1/8 scale (its DCT scaling) while that leaves at least twice the target size, then a Lanczos
filter (antialiased) makes the rest of the reduction: PIL's own `thumbnail` recipe, cheaper than a
full-size decode (the scaled DCT drops the high frequencies rather than skipping pixels, so it does not alias).
Grayscale stays grayscale (one channel to decode; both loaders make RGB of it); every other mode becomes
RGB as the loaders convert it (data/decode.py). Baseline (not progressive) JPEG, PIL's default 4:2:0
chroma subsampling, no EXIF: the loaders ignore EXIF orientation, so the stored pixels are what they saw.
The same bytes and settings give the same output bytes (libjpeg is deterministic); another Pillow or
libjpeg version may encode differently, which is why `fasttrain shard`'s resume fingerprint names Pillow's.
"""

from __future__ import annotations

import io

from ..errors import UserError

QUALITY = 90  # FFCV's ImageNet files; PIL's own default is 75


def target_size(width: int, height: int, max_side: int) -> tuple[int, int] | None:
    """(width, height) with the longer side max_side and the aspect kept, or None when it already fits."""
    if max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return (max_side, max(1, round(height * scale))) if width >= height else (max(1, round(width * scale)), max_side)


def shrink(data: bytes, max_side: int, quality: int = QUALITY) -> tuple[bytes, tuple[int, int]] | None:
    """(JPEG bytes of the image in `data` scaled to fit max_side, its (width, height)), or None when it fits
    already. `data` must decode (check it first: data/check.py)."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        size = target_size(*im.size, max_side)
        if size is None:
            return None
        im.draft(None, (2 * size[0], 2 * size[1]))  # a JPEG decodes at a smaller DCT scale; others ignore it
        im = im.convert("L" if im.mode == "L" else "RGB")
        small = im.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=quality)
    return out.getvalue(), size


def resized(data: bytes, max_side: int, quality: int, min_side: int) -> tuple[bytes | None, str | None]:
    """What `fasttrain shard` writes for a good file: (the bytes to write in its place, or None to write it
    as it is; an error when the resized image would be bad: check-data's --min-side, applied to what the
    loaders will read). max_side 0: resizing is off."""
    out = shrink(data, max_side, quality) if max_side else None
    if out is None:
        return None, None
    jpeg, (w, h) = out
    if min(w, h) < min_side:
        return None, f"too small once resized to --max-side {max_side} ({w}x{h} < --min-side {min_side})"
    return jpeg, None


def resize_options(ns) -> tuple[int, int]:
    """(max side, quality) from `fasttrain shard`'s --max-side and --quality; (0, 0) without --max-side."""
    max_side, quality = getattr(ns, "max_side", None), getattr(ns, "quality", None)
    if max_side is None:
        if quality is not None:
            raise UserError("--quality is the JPEG quality of the images --max-side resizes: give --max-side too")
        return 0, 0
    if max_side < ns.min_side:
        raise UserError(f"--max-side must be at least --min-side ({ns.min_side}), got {max_side}")
    quality = QUALITY if quality is None else quality
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be a JPEG quality from 1 to 100, got {quality}")
    return max_side, quality
