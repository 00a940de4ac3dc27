"""The benchmark's JPEGs, written once into a cache: like those benchmarks/ANCHORS.md was measured on, or
(`like="imagenet"`, `fasttrain bench --like imagenet`) sized like ImageNet's.

Every image is a 1/f-like colour field, a few flat shapes, a slight blur and sensor-like grain. Decode cost
tracks pixel count and entropy (bytes), so the two kinds differ in what they are drawn at:
- "default": about 460x375 pixels (widths 400-520, heights 330-420), JPEG quality 90, ~70 KB each, all
  alike: the images ANCHORS.md's figures were measured on;
- "imagenet": ImageNet's spread (its train set: mean about 400x350 px and 110 KB a file, widths from under
  100 to over 2,000 px): a log-normal longer side (median 380 px, sigma 0.4, kept within 96-3,000 px) and
  2.5% large ones (log-uniform 1,000-2,800 px), mostly 4:3 landscape, some 3:4 portrait, a fifth of any
  aspect from 1:2 to 2:1; JPEG quality 88-96 and grain drawn per image. A few large files carry much of
  the bytes and of the decode work, as in ImageNet, so decode rates measured on them are not flattered by
  images all of one modest size. What the generator gives (mean size and bytes, width range) and what
  decoding it costs against the default images: benchmarks/RESULTS.md.
Deterministic (one seed per chunk of files), and written to a temporary folder renamed into place
(demo.written_into_place).

    from fasttrain.bench.images import bench_dataset
    root = bench_dataset(n_train=512)                   # $FASTTRAIN_CACHE/bench-v1-512/{train,val}/<class>/*.jpg
    root = bench_dataset(n_train=512, like="imagenet")  # $FASTTRAIN_CACHE/bench-imagenet-v1-512/...
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..data.demo import default_root, written_into_place

VERSION = 1
CLASSES = 8
VAL_PER_CLASS = 2  # fasttrain's loaders want a val/ split; the benchmark never times it
LIKE = ("default", "imagenet")


def cache_root(n_train: int, like: str = "default") -> str:
    """$FASTTRAIN_CACHE (or ~/.cache/fasttrain)/bench[-imagenet]-v1-N, next to the demo dataset."""
    kind = "" if like == "default" else f"-{like}"
    return os.path.join(os.path.dirname(default_root()), f"bench{kind}-v{VERSION}-{n_train}")


def _colour_field(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Octaves of bicubically upsampled noise, each 0.85x the last: smooth regions with texture."""
    img = np.zeros((h, w, 3), np.float32)
    amp = 1.0
    for cells in (3, 6, 12, 24, 48, 96, 192):
        small = rng.normal(0, 1, (max(2, cells * h // w), cells, 3)).astype(np.float32)
        img += amp * np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.Resampling.BICUBIC))
                               for c in range(3)], -1)
        amp *= 0.85
    return rng.uniform(60, 190, 3).astype(np.float32) + 40 * img


def draw_photo(rng: np.random.Generator, w: int, h: int, grain: float = 10.0) -> Image.Image:
    pil = Image.fromarray(np.clip(_colour_field(rng, w, h), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 120)
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.ellipse([x0 - r, y0 - r * rng.uniform(0.5, 1.5), x0 + r, y0 + r], fill=col)
        else:
            pts = [(x0 + rng.uniform(-r, r), y0 + rng.uniform(-r, r)) for _ in range(int(rng.integers(3, 6)))]
            d.polygon(pts, fill=col)
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    # Grain of sigma 10 brings the default images to ~70 KB at quality 90; it sets the bytes per pixel.
    noisy = np.asarray(pil, np.float32) + rng.normal(0, grain, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def imagenet_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn from ImageNet-like sizes (see the module's docstring)."""
    if rng.random() < 0.025:  # large originals: the tail that holds the widest files
        longer = float(np.exp(rng.uniform(np.log(1000), np.log(2800))))
    else:
        longer = float(np.clip(np.exp(rng.normal(np.log(380), 0.4)), 96, 3000))
    u = rng.random()
    aspect = 4 / 3 if u < 0.62 else 3 / 4 if u < 0.80 else float(np.exp(rng.uniform(-0.69, 0.69)))  # width/height
    if aspect >= 1:
        return round(longer), max(16, round(longer / aspect))
    return max(16, round(longer * aspect)), round(longer)


def draw_file(rng: np.random.Generator, like: str) -> tuple[Image.Image, int]:
    """One benchmark image and the JPEG quality to save it at."""
    if like == "imagenet":
        w, h = imagenet_size(rng)
        quality, grain = int(rng.integers(88, 97)), float(rng.uniform(9, 19))
        return draw_photo(rng, w, h, grain), quality
    w, h = int(rng.integers(400, 521)), int(rng.integers(330, 421))
    return draw_photo(rng, w, h), 90


CHUNK = 32  # images drawn from one seed: the files do not depend on how many processes draw them


def _write_chunk(task: tuple[str, int, int, int, int, int, str]) -> None:
    cdir, seed, split_i, c, start, stop, like = task
    # The default images keep the seed they were drawn with before there were others.
    rng = np.random.default_rng([seed, split_i, c, start] + ([LIKE.index(like)] if like != "default" else []))
    for i in range(start, stop):
        image, quality = draw_file(rng, like)
        image.save(os.path.join(cdir, f"{i:05d}.jpg"), quality=quality)


def _tasks(folder: str, per_class: int, seed: int, split_i: int, like: str) -> list[tuple]:
    tasks = []
    for c in range(CLASSES):
        cdir = os.path.join(folder, f"class{c:02d}")
        os.makedirs(cdir)
        tasks += [(cdir, seed, split_i, c, s, min(s + CHUNK, per_class), like) for s in range(0, per_class, CHUNK)]
    return tasks


def bench_dataset(n_train: int, out: str | None = None, seed: int = 0, processes: int | None = None,
                  like: str = "default") -> str:
    """Write OUT/{train,val}/classNN/*.jpg (n_train train images in all) unless already there; return OUT.
    `processes` (default: all cores) share the drawing; `like`: "default" or "imagenet" (LIKE)."""
    if like not in LIKE:
        raise ValueError(f"like={like!r}: one of {LIKE}")
    out = out or cache_root(n_train, like)
    if os.path.isdir(os.path.join(out, "val")):
        return out
    with written_into_place(out) as tmp:
        tasks = _tasks(os.path.join(tmp, "train"), max(1, n_train // CLASSES), seed, 0, like)
        tasks += _tasks(os.path.join(tmp, "val"), VAL_PER_CLASS, seed, 1, like)
        processes = min(processes or os.cpu_count() or 1, len(tasks))
        if processes > 1:
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                pool.map(_write_chunk, tasks, chunksize=1)
        else:
            for task in tasks:
                _write_chunk(task)
    return out
