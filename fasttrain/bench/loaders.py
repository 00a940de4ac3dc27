"""Every data path the benchmark compares, built over the same files, as iterables of on-device batches.

    with open_loader("torchvision", data, batch=128, workers=2, image_size=224, layout=layout,
                     batches_needed=20) as batches:
        for images, labels in batches: ...

- reference: the reference script's ImageFolder + PIL DataLoader (fasttrain/bench/reference.py); for
  loader-only entries its float batches are copied `.to(device, non_blocking=True)` as the script does.
- torchvision, dali-cpu, dali-gpu, hybrid: fasttrain's own backends, called exactly as build_loaders() calls them,
  but on a scanned split whose file list is repeated: a benchmark folder of a few hundred files then gives
  one long epoch, as ImageNet's 1.28 M files do, so no epoch boundary (worker restart, pipeline refill)
  falls inside a timed window. Files are read from the page cache after the first pass, as they mostly
  are on a machine training ImageNet with enough RAM.
- dali-cpu is DALI's CPU-only mode: its batches come out in host memory, so they are then copied to the
  training device `.to(device, non_blocking=True)`, as the reference's are, and every entry delivers to
  the same place (on a CPU machine the copy is a no-op). DALI's outputs are not pinned, so on a GPU the
  copy is a synchronous one: what a user feeding a GPU from DALI's CPU mode pays.
- timm, tv-gpu-decode: the peers (peers.py), a chained file list like the others.
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
from .peers import PEERS, peer_batches, peer_status
from .reference import reference_dataset, reference_loader
from .shards import unsharded


FASTTRAIN_LOADERS = ("torchvision", "dali-cpu", "dali-gpu")


def available_loaders(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(the data paths this machine can run, {each one left out: why}): the reference, fasttrain's loaders
    (DALI ones only where nvidia.dali imports) and the peers whose library imports."""
    from ..data import dali_backend
    kinds, skipped = ["reference", "torchvision"], {}
    if dali_backend.available():
        kinds.append("dali-cpu")
        if device.type == "cuda":
            kinds.append("dali-gpu")
        else:
            skipped["dali-gpu"] = "needs a CUDA device"
    else:
        skipped["dali-cpu"] = skipped["dali-gpu"] = f"nvidia.dali does not import ({dali_backend.import_error()})"
    for peer, why in peer_status(device).items():
        if why is None:
            kinds.append(peer)
        else:
            skipped[peer] = why
    return kinds, skipped


def is_peer(kind: str) -> bool:
    return kind in PEERS


@dataclass(frozen=True)
class BenchData:
    root: str
    train: Split
    val: Split
    shards: "BenchData | None" = None  # the same images as tar shards (bench --shards: bench/shards.py)
    max_side: int | None = None  # shards written with `fasttrain shard --max-side`: the images' longest side

    @classmethod
    def scan(cls, root: str) -> "BenchData":
        train, val = scan_dataset(root)
        max_side = None
        if train.sharded:
            from ..data.shards import load_manifest
            max_side = (load_manifest(root).get("resize") or {}).get("max_side")
        return cls(root, train, val, max_side=max_side)

    def repeat_for(self, images: int) -> int:
        """How many times the file list must be chained to hold `images` samples."""
        return max(1, math.ceil(images / len(self.train)))


def loader_layout(kind: str, layout: Layout) -> Layout:
    """dali-cpu is DALI's CPU-only mode (device_id=None): it makes its batches in host memory."""
    return dataclasses.replace(layout, device=torch.device("cpu")) if kind == "dali-cpu" else layout


def _to_device(batches, device: torch.device):
    """Host batches copied to the training device as the reference script copies them (no-op on the CPU)."""
    for images, target in batches:
        yield images.to(device, non_blocking=True), target.to(device, non_blocking=True)


@contextlib.contextmanager
def open_loader(kind: str, data: BenchData, batch: int, workers: int, image_size: int, layout: Layout,
                batches_needed: int, seed: int = 0, raw_reference: bool = False, dali=None, share: float = 0.5):
    """Yield an iterable of (images, labels) batches; workers and pipelines are shut down on exit.
    raw_reference: hand out the reference DataLoader itself (CPU float batches), for the reference step
    to copy as the script does. dali: the DALI loaders' knobs (suite.DaliKnobs; None: fasttrain's defaults).
    share: the hybrid's --dali-share."""
    kind, sharded = unsharded(kind)
    if sharded:  # a fasttrain loader reading the same images from tar shards
        data = data.shards
    repeat = data.repeat_for(batches_needed * batch)
    closers = []
    if kind == "reference":
        dl = reference_loader(reference_dataset(os.path.join(data.root, "train"), image_size, repeat), batch, workers)
        batches = dl if raw_reference else _to_device(dl, layout.device)
        del dl  # the generator holds it: closing that ends the workers
    elif is_peer(kind):
        batches = peer_batches(kind, data.root, data.train, batch, workers, image_size, layout, repeat)
    else:
        train = dataclasses.replace(data.train, samples=data.train.samples * repeat)
        steps = len(train) // batch
        lay = loader_layout(kind, layout)
        if kind == "torchvision":
            batches, val = torchvision_backend.build(train, data.val, batch, workers, image_size, lay, 0, 1, seed,
                                                     steps, max_bad_files=0)
        elif kind in ("dali-cpu", "dali-gpu", "hybrid"):
            from ..data import dali_backend, hybrid
            knobs = {} if dali is None else dict(hw_decoder_load=dali.hw_decoder_load, prefetch=dali.prefetch)
            cfg = DataConfig(data=data.root, loader="dali", workers=workers, batch_size=batch, image_size=image_size,
                             dali_share=share, **knobs)
            if kind == "hybrid":  # torchvision workers and DALI (GPU "mixed" on a GPU), as --loader hybrid
                batches, val = hybrid.build(train, data.val, batch, workers, cfg, lay, DistInfo(device=lay.device),
                                            seed, steps, lambda epoch: image_size, image_size, check_unused=False)
            else:
                batches, val = dali_backend.build(train, data.val, batch, workers, cfg, lay,
                                                  DistInfo(device=lay.device), seed, steps)
        else:
            raise ValueError(f"unknown loader {kind}")
        batches.set_epoch(0)
        closers = [batches.close, val.close]
        if lay.device != layout.device:
            batches = _to_device(batches, layout.device)
    try:
        yield batches
    finally:
        for close in closers:
            close()
        del batches
        gc.collect()  # drops the DataLoader iterator now, so its worker processes exit before the next entry
