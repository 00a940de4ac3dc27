"""Synthetic batches made once on the device: compute-only runs (`--dummy`, `--loader synthetic`).

The reference's --dummy draws 1,281,167 train and 50,000 val random images of 1000 classes; so does this,
but one batch is made on the device and handed out again, so nothing but the model is measured.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Layout

TRAIN_SIZE, VAL_SIZE = 1_281_167, 50_000


class SyntheticBatches:
    """`steps` batches of `batch` images, the last one cut to `last` images when given. With `size_at`, the
    images of epoch e are size_at(e) pixels square (progressive resizing): one batch made per size."""

    def __init__(self, steps: int, batch: int, image_size: int, num_classes: int, layout: Layout, seed: int,
                 last: int | None = None, size_at: Callable[[int], int] | None = None):
        self.batch, self.layout, self.seed, self.size_at = batch, layout, seed, size_at or (lambda e: image_size)
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(batch, 3, image_size, image_size, generator=g)
        self.labels = torch.randint(0, num_classes, (batch,), generator=g).to(layout.device)
        self.made = {image_size: self._place(images)}  # size -> its batch on the device
        self.images = self.made[image_size]
        self.steps, self.start, self.last = steps, 0, batch if last is None else last

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.layout.channels_last else torch.contiguous_format
        return images.to(self.layout.device, self.layout.dtype).contiguous(memory_format=fmt)

    def _images(self, size: int) -> torch.Tensor:
        if size not in self.made:
            g = torch.Generator().manual_seed(self.seed)
            self.made[size] = self._place(torch.randn(self.batch, 3, size, size, generator=g))
        return self.made[size]

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.start = start_step
        self.images = self._images(self.size_at(epoch))

    def __iter__(self):
        for i in range(self.start, self.steps):
            if i == self.steps - 1 and self.last < self.images.shape[0]:
                yield self.images[:self.last], self.labels[:self.last]
            else:
                yield self.images, self.labels

    def close(self):
        pass


def val_share(rank: int, world_size: int, per_rank_batch: int, val_steps: int = 0) -> int:
    """Val images rank r scores: samples r, r+W, ... of 50,000, the first `val_steps` batches of them if given."""
    n = len(range(rank, VAL_SIZE, world_size))
    return min(n, val_steps * per_rank_batch) if val_steps else n


def build(per_rank_batch: int, world_size: int, image_size: int, num_classes: int, layout: Layout, seed: int,
          rank: int = 0, val_steps: int = 0, size_at: Callable[[int], int] | None = None,
          val_size: int | None = None):
    """Train: full batches, every rank the same number (--steps-per-epoch is applied by the caller, as for
    every loader: data.train_steps), `size_at(epoch)` pixels (default image_size). Val: rank r scores samples
    r, r+W, ... of 50,000, so the ranks together score exactly 50,000, as with real data (with --val-steps N,
    N batches of them), at `val_size` (default image_size)."""
    steps = TRAIN_SIZE // world_size // per_rank_batch
    val_samples = val_share(rank, world_size, per_rank_batch, val_steps)
    val_steps = -(-val_samples // per_rank_batch)
    return (SyntheticBatches(steps, per_rank_batch, image_size, num_classes, layout, seed, size_at=size_at),
            SyntheticBatches(val_steps, per_rank_batch, val_size or image_size, num_classes, layout, seed + 1,
                             last=val_samples - (val_steps - 1) * per_rank_batch))
