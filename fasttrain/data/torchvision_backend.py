"""The fallback that works everywhere: CPU decode in DataLoader workers, uint8 until on the device.

Workers decode with torchvision.io (libjpeg-turbo) and crop/flip/resize uint8 tensors with transforms.v2.functional;
of a train JPEG only the crop box is decoded (decode.decode_jpeg_box, same pixels). No float tensor is built
on the CPU (4x less memory traffic, and the float work runs on the device).
Batches are pinned, copied non-blocking and normalized on the device; on CUDA the next batch's copy runs
on a side stream while the current step computes.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms.v2 import functional as F

from ..errors import UserError
from .base import (IMAGENET_MEAN, IMAGENET_STD, VAL_CROP_RATIO, BadFileBudget, Layout, UnusedFiles, unused_samples,
                   val_resize_size)
from .decode import BadImage, decode_bytes, decode_file, decode_jpeg_box, jpeg_size, read_bytes
from .scan import Split

PREFETCH_FACTOR = 4  # batches each DataLoader worker prepares ahead


class TrainTransform:
    """The reference's augmentation, RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal
    flip p=0.5, on a uint8 tensor, drawing from a `random.Random` seeded per sample. The crop box is drawn
    exactly as torchvision's RandomResizedCrop.get_params draws it (10 tries, then a centre crop), but with
    Python's generator: torchvision's draws one-element tensors (about ten times the time per image,
    measured: benchmarks/RESULTS.md), and a private generator leaves the process's torch RNG untouched (with
    -j 0 this runs in the training process, whose RNG a mid-epoch resume restores exactly)."""

    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)

    def __init__(self, size: int, augment=None):
        """augment: a torchvision v2 transform of uint8 images (AutoAugment, RandAugment), after the flip."""
        self.size, self.augment = [size, size], augment

    def box(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height  # fallback: the whole image, cut to the nearest allowed aspect ratio
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, rng: random.Random | None, size: int | None = None) -> torch.Tensor:
        """The crop of a decoded image, resized to `size` (default: the size given at construction)."""
        rng = rng or random.Random()
        top, left, h, w = self.box(image.shape[-2], image.shape[-1], rng)
        return self._finish(image[:, top:top + h, left:left + w], rng, size)

    def load(self, path: str, rng: random.Random | None, size: int | None = None) -> torch.Tensor:
        """The crop of an image file, decoding only its box where it can: the same pixels and the same random
        draws as __call__(decode_file(path), rng, size). Raises BadImage."""
        rng = rng or random.Random()
        data = read_bytes(path)
        shape = jpeg_size(data)
        if shape is None:
            return self(decode_bytes(path, data), rng, size)
        top, left, h, w = self.box(*shape, rng)
        region = decode_jpeg_box(data, top, left, h, w)
        if region is None:  # libjpeg refused the fast path: the full decode decides whether the file is bad
            image = decode_bytes(path, data)
            if tuple(image.shape[-2:]) != shape:  # a header the decoders disagree with: draw a box that fits
                return self(image, rng, size)
            region = image[:, top:top + h, left:left + w]
        return self._finish(region, rng, size)

    def _finish(self, region: torch.Tensor, rng: random.Random, size: int | None) -> torch.Tensor:
        image = F.resize(region, [size, size] if size else self.size, antialias=True)
        image = image.flip(-1) if rng.random() < 0.5 else image
        if self.augment is None:
            return image
        # torchvision's policies draw from torch's global generator: seeded from this sample's own generator
        # and put back afterwards, so the ops depend only on the sample (exact resume, any worker count) and
        # the process's generator (the training process's, with -j 0) is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            return self.augment(image)


class ValTransform:
    """The reference's val transform: resize the short side to size / crop_ratio (224/256), centre crop."""

    def __init__(self, size: int, crop_ratio: float = VAL_CROP_RATIO):
        self.resize, self.size = val_resize_size(size, crop_ratio), [size, size]

    def __call__(self, image: torch.Tensor, rng: random.Random | None = None, size: int | None = None) -> torch.Tensor:
        return F.center_crop(F.resize(image, [self.resize], antialias=True), self.size)  # [n]: the short side

    def load(self, path: str, rng: random.Random | None = None, size: int | None = None) -> torch.Tensor:
        """Raises BadImage. The whole image is decoded: the resize's filter reaches past the centre crop."""
        return self(decode_file(path), rng)


class ImageFiles(Dataset):
    """(uint8 [3,H,W] or None, label, bad-file reason or None) for each scanned sample."""

    def __init__(self, split: Split, transform):
        self.samples, self.transform = split.samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        seed = size = None
        if isinstance(key, tuple):  # (index, seed[, size]) from ResumableSampler: augmentation depends only on
            key, seed, *size = key  # these, not on which worker or how many, so a resumed run crops the same
            size = size[0] if size else None  # way; the epoch's crop size travels with the index
        path, label = self.samples[key]
        try:
            return self.transform.load(path, None if seed is None else random.Random(seed), size), label, None
        except BadImage as e:
            return None, label, (e.path, e.reason)


