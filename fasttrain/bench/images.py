"""The benchmark's JPEGs: like those benchmarks/ANCHORS.md was measured on, written once into a cache.

About 460x375 pixels (widths 400-520, heights 330-420), JPEG quality 90, ~70 KB each: a 1/f-like colour
field, a few flat shapes, a slight blur and sensor-like grain. Decode cost tracks pixel count and entropy,
so these cost about what ImageNet photos of that size cost (ImageNet's mean file is larger, ~110 KB).
Deterministic, and written to a temporary folder renamed into place (demo.written_into_place).

    from fasttrain.bench.images import bench_dataset
    root = bench_dataset(n_train=512)   # $FASTTRAIN_CACHE/bench-v1-512/{train,val}/<class>/*.jpg
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


def cache_root(n_train: int) -> str:
    """$FASTTRAIN_CACHE (or ~/.cache/fasttrain)/bench-v1-N, next to the demo dataset."""
    return os.path.join(os.path.dirname(default_root()), f"bench-v{VERSION}-{n_train}")


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


def draw_photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
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
    grain = np.asarray(pil, np.float32) + rng.normal(0, 10, (h, w, 3))  # brings the size to ~70 KB at q90
    return Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8))


CHUNK = 32  # images drawn from one seed: the files do not depend on how many processes draw them


def _write_chunk(task: tuple[str, int, int, int, int, int]) -> None:
    cdir, seed, split_i, c, start, stop = task
    rng = np.random.default_rng([seed, split_i, c, start])
    for i in range(start, stop):
        w, h = int(rng.integers(400, 521)), int(rng.integers(330, 421))
        draw_photo(rng, w, h).save(os.path.join(cdir, f"{i:05d}.jpg"), quality=90)


def _tasks(folder: str, per_class: int, seed: int, split_i: int) -> list[tuple]:
    tasks = []
    for c in range(CLASSES):
        cdir = os.path.join(folder, f"class{c:02d}")
        os.makedirs(cdir)
        tasks += [(cdir, seed, split_i, c, s, min(s + CHUNK, per_class)) for s in range(0, per_class, CHUNK)]
    return tasks


def bench_dataset(n_train: int, out: str | None = None, seed: int = 0, processes: int | None = None) -> str:
    """Write OUT/{train,val}/classNN/*.jpg (n_train train images in all) unless already there; return OUT.
    `processes` (default: all cores) share the drawing."""
    out = out or cache_root(n_train)
    if os.path.isdir(os.path.join(out, "val")):
        return out
    with written_into_place(out) as tmp:
        tasks = _tasks(os.path.join(tmp, "train"), max(1, n_train // CLASSES), seed, 0)
        tasks += _tasks(os.path.join(tmp, "val"), VAL_PER_CLASS, seed, 1)
        processes = min(processes or os.cpu_count() or 1, len(tasks))
        if processes > 1:
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                pool.map(_write_chunk, tasks, chunksize=1)
        else:
            for task in tasks:
                _write_chunk(task)
    return out
