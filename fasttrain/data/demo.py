"""The embedded default dataset: procedurally drawn, learnable classes, written as real JPEG files.

Ten classes = five textures (horizontal stripes, vertical stripes, checkerboard, dots, rings) x two
palettes (warm, cool), with random frequency, phase, colours, noise and JPEG quality. Every class survives
RandomResizedCrop and horizontal flips (nothing depends on left/right or on the whole image being seen),
so the real augmentation pipeline runs on them and a small model still learns them. Deterministic: the
same files every time. Written to a temporary folder and renamed into place, so concurrent ranks or an
interrupted write never leave half a dataset.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from ..errors import UserError

TEXTURES = ("hstripes", "vstripes", "checker", "dots", "rings")
PALETTES = ("warm", "cool")
CLASSES = tuple(f"{t}_{p}" for t in TEXTURES for p in PALETTES)
VERSION = 1
DEFAULT_SIZES = {"train": 160, "val": 40}  # images per class


def default_root() -> str:
    cache = os.environ.get("FASTTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fasttrain")
    return os.path.join(cache, f"demo-v{VERSION}")


def _palette(rng: np.random.Generator, warm: bool) -> tuple[np.ndarray, np.ndarray]:
    hue_fg = rng.uniform(0.0, 0.12) if warm else rng.uniform(0.5, 0.68)
    hue_bg = hue_fg + rng.uniform(-0.05, 0.05)

    def rgb(h, s, v):
        k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
        return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    fg = rgb(hue_fg, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    bg = rgb(hue_bg % 1.0, rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.4))
    return fg * 255, bg * 255


def draw(texture: str, warm: bool, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One uint8 HxWx3 image of the class (texture, palette)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(7, 14)
    phase = rng.uniform(0, period)
    if texture == "hstripes":
        mask = ((y + phase) % period) < period / 2
    elif texture == "vstripes":
        mask = ((x + phase) % period) < period / 2
    elif texture == "checker":
        mask = (((x + phase) // (period / 1.5)) + ((y + phase) // (period / 1.5))) % 2 == 0
    elif texture == "dots":
        cy, cx = (y + phase) % period - period / 2, (x + phase) % period - period / 2
        mask = cy * cy + cx * cx < (period * 0.3) ** 2
    else:  # rings around a random centre
        r = np.hypot(y - rng.uniform(0, h), x - rng.uniform(0, w))
        mask = ((r + phase) % period) < period / 2
    fg, bg = _palette(rng, warm)
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@contextlib.contextmanager
def written_into_place(out: str):
    """Yield a temporary folder next to `out`; once the body has filled it, rename it to `out`. Nobody ever
    sees half a dataset (concurrent ranks, a run interrupted while writing), and when another process got
    there first with the same data, theirs is kept (a dataset is complete when it has val/)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-", dir=parent)
    try:
        yield tmp
        try:
            os.rename(tmp, out)
        except OSError:  # `out` exists: fine if another process finished first
            if not os.path.isdir(os.path.join(out, "val")):
                raise UserError(f"{out} exists and is not empty: pick a new folder for the dataset") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_demo_dataset(out: str, sizes: dict[str, int] | None = None, seed: int = 0) -> str:
    """Write DATA/{train,val}/<class>/*.jpg under `out` (if not already there) and return `out`."""
    sizes = sizes or DEFAULT_SIZES
    if os.path.isdir(os.path.join(out, "val")):
        return out
    with written_into_place(out) as tmp:
        for split_i, (split, n) in enumerate(sizes.items()):
            for c, name in enumerate(CLASSES):
                texture, palette = name.split("_")
                rng = np.random.default_rng([seed, split_i, c])
                folder = os.path.join(tmp, split, name)
                os.makedirs(folder)
                for i in range(n):
                    h, w = int(rng.integers(72, 112)), int(rng.integers(72, 112))
                    img = Image.fromarray(draw(texture, palette == "warm", rng, h, w))
                    img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=int(rng.integers(70, 95)))
    return out