def collate(items):
    good = [(img, label) for img, label, bad in items if bad is None]
    bad = [bad for _, _, bad in items if bad is not None]
    if not good:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    images = [g[0] for g in good]
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # Stack into shared memory: a batch made in private memory is copied once more into a fresh shared
        # segment when it is sent to the training process. share_memory_() of a new, untouched tensor copies
        # only zero pages, far cheaper than copying a stacked batch (measured: benchmarks/RESULTS.md);
        # default_collate's way, straight into a new shared storage, is a private torch API.
        out = torch.empty(len(images), *images[0].shape, dtype=images[0].dtype).share_memory_()
    return torch.stack(images, out=out), torch.tensor([g[1] for g in good], dtype=torch.int64), bad


class ShardSampler(Sampler):
    """Val: rank r scores samples r, r+W, r+2W, ... so every image is scored exactly once (no padding)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class ResumableSampler(Sampler):
    """Train: DistributedSampler's per-epoch shuffle and shard, truncated to whole batches, able to start
    mid-epoch (after `start_step` batches) so a resumed run sees the same next batch. Each index goes out
    with its augmentation seed and the epoch's crop size (`size_at(epoch)`): the persistent workers learn
    the size of an epoch from its indices, nothing in them has to be rebuilt."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int, batch: int, steps: int,
                 size_at: Callable[[int], int | None] = lambda epoch: None, check_unused: bool = False,
                 batch_ids: Sequence[int] | None = None):
        """`batch_ids`: the positions in the epoch's batch order this sampler gives, its step j being batch
        batch_ids[j] (the hybrid loader, data/hybrid.py, gives the other batches to DALI); None: all."""
        self.inner = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.batch, self.steps, self.start, self.seed, self.epoch, self.n = batch, steps, 0, seed, 0, n
        self.size_at, self.check_unused = size_at, check_unused
        self.batch_ids = list(range(steps)) if batch_ids is None else list(batch_ids)

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.inner.set_epoch(epoch)
        self.epoch, self.start = epoch, start_step

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * self.n
        size = self.size_at(self.epoch)
        order, b = list(self.inner), self.batch
        picked = (i for k in self.batch_ids[self.start:] for i in order[k * b:(k + 1) * b])
        return iter((i, (base + i) % 2**63, size) for i in picked)

    def __len__(self):
        return (len(self.batch_ids) - self.start) * self.batch

    def unused(self) -> list[int]:
        """The samples of this epoch that no batch holds and this rank answers for (base.unused_samples);
        none without `check_unused`."""
        return unused_samples(self.inner, self.steps * self.batch) if self.check_unused else []


