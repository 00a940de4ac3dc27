"""The loaders a user who does not pick fasttrain would pick instead ("peers"), each as a bench entry of its
own, built the way their own documentation and scripts build them, over the same files, batch, worker
count and crop as every other entry.

- timm: `timm.data.create_loader(ImageDataset(DATA/train), is_training=True, use_prefetcher=True, ...)`
  as timm's train.py calls it: PIL decode and RandomResizedCropAndInterpolation + flip in DataLoader
  workers (persistent), uint8 batches by fast_collate, copied and normalized with ImageNet mean/std on
  the device by its PrefetchLoader (a side stream on CUDA). Arguments at train.py's defaults (no
  auto-augment, no random erasing, pin_memory off: `--pin-mem` is opt-in there), except two that make
  it the same crop as the others: interpolation bilinear (train.py's default, "random", mixes in
  bicubic) and no colour jitter (train.py's default 0.4 adds work the other entries do not do).
- tv-gpu-decode: torchvision's GPU JPEG decode as its documentation shows it: DataLoader workers read the
  file bytes (`torchvision.io.read_file`), the training process decodes each batch with one batched
  `torchvision.io.decode_jpeg(list, device="cuda")` call (nvJPEG), then per image
  v2.RandomResizedCrop(224) + v2.RandomHorizontalFlip() on the GPU (the images differ in size, so one
  call each), stack, normalize. GPU only: on a CPU machine the entry is left out of `fasttrain bench`
  (with the reason in bench.json's plan.skipped), because there it would time torchvision's CPU decode in
  one process, which fasttrain's own torchvision loader already does better, in workers; the code runs
  on any device, and the tests run it on the CPU.

Both yield float32 NCHW batches on the training device, like the reference entry; end to end,
`to_layout` then makes the dtype and memory format the model's toggles want (timm's train.py does the
channels_last copy itself; its autocast casts to bf16 in the first layer, the same one cast here).
"""

from __future__ import annotations

import importlib.util
import inspect
import os

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.base import IMAGENET_MEAN, IMAGENET_STD, Layout
from ..data.scan import Split

PEERS = ("timm", "tv-gpu-decode")
# A worker that delivers no batch in this long raises (RuntimeError) and the bench leaves the peer out,
# instead of waiting for ever on a stalled worker (as it once did for the whole rest of a GPU session).
PEER_BATCH_TIMEOUT_S = 120


def peer_status(device: torch.device) -> dict[str, str | None]:
    """For each peer: None where it runs on this machine, else why it is left out."""
    timm = None if importlib.util.find_spec("timm") is not None else "timm is not installed (pip install timm)"
    gpu = None if device.type == "cuda" else "GPU decode: needs a CUDA device"
    return {"timm": timm, "tv-gpu-decode": gpu}


class _Repeated(Dataset):
    """`inner` chained `times` times (as the reference's ConcatDataset), with `transform` reaching the inner
    dataset, which is where timm's create_loader sets it."""

    def __init__(self, inner: Dataset, times: int):
        self.inner, self.times = inner, times

    def __len__(self) -> int:
        return len(self.inner) * self.times

    def __getitem__(self, i: int):
        return self.inner[i % len(self.inner)]

    @property
    def transform(self):
        return self.inner.transform

    @transform.setter
    def transform(self, tf) -> None:
        self.inner.transform = tf


def timm_loader(root: str, batch: int, workers: int, image_size: int, device: torch.device, repeat: int = 1):
    """timm's train loader over ROOT/train (ImageFolder layout): an iterable of (float32 images, int64
    labels) on `device`, normalized."""
    from timm.data import ImageDataset, create_loader
    dataset = _Repeated(ImageDataset(os.path.join(root, "train")), repeat)
    kwargs = dict(input_size=(3, image_size, image_size), batch_size=batch, is_training=True, use_prefetcher=True,
                  scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=None, auto_augment=None,
                  interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=workers,
                  distributed=False, pin_memory=False, device=device, persistent_workers=True)
    if "device" not in inspect.signature(create_loader).parameters:
        # timm before 0.9: no `device`; its prefetcher then always uses the current CUDA device.
        if device.type != "cuda":
            raise TypeError(f"timm {_timm_version()}'s create_loader has no device argument: CUDA only")
        del kwargs["device"]
    return create_loader(dataset, **kwargs)


def _timm_version() -> str:
    import timm
    return timm.__version__


class _FileBytes(Dataset):
    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import torchvision.io
        path, label = self.samples[i]
        return torchvision.io.read_file(path), label


def _bytes_and_labels(items):
    """One batch's files packed into one uint8 tensor with their lengths: a worker hands the main process one
    shared-memory block a batch, not one per file (one file descriptor each: 16 workers x 2 batches x 256
    files ran past the GPU machine's open-file limit and the DataLoader hung)."""
    lengths = torch.tensor([len(data) for data, _ in items], dtype=torch.int64)
    return torch.cat([data for data, _ in items]), lengths, torch.tensor([label for _, label in items],
                                                                         dtype=torch.int64)


def gpu_decode_batches(train: Split, batch: int, workers: int, image_size: int, device: torch.device,
                       repeat: int = 1):
    """torchvision's batched decode_jpeg on `device`, then RandomResizedCrop + flip per image there, then
    normalize: yields (float32 NCHW images, int64 labels) on `device`."""
    import torchvision.io
    from torchvision.transforms import v2
    loader = DataLoader(_FileBytes(train.samples * repeat), batch_size=batch, shuffle=True, num_workers=workers,
                        collate_fn=_bytes_and_labels, drop_last=True,
                        timeout=PEER_BATCH_TIMEOUT_S if workers else 0)
    augment = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    for packed, lengths, labels in loader:
        data = list(torch.split(packed, lengths.tolist()))
        images = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)
        x = torch.stack([augment(img) for img in images]).float()
        yield x.sub_(mean).div_(std), labels.to(device, non_blocking=True)


def to_layout(batches, layout: Layout):
    """float32 NCHW batches in the dtype and memory format `layout` wants (no copy where they already are)."""
    fmt = torch.channels_last if layout.channels_last else torch.contiguous_format
    for images, labels in batches:
        yield images.to(dtype=layout.dtype, memory_format=fmt), labels


def peer_batches(kind: str, root: str, train: Split, batch: int, workers: int, image_size: int, layout: Layout,
                 repeat: int):
    """A generator over peer `kind`'s batches in `layout`. The loader lives only inside it, so closing the
    generator drops it, and with it timm's persistent workers, before the next entry starts."""
    if kind == "timm":
        loader = timm_loader(root, batch, workers, image_size, layout.device, repeat)
    elif kind == "tv-gpu-decode":
        loader = gpu_decode_batches(train, batch, workers, image_size, layout.device, repeat)
    else:
        raise ValueError(f"unknown peer {kind}")
    yield from to_layout(loader, layout)
