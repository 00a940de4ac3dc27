"""build_loaders(): pick a backend and build this rank's train and val batches.

Backends: torchvision (CPU decode, works everywhere), dali (GPU "mixed" decode, or DALI's CPU-only mode
with --device cpu; imported lazily, only in dali_backend.py), synthetic (random tensors on the device).
"""

from __future__ import annotations

import sys

from ..config import DataConfig
from ..dist import DistInfo
from ..errors import UserError
from ..schedules import Resolution
from .base import Layout, Loaders, check_shard_sizes
from .scan import scan_dataset


def resolve_backend(loader: str, device_type: str) -> str:
    if loader != "auto":
        return loader
    if device_type == "cuda":
        from . import dali_backend
        if dali_backend.available():
            return "dali"
    return "torchvision"


def build_loaders(cfg: DataConfig, dist: DistInfo, layout: Layout, seed: int) -> Loaders:
    backend = resolve_backend(cfg.loader, layout.device.type)
    batch = dist.per_rank_batch(cfg.batch_size)
    sizes = Resolution.from_config(cfg)  # train crop size per epoch (progressive resizing), val size
    if backend == "synthetic":
        from . import synthetic
        train, val = synthetic.build(batch, dist.world_size, sizes(0), cfg.num_classes, layout, seed,
                                     cfg.steps_per_epoch, dist.rank, size_at=sizes, val_size=sizes.val_size)
        classes = tuple(str(i) for i in range(cfg.num_classes))
        return Loaders(train, val, classes, "synthetic", synthetic.TRAIN_SIZE, synthetic.VAL_SIZE)

    if cfg.data is None:
        raise UserError("no DATA given (and no embedded dataset for this command)")
    train_split, val_split = scan_dataset(cfg.data, cfg.file_list)
    if backend == "dali":
        from . import dali_backend
        if not dali_backend.available():
            raise UserError("--loader dali needs NVIDIA DALI: pip install 'fasttrain[dali]' "
                            f"({dali_backend.import_error()})")
        # A broken JPEG can crash DALI's parser (no error to catch): DALI never sees one.
        from .jpeg_check import drop_broken_jpegs
        train_split, val_split = drop_broken_jpegs(train_split, val_split, dist, cfg.workers, cfg.max_bad_files)
    steps, fits = check_shard_sizes(len(train_split), dist.world_size, batch, len(val_split))
    if fits < batch and dist.rank == 0:
        print(f"fasttrain: warning: {len(train_split)} training images make less than one batch of {batch} for "
              f"each of the {dist.world_size} process(es): training on batches of {fits}, 1 step per epoch",
              file=sys.stderr, flush=True)
    batch = fits
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)
    workers = dist.per_rank_workers(cfg.workers)
    detail = ""
    if backend == "dali":
        train, val = dali_backend.build(train_split, val_split, batch, workers, cfg, layout, dist, seed, steps)
        name = f"dali-{'gpu' if layout.device.type == 'cuda' else 'cpu'}"
    elif backend == "torchvision":
        from . import torchvision_backend
        train, val = torchvision_backend.build(train_split, val_split, batch, workers, cfg.image_size, layout,
                                               dist.rank, dist.world_size, seed, steps, cfg.max_bad_files,
                                               size_at=sizes, val_size=sizes.val_size,
                                               crop_ratio=cfg.val_crop_ratio)
        name = "torchvision"
        from .decode import crop_decoder_available
        if not crop_decoder_available():
            detail = "; whole-image JPEG decode (fasttrain/data/_jpeg.c was not built, see README)"
    else:  # pragma: no cover - config choices stop this earlier
        raise UserError(f"unknown loader {backend}")
    if dist.rank == 0:
        print(f"fasttrain: loader {name}: {len(train_split)} train / {len(val_split)} val images, "
              f"{len(train_split.classes)} classes, {batch} per process x {dist.world_size} process(es), "
              f"{workers} worker(s) each{detail}", file=sys.stderr, flush=True)
    return Loaders(train, val, train_split.classes, name, len(train_split), len(val_split))