@contextlib.contextmanager
def one_cpu_thread():
    """Run the enclosed CPU ops on one intra-op thread. Normalizing a batch in the training process while the
    DataLoader workers decode the next ones: with torch's default of one OpenMP thread per core, its threads
    fight the workers for the cores and spin-wait for each other; on the 2-core machine that tripled what
    the float conversion cost (0.77 against 0.37 CPU ms an image for DataLoader + normalize alone)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class RecycledBuffers:
    """float32 buffers for normalized batches on a CPU device, each handed out again once nothing holds it.
    A fresh 77 MB batch (128 x 224 px) costs the kernel ~19k page faults and zeroing before normalize writes a
    byte: 0.06 of the 0.14 CPU ms an image that normalizing costs here. CUDA's caching allocator needs none
    of this. What is handed out is the buffer tensor itself, and it is reused only when no Python name or
    container other than this pool refers to it (sys.getrefcount), so a batch the caller still holds (the
    training loop's variable, a list of batches, anything made from it in place) is never overwritten. A
    view kept without the batch it came from does not count: the loaders' consumers never do that."""

    def __init__(self, keep: int = 3):
        self.keep, self.buffers = keep, []

    def empty(self, shape: torch.Size, memory_format: torch.memory_format) -> torch.Tensor:
        """A float32 tensor of that shape and memory format."""
        for i in range(len(self.buffers)):
            # References: the list, and getrefcount's own argument.
            if (sys.getrefcount(self.buffers[i]) == 2 and self.buffers[i].shape == shape
                    and self.buffers[i].is_contiguous(memory_format=memory_format)):
                return self.buffers[i]
        buf = torch.empty(shape, dtype=torch.float32, memory_format=memory_format)
        self.buffers = (self.buffers + [buf])[-self.keep:]
        return buf


class DeviceBatches:
    """Wraps a DataLoader of uint8 batches: skips bad files (by name), moves to the device, normalizes."""

    def __init__(self, loader: DataLoader, layout: Layout, budget: BadFileBudget, steps: int | None = None):
        self.loader, self.layout, self.budget = loader, layout, budget
        self._steps = steps
        self.cuda = layout.device.type == "cuda"
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(IMAGENET_MEAN, device=layout.device).view(shape) * 255
        self.inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=layout.device).view(shape) * 255)
        self.buffers = RecycledBuffers() if layout.device.type == "cpu" else None  # float32, before any .to(dtype)
        # One side stream for the loader's life: the caching allocator keeps blocks per stream, so a new
        # stream per epoch or validation pass would strand the previous ones' blocks.
        self.stream = torch.cuda.Stream(device=layout.device) if self.cuda else None
        self.unused_files = UnusedFiles()  # decodes the train files no batch of the epoch holds

    def __len__(self):
        return self._steps if self._steps is not None else len(self.loader)

    def set_epoch(self, epoch: int, start_step: int = 0):
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch, start_step)

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.layout.device, non_blocking=True)
        labels = labels.to(self.layout.device, non_blocking=True)
        with contextlib.nullcontext() if self.cuda else one_cpu_thread():
            if self.layout.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)  # on uint8: 4x cheaper than float
            # In place: one float batch instead of three, and on the CPU a recycled one (see RecycledBuffers).
            if self.buffers is not None:
                fmt = torch.channels_last if self.layout.channels_last else torch.contiguous_format
                images = self.buffers.empty(images.shape, fmt).copy_(images)
            else:
                images = images.float()
            images = images.sub_(self.mean).mul_(self.inv_std).to(self.layout.dtype)
        return images, labels

    def _check_unused(self):
        """UnusedFiles' check of the epoch's samples that no batch holds, or None."""
        unused = getattr(self.loader.sampler, "unused", lambda: [])()
        if not unused:
            return None
        samples = self.loader.dataset.samples
        return self.unused_files.start([samples[i][0] for i in unused])

    def __iter__(self):
        # The DataLoader's iterator now, not at the first next(): its workers (persistent: forked once, at the
        # first pass) start before whatever is started after this call (the unused files' checker thread; in
        # the hybrid loader DALI's threads), which a fork must not copy mid-work (a forked worker can deadlock
        # on a lock a thread held).
        batches = iter(self.loader)
        return self._batches(batches, self._check_unused())

    def _batches(self, batches, unused):
        stream, pending = self.stream, None
        for images, labels, bad in batches:
            for path, reason in bad:
                self.budget.report(path, reason)
            if images.shape[0] == 0:  # the whole batch was bad files; each was reported above
                if self._steps is not None:  # train: a rank one step short would leave DDP waiting
                    raise UserError(f"every file of a train batch failed to decode ({len(bad)} files, e.g. "
                                    f"{bad[0][0]}): run `fasttrain check-data` and train with --file-list")
                continue
            if stream is None:
                yield self._to_device(images, labels)
                continue
            # Copy and normalize batch i+1 on a side stream while batch i computes.
            with torch.cuda.stream(stream):
                nxt = self._to_device(images, labels)
            if pending is not None:
                yield pending
            torch.cuda.current_stream().wait_stream(stream)
            for t in nxt:
                t.record_stream(torch.cuda.current_stream())
            pending = nxt
        if unused is not None:  # the epoch read every batch: now the files none of them held
            for path, reason in unused.result():
                self.budget.report(path, reason)
        if pending is not None:
            yield pending

    def close(self):
        self.loader = None
        self.unused_files.close()


def build(train: Split, val: Split, per_rank_batch: int, workers: int, image_size: int, layout: Layout,
          rank: int, world_size: int, seed: int, steps: int, max_bad_files: int, augment=None,
          size_at: Callable[[int], int] | None = None, val_size: int | None = None,
          crop_ratio: float = VAL_CROP_RATIO, check_unused: bool = False, budget: BadFileBudget | None = None,
          batch_ids: Sequence[int] | None = None, prefetch_factor: int = PREFETCH_FACTOR):
    """`augment`: AutoAugment/RandAugment after the flip (None: the reference's augmentation only);
    `size_at(epoch)`: the train crop size of an epoch (default: image_size always); `val_size`: the val
    center crop (default: image_size); `check_unused`: also decode, each epoch, the train files no batch
    holds (whole epochs only: not with --steps-per-epoch or in the bench, which read a part on purpose);
    `budget`: the bad files' count, shared with another loader (the hybrid's); `batch_ids`: see
    ResumableSampler; `prefetch_factor`: batches each worker prepares ahead."""
    budget = budget or BadFileBudget(max_bad_files, rank)
    pin = layout.device.type == "cuda"
    # Its own generator: starting an epoch's iterator draws worker seeds from it, not from the training
    # process's RNG, which a mid-epoch resume restores to the exact state of the run it continues.
    common = dict(batch_size=per_rank_batch, num_workers=workers, collate_fn=collate, pin_memory=pin,
                  persistent_workers=workers > 0, prefetch_factor=prefetch_factor if workers > 0 else None,
                  generator=torch.Generator().manual_seed(seed + rank))
    train_sampler = ResumableSampler(len(train), rank, world_size, seed, per_rank_batch, steps,
                                     size_at or (lambda epoch: image_size), check_unused, batch_ids)
    train_dl = DataLoader(ImageFiles(train, TrainTransform(image_size, augment)), sampler=train_sampler,
                          drop_last=True, **common)
    val_dl = DataLoader(ImageFiles(val, ValTransform(val_size or image_size, crop_ratio)),
                        sampler=ShardSampler(len(val), rank, world_size),
                        **common)
    return (DeviceBatches(train_dl, layout, budget, len(train_sampler.batch_ids)),
            DeviceBatches(val_dl, layout, budget))
