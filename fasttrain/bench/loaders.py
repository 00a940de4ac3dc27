"""Every data path the benchmark compares, built over the same files, as iterables of on-device batches.

    with open_loader("torchvision", data, batch=128, workers=2, image_size=224, layout=layout,
                     batches_needed=20) as batches:
        for images, labels in batches: ...

- reference: the reference script's ImageFolder + PIL DataLoader (fasttrain/bench/reference.py); for
  loader-only entries its float batches are copied `.to(device, non_blocking=True)` as the script does.
- torchvision, dali-cpu, dali-gpu: fasttrain's own backends, called exactly as build_loaders() calls them,
  but on a scanned split whose file list is repeated: a benchmark folder of a few hundred files then gives
  one long epoch, as ImageNet's 1.28 M files do, so no epoch boundary (worker restart, pipeline refill)
  falls inside a timed window. Files are read from the page cache after the first pass, as they mostly
  are on a machine training ImageNet with enough RAM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
from dataclasses import dataclass

import torch

from ..config import DataConfig
from ..data import torchvision_backend
from ..data.base import Layout
from ..data.scan import Split, scan_dataset
from ..dist import DistInfo
from .reference import reference_dataset, reference_loader


def available_loaders(device: torch.device) -> list[str]:
    """The data paths this machine can run: DALI ones only where nvidia.dali imports."""
    from ..data import dali_backend
    kinds = ["reference", "torchvision"]
    if dali_backend.available():
        kinds.append("dali-cpu")
        if device.type == "cuda":
            kinds.append("dali-gpu")
    return kinds


@dataclass(frozen=True)
class BenchData:
    root: str
    train: Split
    val: Split

    @classmethod
    def scan(cls, root: str) -> "BenchData":
        train, val = scan_dataset(root)
        return cls(root, train, val)

    def repeat_for(self, images: int) -> int:
        """How many times the file list must be chained to hold `images` samples."""
        return max(1, math.ceil(images / len(self.train)))


def loader_layout(kind: str, layout: Layout) -> Layout:
    """dali-cpu is DALI's CPU-only mode (device_id=None): its batches stay in host memory."""
    return dataclasses.replace(layout, device=torch.device("cpu")) if kind == "dali-cpu" else layout


def _reference_batches(loader, device: torch.device):
    for images, target in loader:
        yield images.to(device, non_blocking=True), target.to(device, non_blocking=True)


@contextlib.contextmanager
def open_loader(kind: str, data: BenchData, batch: int, workers: int, image_size: int, layout: Layout,
                batches_needed: int, seed: int = 0, raw_reference: bool = False):
    """Yield an iterable of (images, labels) batches; workers and pipelines are shut down on exit.
    raw_reference: hand out the reference DataLoader itself (CPU float batches), for the reference step
    to copy as the script does."""
    repeat = data.repeat_for(batches_needed * batch)
    closers = []
    if kind == "reference":
        dl = reference_loader(reference_dataset(os.path.join(data.root, "train"), image_size, repeat), batch, workers)
        batches = dl if raw_reference else _reference_batches(dl, layout.device)
    else:
        train = dataclasses.replace(data.train, samples=data.train.samples * repeat)
        steps = len(train) // batch
        lay = loader_layout(kind, layout)
        if kind == "torchvision":
            batches, val = torchvision_backend.build(train, data.val, batch, workers, image_size, lay, 0, 1, seed,
                                                     steps, max_bad_files=0)
        elif kind in ("dali-cpu", "dali-gpu"):
            from ..data import dali_backend
            cfg = DataConfig(data=data.root, loader="dali", workers=workers, batch_size=batch, image_size=image_size)
            batches, val = dali_backend.build(train, data.val, batch, workers, cfg, lay, DistInfo(device=lay.device),
                                              seed, steps)
        else:
            raise ValueError(f"unknown loader {kind}")
        batches.set_epoch(0)
        closers = [batches.close, val.close]
    try:
        yield batches
    finally:
        for close in closers:
            close()
        del batches
        gc.collect()  # drops the DataLoader iterator now, so its worker processes exit before the next entry
